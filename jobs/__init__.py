"""critbatch.jobs: everything a cell runs, and the grid -> cells -> manifests generator."""

__version__ = "0.1.0"
