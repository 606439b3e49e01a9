"""The object store: one small interface (:mod:`.base`), a local directory and S3.

A store URL is either ``s3://bucket/prefix`` or a directory path (``file://``
optional). :mod:`.logstream` streams a cell's log parts into a store; :mod:`.retry` waits
out an outage for the callers that can wait; :mod:`.lease` keeps one trainer per cell;
:mod:`.cellstate` says whether a cell is finished, damaged or not there.
"""

from __future__ import annotations

import os

from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.cell.layout import DEFAULT_STORE

from .base import Store
from .local import LocalStore
from .s3 import S3Store

__all__ = ["Store", "LocalStore", "S3Store", "open_store"]


def open_store(url: str | None = None, *, retries: int = 8) -> Store:
    """A store from its URL: ``s3://bucket/prefix``, ``file:///dir`` or a directory path.

    ``retries``: botocore's retries of each S3 call (see :class:`S3Store`).
    """
    url = url or os.environ.get("CRITBATCH_STORE") or DEFAULT_STORE
    if url.startswith("s3://"):
        rest = url[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ConfigError(f"store: {url!r} names no bucket; expected s3://BUCKET[/PREFIX]")
        return S3Store(bucket, prefix, retries=retries)
    if "://" in url and not url.startswith("file://"):
        raise ConfigError(f"store: unsupported scheme in {url!r}; allowed: s3://BUCKET/PREFIX, file://DIR or a path")
    if url.startswith("file://"):
        url = url[len("file://"):]
    return LocalStore(url)
