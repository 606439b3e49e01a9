"""A store on S3 through boto3 and its standard configuration.

``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and
``AWS_ENDPOINT_URL`` for any S3-compatible server (SeaweedFS, MinIO, AWS).
"""

from __future__ import annotations

import os
import random
import time
from typing import Callable, TypeVar

from critbatch.jobs.cell.errors import ConfigError, StoreUnavailable

from .base import Store

T = TypeVar("T")


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
