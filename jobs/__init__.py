"""critbatch.jobs: everything a cell runs, and the grid -> cells -> manifests generator.

Sub-packages by concern: ``cell`` (the contract every part reads), ``store``,
``data``, ``models``, ``backends`` (each kind of Kubernetes object a cell runs
as), ``train`` (one cell), ``sweep`` (grid -> cells -> plans -> manifests),
``cluster`` (submit and status: the cluster client), ``local`` (executor, demo,
loopback S3), ``search``; ``cli`` on top.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("critbatch")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
