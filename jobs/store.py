"""One small object-store interface, two implementations: a local directory and S3.

Keys are '/'-separated paths relative to the store's root, for example
``<sweep>/cells/<cell-id>/steps/part-000000.arrow`` (design section 5). Every
write is whole or nothing: the local store writes a temporary file and renames
it, S3 PUTs are atomic.

S3 goes through boto3 and its standard configuration: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` for
any S3-compatible server (SeaweedFS, MinIO, AWS). A store URL is either
``s3://bucket/prefix`` or a directory path (``file://`` optional).
"""

from __future__ import annotations

import os
import random
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, TypeVar

from critbatch.jobs.errors import ConfigError, StoreUnavailable

T = TypeVar("T")

#: Store URL used when none is given.
DEFAULT_STORE = "./critbatch-out"


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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

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

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def check(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"store: {self.root} exists and is not a directory")


class S3Store(Store):
    """S3 through boto3. Network errors are retried with exponential backoff."""

    def __init__(self, bucket: str, prefix: str = "", *, retries: int = 5, client=None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.retries = retries
        self._client = client

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            # Connection retries are ours (with_retries); keep botocore's short.
            cfg = Config(
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                s3={"addressing_style": "path"},
            )
            self._client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, config=cfg)
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return with_retries(fn, what=f"{what} {self.url}", attempts=self.retries)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._retry("put", lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        def get() -> bytes:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    raise KeyError(key) from None
                raise

        return self._retry("get", get)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    return False
                raise

        return self._retry("head", head)

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0

        def run() -> list[str]:
            keys: list[str] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
            return sorted(keys)

        return self._retry("list", run)

    def delete(self, key: str) -> None:
        self._retry("delete", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def check(self) -> None:
        """Credentials present, endpoint reachable, bucket there (created if missing)."""
        import boto3

        if boto3.session.Session().get_credentials() is None:
            raise ConfigError(
                "store: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(and AWS_ENDPOINT_URL for a non-AWS server)"
            )
        from botocore.exceptions import ClientError

        def ensure_bucket() -> None:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                    self.client.create_bucket(Bucket=self.bucket)
                else:
                    raise

        self._retry("open", ensure_bucket)


def is_transient(err: BaseException) -> bool:
    """Errors worth retrying: the network, timeouts, throttling, 5xx."""
    try:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            EndpointConnectionError,
            ReadTimeoutError,
            ConnectTimeoutError,
        )
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover
        return isinstance(err, (ConnectionError, TimeoutError))
    if isinstance(err, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, ConnectTimeoutError)):
        return True
    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = err.response.get("Error", {}).get("Code", "")
        return status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout")
    return isinstance(err, (ConnectionError, TimeoutError, Urllib3Error))


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 5, base_delay: float = 0.5,
                 max_delay: float = 30.0) -> T:
    """Call ``fn``; retry transient errors with jittered exponential backoff.

    ``attempts`` <= 0 retries forever. After the last attempt a transient error
    becomes :class:`StoreUnavailable`; other errors pass through at once.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except (KeyError, ConfigError):
            raise
        except Exception as err:  # noqa: BLE001 - classified just below
            if not is_transient(err):
                raise
            if 0 < attempts <= attempt:
                raise StoreUnavailable(f"cannot {what}: {err}") from err
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            time.sleep(delay * (0.5 + random.random() / 2))


def open_store(url: str | None = None, *, retries: int = 5) -> Store:
    """A store from its URL: ``s3://bucket/prefix``, ``file:///dir`` or a directory path."""
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


# ---- the layout of design section 5 -----------------------------------------

def cell_prefix(sweep: str, cell_id: str) -> str:
    return f"{sweep}/cells/{cell_id}"


def success_key(sweep: str, cell_id: str) -> str:
    return f"{cell_prefix(sweep, cell_id)}/_SUCCESS"


def report_prefix(sweep: str) -> str:
    return f"{sweep}/report"
