"""Shared fixtures: a real SeaweedFS S3 server on loopback, stores, environment."""

from __future__ import annotations

import os
import uuid

import pytest

from critbatch.jobs.local.s3server import S3Server
from critbatch.jobs.store import LocalStore, S3Store


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One S3 server for the session, on free loopback ports; killed at the end."""
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The AWS_* variables pointing at the loopback server, set for this test."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server.env()


@pytest.fixture
def s3_url(s3_env):
    """A fresh ``s3://bucket/prefix`` for one test; the bucket is created."""
    bucket = "t-" + uuid.uuid4().hex[:12]
    store = S3Store(bucket, "runs")
    store.check()
    return f"s3://{bucket}/runs"


@pytest.fixture
def local_store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture(params=["local", "s3"])
def any_store_url(request, tmp_path):
    """Parametrises a test over a local directory and the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_url")


@pytest.fixture
def cpu_env(monkeypatch):
    """Single-threaded, deterministic CPU runs."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return os.environ
