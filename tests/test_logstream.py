"""Log streaming to a local directory and to the loopback S3 server, including a store outage."""

from __future__ import annotations

import time
import uuid

import pyarrow as pa
import pytest

from critbatch.jobs.cell.errors import StoreUnavailable
from critbatch.jobs.cell.logschema import EVALS_SCHEMA, STEPS_SCHEMA, ipc_to_table, part_key, table_to_ipc
from critbatch.jobs.store.logstream import LogStream
from critbatch.jobs.store import S3Store, open_store

PREFIX = "sweep/cells/c0ffee"


def step_row(step: int) -> dict:
    return {"step": step, "epoch": step / 10, "samples_seen": 64 * step, "lr": 0.1, "train_loss": 1.0 / step,
            "wall_time_s": 0.01 * step}


def eval_row(step: int, split: str = "test") -> dict:
    return {"step": step, "epoch": step / 10, "split": split, "loss": 0.5, "metric": "accuracy", "value": 0.9}


def stream(store, tmp_path, **kw) -> LogStream:
    kw = {"flush_steps": 10, "flush_seconds": 60.0, "cell_id": "c0ffee", **kw}
    return LogStream(store, PREFIX, spool_dir=tmp_path / "spool", **kw)


def part_keys(store, kind: str) -> list[str]:
    return store.list(f"{PREFIX}/{kind}/")


def read_back(store, kind: str) -> pa.Table:
    """Every part of a kind, checked to be numbered 0..n-1 and each a whole Arrow file."""
    keys = part_keys(store, kind)
    assert keys == [part_key(PREFIX, kind, i) for i in range(len(keys))], "part numbering has gaps"
    tables = [ipc_to_table(store.get_bytes(key)) for key in keys]
    schema = STEPS_SCHEMA if kind == "steps" else EVALS_SCHEMA
    assert all(t.schema.equals(schema) for t in tables)
    return pa.concat_tables(tables) if tables else schema.empty_table()


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def spool_files(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "spool").rglob("*") if p.is_file())


def test_every_row_arrives_once_and_in_order(any_store_url, tmp_path):
    store = open_store(any_store_url)
    log = stream(store, tmp_path, flush_steps=7)
    log.resume(None)
    for step in range(1, 101):
        log.log_step(step_row(step))
        if step % 25 == 0:
            log.log_eval(eval_row(step))
    assert log.close(timeout=60) == {"steps": 15, "evals": 1}
    assert log.close() == {"steps": 15, "evals": 1}  # a second close is harmless

    steps = read_back(store, "steps")
    assert steps.column("step").to_pylist() == list(range(1, 101))
    assert set(steps.column("cell_id").to_pylist()) == {"c0ffee"}
    assert steps.column("train_loss").to_pylist() == [1.0 / s for s in range(1, 101)]
    assert steps.column("noise_b_small").null_count == 100
    evals = read_back(store, "evals")
    assert evals.column("step").to_pylist() == [25, 50, 75, 100]
    assert spool_files(tmp_path) == []  # uploaded parts leave the spool


def test_parts_are_cut_every_flush_steps_rows(local_store, tmp_path):
    log = stream(local_store, tmp_path, flush_steps=10, flush_seconds=60.0)
    log.resume(None)
    for step in range(1, 36):
        log.log_step(step_row(step))
    assert wait_for(lambda: len(part_keys(local_store, "steps")) == 3)
    time.sleep(0.3)
    assert len(part_keys(local_store, "steps")) == 3  # the last 5 rows wait for the next trigger
    assert [t.num_rows for t in map(ipc_to_table, map(local_store.get_bytes, part_keys(local_store, "steps")))] \
        == [10, 10, 10]
    log.close()
    assert read_back(local_store, "steps").column("step").to_pylist() == list(range(1, 36))


def test_parts_are_cut_every_flush_seconds(local_store, tmp_path):
    log = stream(local_store, tmp_path, flush_steps=1000, flush_seconds=0.3)
    log.resume(None)
    for step in range(1, 6):
        log.log_step(step_row(step))
    log.log_eval(eval_row(5))
    started = time.monotonic()
    assert wait_for(lambda: len(part_keys(local_store, "steps")) == 1 and len(part_keys(local_store, "evals")) == 1)
    assert time.monotonic() - started < 3.0
    assert read_back(local_store, "steps").num_rows == 5
    log.close()


def test_resume_deletes_parts_written_after_the_checkpoint(any_store_url, tmp_path):
    store = open_store(any_store_url)
    first = stream(store, tmp_path)
    first.resume(None)
    for step in range(1, 31):
        first.log_step(step_row(step))
    first.log_eval(eval_row(30))
    checkpoint = first.sync(timeout=60)
    assert checkpoint == {"steps": 3, "evals": 1}
    for step in range(31, 51):  # logged after the checkpoint, then the process dies
        first.log_step(step_row(step))
    first.log_eval(eval_row(50))
    first.close(timeout=60)
    assert len(part_keys(store, "steps")) == 5 and len(part_keys(store, "evals")) == 2

    second = stream(store, tmp_path)
    second.resume(checkpoint)
    assert len(part_keys(store, "steps")) == 3 and len(part_keys(store, "evals")) == 1
    for step in range(31, 56):
        second.log_step(step_row(step))
    second.log_eval(eval_row(55))
    second.close(timeout=60)
    assert read_back(store, "steps").column("step").to_pylist() == list(range(1, 56))
    assert read_back(store, "evals").column("step").to_pylist() == [30, 55]


def test_fresh_start_removes_parts_of_an_earlier_attempt(local_store, tmp_path):
    first = stream(local_store, tmp_path)
    first.resume(None)
    for step in range(1, 26):
        first.log_step(step_row(step))
    first.close()
    assert len(part_keys(local_store, "steps")) == 3

    second = stream(local_store, tmp_path)
    second.resume(None)  # crashed before its first checkpoint: start over
    assert part_keys(local_store, "steps") == []
    for step in range(1, 13):
        second.log_step(step_row(step))
    second.close()
    assert read_back(local_store, "steps").column("step").to_pylist() == list(range(1, 13))


def _spool_part(tmp_path, kind: str, index: int, steps: range) -> None:
    folder = tmp_path / "spool" / PREFIX / kind
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"cell_id": "c0ffee", **step_row(s)} for s in steps]
    (folder / f"part-{index:06d}.arrow").write_bytes(table_to_ipc(pa.Table.from_pylist(rows, schema=STEPS_SCHEMA)))


def test_resume_settles_parts_left_in_the_spool_by_a_killed_process(local_store, tmp_path):
    # The killed process had uploaded parts 0 and 1 (1 still in its spool), cut part 2 without
    # uploading it, cut part 3 after the checkpoint, and was writing part 4.
    for index in (0, 1):
        rows = [{"cell_id": "c0ffee", **step_row(s)} for s in range(10 * index + 1, 10 * index + 11)]
        local_store.put_bytes(part_key(PREFIX, "steps", index),
                              table_to_ipc(pa.Table.from_pylist(rows, schema=STEPS_SCHEMA)))
    for index in (1, 2, 3):
        _spool_part(tmp_path, "steps", index, range(10 * index + 1, 10 * index + 11))
    (tmp_path / "spool" / PREFIX / "steps" / ".part-000004.arrow.tmp").write_bytes(b"half")

    log = stream(local_store, tmp_path)
    log.resume({"steps": 3, "evals": 0})
    for step in range(31, 36):
        log.log_step(step_row(step))
    assert log.close() == {"steps": 4, "evals": 0}
    assert read_back(local_store, "steps").column("step").to_pylist() == list(range(1, 36))
    assert spool_files(tmp_path) == []


def test_a_row_with_an_unknown_column_fails_at_sync(local_store, tmp_path):
    log = stream(local_store, tmp_path)
    log.resume(None)
    log.log_step({**step_row(1), "trian_loss": 1.0})
    with pytest.raises(RuntimeError, match=r"columns \['trian_loss'\] not in the schema"):
        log.sync(timeout=10)
    with pytest.raises(RuntimeError, match="rows could not be written"):
        log.close(timeout=10)
    assert not log._cutter.is_alive() and not log._uploader.is_alive()


def test_resume_is_called_once_before_logging(local_store, tmp_path):
    log = stream(local_store, tmp_path)
    with pytest.raises(RuntimeError, match="call resume"):
        log.sync()
    log.resume(None)
    with pytest.raises(RuntimeError, match="once, before anything is logged"):
        log.resume(None)
    with pytest.raises(ValueError, match="unknown part kinds"):
        stream(local_store, tmp_path).resume({"step": 3})
    log.close()


@pytest.mark.s3
@pytest.mark.slow
def test_store_outage_loses_no_row_and_never_blocks_training(s3_server, s3_env, tmp_path):
    bucket = "t-" + uuid.uuid4().hex[:12]
    S3Store(bucket, "runs").check()
    store = S3Store(bucket, "runs", retries=1)  # fail fast; the stream's own loop retries for ever
    log = stream(store, tmp_path, flush_steps=20, flush_seconds=0.2, retry_base_delay=0.1, retry_max_delay=1.0)
    log.resume(None)
    slowest = 0.0
    step = 0

    def train(n: int) -> None:
        nonlocal step, slowest
        for _ in range(n):
            step += 1
            row = step_row(step)
            started = time.perf_counter()
            log.log_step(row)
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.002)  # a training step

    train(150)
    assert wait_for(lambda: log.pending_parts() == 0)
    s3_server.stop()
    try:
        train(300)
        assert log.pending_parts() > 0
        assert len(spool_files(tmp_path)) == log.pending_parts()  # the parts wait on local disk
        with pytest.raises(StoreUnavailable, match="not uploaded"):
            log.sync(timeout=0.5)
        outage_slowest = slowest
    finally:
        s3_server.start()
    train(150)
    assert log.close(timeout=120) == {"steps": len(part_keys(store, "steps")), "evals": 0}
    assert outage_slowest < 0.05, f"log_step took {outage_slowest * 1e3:.1f} ms while the store was down"
    steps = read_back(store, "steps").column("step").to_pylist()
    assert steps == list(range(1, 601))
    assert spool_files(tmp_path) == []
