"""The object-store interface: keyed bytes under a root, every write whole or nothing.

Keys are '/'-separated paths relative to the store's root, for example
``<sweep>/cells/<cell-id>/steps/part-000000.arrow`` (design section 5; the
layout itself is :mod:`critbatch.jobs.cell.layout`). Two implementations:
:mod:`.local` (a directory) and :mod:`.s3` (any S3-compatible server).
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Store(ABC):
    """Keyed bytes. Keys never start with '/'."""

    url: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; ``KeyError`` if it does not exist."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (a folder-like prefix), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a key; a missing key is not an error."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist, atomically: True if this call created it.

        Of several callers racing on one key exactly one gets True (where the
        server honours the condition; see :class:`.s3.S3Store`). The object is
        whole when it appears. The one primitive the cell lease needs (:mod:`.lease`).
        """

    @abstractmethod
    def sizes(self, prefix: str) -> dict[str, int]:
        """Every key under ``prefix`` with its size in bytes (one listing; what ``list`` returns, plus sizes)."""

    def check(self) -> None:
        """Raise StoreUnavailable (or ConfigError) when the store cannot be used."""

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode())

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode()

    def join(self, key: str) -> str:
        """A human-readable address of ``key`` (for messages)."""
        return f"{self.url.rstrip('/')}/{key}"

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)
