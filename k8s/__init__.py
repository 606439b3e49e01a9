"""Kubernetes templates and cluster kit, shipped with the package so `critbatch render` works from an install."""
