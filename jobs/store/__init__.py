"""The object store: one small interface (:mod:`.base`), a local directory and S3.

A store URL is either ``s3://bucket/prefix`` or a directory path (``file://``
optional). :mod:`.logstream` streams a cell's log parts into a store; :mod:`.retry` waits
out an outage for the callers that can wait; :mod:`.lease` keeps one trainer per cell;
:mod:`.cellstate` says whether a cell is finished, damaged or not there.
"""

from __future__ import annotations

import os

from ..cell.errors import ConfigError
from ..cell.layout import DEFAULT_STORE, store_problem
from .base import Store
from .local import LocalStore
from .s3 import S3Store

__all__ = ["Store", "LocalStore", "S3Store", "open_store"]


def open_store(url: str | None = None, *, retries: int = 8) -> Store:
    """A store from its URL: ``s3://bucket/prefix``, ``file:///dir`` or a directory path.

    ``retries``: botocore's retries of each S3 call (see :class:`S3Store`).
    """
    url = url or os.environ.get("CRITBATCH_STORE") or DEFAULT_STORE
    problem = store_problem(url)
    if problem:
        raise ConfigError(f"store: {problem}")
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        return S3Store(bucket, prefix, retries=retries)
    if url.startswith("file://"):
        url = url[len("file://"):]
    return LocalStore(url)
