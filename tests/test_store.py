"""The store interface against a local directory and a real S3 server on loopback."""

from __future__ import annotations

import time

import pytest

from critbatch.jobs.cell.errors import ConfigError, StoreUnavailable
from critbatch.jobs.store import LocalStore, S3Store, open_store
from critbatch.jobs.store.retry import wait_out_outage


@pytest.fixture
def unreachable_s3(monkeypatch):
    """S3 settings that point at the discard port on loopback, where nothing listens."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_roundtrip_list_delete(any_store_url):
    store = open_store(any_store_url)
    store.check()
    store.put_bytes("sw/cells/a/steps/part-000001.arrow", b"one")
    store.put_bytes("sw/cells/a/steps/part-000000.arrow", b"zero")
    store.put_text("sw/cells/b/_SUCCESS", '{"status": "done"}')
    assert store.get_bytes("sw/cells/a/steps/part-000000.arrow") == b"zero"
    assert store.list("sw/cells/a/") == ["sw/cells/a/steps/part-000000.arrow", "sw/cells/a/steps/part-000001.arrow"]
    assert store.list("sw/cells/") == sorted(store.list("sw/cells/"))
    assert len(store.list("sw")) == 3
    assert store.exists("sw/cells/b/_SUCCESS")
    assert not store.exists("sw/cells/c/_SUCCESS")
    with pytest.raises(KeyError):
        store.get_bytes("sw/cells/c/_SUCCESS")
    store.delete_prefix("sw/cells/a")
    assert store.list("sw/cells/a") == []
    store.delete("sw/cells/a/never-there")  # missing key is not an error


def test_local_write_is_atomic(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("k/x", b"1" * 1000)
    store.put_bytes("k/x", b"2")
    assert store.get_bytes("k/x") == b"2"
    assert [p.name for p in (tmp_path / "k").iterdir()] == ["x"]  # no temp file left


def test_open_store_rejects_unknown_scheme():
    with pytest.raises(ConfigError, match="unsupported scheme"):
        open_store("gs://bucket/x")
    with pytest.raises(ConfigError, match="names no bucket"):
        open_store("s3://")


def test_unreachable_s3_raises_store_unavailable(unreachable_s3):
    store = S3Store("bucket", "p", retries=2)
    with pytest.raises(StoreUnavailable, match="cannot put"):
        store.put_bytes("k", b"v")


def test_missing_credentials_is_config_error(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID"):
        open_store("s3://bucket/p").check()


def flaky(failures: int, error: Exception | None = None):
    """A call that fails ``failures`` times (StoreUnavailable unless ``error`` is given), then returns "ok"."""
    calls = []

    def call() -> str:
        calls.append(time.monotonic())
        if len(calls) <= failures:
            raise error or StoreUnavailable("down")
        return "ok"

    return call, calls


def test_wait_out_outage_retries_until_the_store_answers():
    call, calls = flaky(3)
    assert wait_out_outage(call, what="test", deadline=time.monotonic() + 30, base_delay=0.01) == "ok"
    assert len(calls) == 4
    pauses = [b - a for a, b in zip(calls, calls[1:])]
    assert all(0.005 * 2**i - 1e-3 <= p < 0.5 for i, p in enumerate(pauses))  # doubling, jittered down by <= 1/2


@pytest.mark.parametrize("failures, error, deadline_s, stopped, match, calls_made", [
    (100, None, 0.3, False, r"cannot test: the store is still unavailable after 0 s \(down\)", None),
    (100, None, None, True, r"cannot test: stopped while waiting for the store \(down\)", 1),
    (1, KeyError("k"), None, False, "'k'", 1),  # not an outage: raised at once
    (1, ConfigError("store: bad"), None, False, "store: bad", 1),
])
def test_wait_out_outage_ends(failures, error, deadline_s, stopped, match, calls_made):
    import threading

    call, calls = flaky(failures, error)
    stop = threading.Event()
    if stopped:
        stop.set()
    started = time.monotonic()
    deadline = None if deadline_s is None else started + deadline_s
    with pytest.raises(type(error) if error else StoreUnavailable, match=match):
        wait_out_outage(call, what="test", deadline=deadline, stop=stop, base_delay=0.01, max_delay=0.05)
    if deadline_s is not None:  # the last try is made at the deadline, not a pause later
        assert deadline_s <= calls[-1] - started < deadline_s + 0.1 and len(calls) > 5
    else:
        assert len(calls) == calls_made


@pytest.mark.slow
def test_s3_server_outage_and_recovery(s3_server, s3_url):
    store = open_store(s3_url)
    store.put_bytes("before", b"1")
    s3_server.restart()
    assert store.get_bytes("before") == b"1"


@pytest.mark.slow  # the botocore retries run out: about 10 s
@pytest.mark.parametrize("argv, code", [
    (["analyze", "--store", "s3://bucket/p", "--sweep", "x"], 2),  # a user at a terminal: one line, exit 2
    (["train", "--cell", '{"dataset": {"name": "linreg"}, "model": "linear", "strategy": "oracle", "batch_size": 4,'
      ' "base_lr": 1.0, "base_batch": 4, "epochs": 1}', "--store", "s3://bucket/p"], 202),  # a pod: retryable
])
def test_unreachable_store_exit_codes(argv, code, unreachable_s3, capsys):
    from critbatch.jobs.cli import main

    assert main(argv) == code
    err = capsys.readouterr().err
    assert "store unreachable" in err and "Traceback" not in err
