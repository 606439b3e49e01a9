"""A store on S3 through boto3 and its standard configuration.

``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and
``AWS_ENDPOINT_URL`` for any S3-compatible server (SeaweedFS, MinIO, AWS).

Each call is retried by botocore (standard retry mode); an error still
transient after that becomes :class:`StoreUnavailable`. Longer outages are
waited out by the callers that can wait (:mod:`.retry`).
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

from ..cell.errors import ConfigError, StoreUnavailable
from .base import Store

T = TypeVar("T")

#: Error codes of a throttled or timed-out request (as botocore's standard retry mode counts them).
_TRANSIENT_CODES = {"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "SlowDown", "Throttling",
                    "ThrottlingException", "RequestThrottled", "TooManyRequestsException"}


class S3Store(Store):
    """S3 through boto3.

    ``retries``: botocore's retries of each call (standard mode: jittered
    exponential backoff from 50 ms, so 8 retries wait about 6 s on average
    and at most 13 s before the call raises StoreUnavailable).
    """

    def __init__(self, bucket: str, prefix: str = "", *, retries: int = 8, client=None):
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

            cfg = Config(
                retries={"mode": "standard", "max_attempts": self.retries},
                connect_timeout=5,
                read_timeout=60,
                s3={"addressing_style": "path"},
            )
            self._client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, config=cfg)
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` (botocore retries inside it); a transient error left over becomes StoreUnavailable."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except (BotoCoreError, ClientError, OSError) as err:
            if is_transient(err):
                raise StoreUnavailable(f"cannot {what} {self.url}: {err}") from err
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call("put", lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        def get() -> bytes:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    raise KeyError(key) from None
                raise

        return self._call("get", get)

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

        return self._call("head", head)

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0

        def run() -> list[str]:
            keys: list[str] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
            return sorted(keys)

        return self._call("list", run)

    def create(self, key: str, data: bytes) -> bool:
        """A conditional PUT (``If-None-Match: *``): the server refuses it (412) when the key exists.

        AWS S3 (since 2024), MinIO and SeaweedFS (4.x; tests/test_lease.py checks the loopback one, racers
        included) honour the condition. A server that ignores it overwrites instead, and returns True to
        every racer: the lease therefore reads its record back before trusting it (:mod:`.lease`).
        A 409 (another conditional write to the key in flight) counts as losing the race.
        """
        from botocore.exceptions import ClientError

        def put() -> bool:
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
                return True
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                                   "ConditionalRequestConflict", "409"):
                    return False
                raise

        return self._call("create", put)

    def sizes(self, prefix: str) -> dict[str, int]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0

        def run() -> dict[str, int]:
            out: dict[str, int] = {}
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                out.update((obj["Key"][strip:], int(obj["Size"])) for obj in page.get("Contents", []))
            return dict(sorted(out.items()))

        return self._call("list", run)

    def delete(self, key: str) -> None:
        self._call("delete", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

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

        self._call("open", ensure_bucket)


def is_transient(err: BaseException) -> bool:
    """Worth waiting out: no connection, a timeout, throttling, a 5xx (what botocore's standard mode retries)."""
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = err.response.get("Error", {}).get("Code", "")
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    return isinstance(err, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError))
