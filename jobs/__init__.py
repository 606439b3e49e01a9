"""critbatch.jobs: everything a cell runs, and the grid -> cells -> manifests generator.

Sub-packages by concern: ``cell`` (the contract every part reads), ``store``,
``data``, ``models``, ``train`` (one cell), ``sweep`` (grids, manifests, the
cluster client), ``local`` (executor, demo, loopback S3); ``cli`` on top.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("critbatch")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
