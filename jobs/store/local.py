"""A store in a local directory: a write is a temporary file renamed into place."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ..cell.errors import ConfigError
from .base import Store


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad store key {key!r}")
        return self.root / key

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        os.replace(self._complete_temp(path, data), path)

    @staticmethod
    def _complete_temp(path: Path, data: bytes) -> Path:
        """``data`` written and synced to a hidden temporary file beside ``path`` (one per process and thread)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue
                keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)

    def create(self, key: str, data: bytes) -> bool:
        """A complete temporary file hard-linked into place: link() fails if the key exists, and never
        shows a half-written file (O_CREAT | O_EXCL would, between the create and the write)."""
        path = self._path(key)
        tmp = self._complete_temp(path, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def sizes(self, prefix: str) -> dict[str, int]:
        out = {}
        for key in self.list(prefix):
            try:
                out[key] = (self.root / key).stat().st_size
            except FileNotFoundError:  # deleted since the listing
                continue
        return out

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def check(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"store: {self.root} exists and is not a directory")
