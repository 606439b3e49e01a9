"""One trainer per cell: a second trainer never touches a cell in use, a lost lease stops the trainer, and a
damaged cell (unreadable _SUCCESS, a part cut or lost) is trained again into the very same result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from critbatch.jobs.cell.layout import cell_prefix, success_key
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.store import open_store
from critbatch.jobs.store.cellstate import cell_state
from critbatch.jobs.store.lease import current_holder
from critbatch.jobs.train.checkpoint import Checkpointer
from factories import final_weights, read_rows, read_success, train

CELL = json.dumps({
    "sweep": "f", "dataset": {"name": "linreg", "options": {"n": 64, "d": 128, "spikes": 2, "spike_var": 20.0}},
    "model": "linear", "strategy": "oracle", "base_lr": 1.0, "base_batch": 4, "batch_size": 4, "epochs": 150,
    "seed": 0, "optimizer": {"momentum": 0.0, "weight_decay": 0.0}, "eval": {"points": 12},
})
TOTAL = 2400
PREFIX = cell_prefix("f", Cell.from_json(CELL).id)
ARGS = ("--flush-steps", "150", "--checkpoint-steps", "400")


def launch(url: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "critbatch.jobs.cli", "train", "--cell", CELL, "--store", url, "--threads", "1",
           "--progress", "json", *ARGS, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A clean run: its _SUCCESS (less wall time and part layout), rows and final weights."""
    url = str(tmp_path_factory.mktemp("clean") / "store")
    assert train(CELL, url, *ARGS) == 0
    return outcome(open_store(url))


def outcome(store) -> tuple[dict, list, list, dict]:
    """What a run leaves, in the terms that must not depend on how it got there."""
    summary = read_success(store, PREFIX)
    summary.pop("wall_time_s")
    summary.pop("code_version")  # the tree's commit, which other work moves on
    logs = summary.pop("logs")
    summary["rows"] = {kind: logs[kind]["rows"] for kind in logs}
    steps = read_rows(store, PREFIX, "steps")
    assert [r["step"] for r in steps] == list(range(1, TOTAL + 1)), "every step exactly once"
    evals = sorted((r["step"], r["split"], r["metric"], r["loss"]) for r in read_rows(store, PREFIX, "evals"))
    assert len(evals) == len(set(evals[i][:3] for i in range(len(evals)))), "no evaluation twice"
    assert cell_state(store, "f", Cell.from_json(CELL).id).state == "done"
    return summary, [r["train_loss"] for r in steps], evals, final_weights(store, PREFIX)


def same(result, reference) -> None:
    summary, losses, evals, weights = result
    assert summary == reference[0]
    assert losses == reference[1] and evals == reference[2]
    assert all(torch.equal(weights[k], reference[3][k]) for k in reference[3])


@pytest.mark.slow
def test_a_second_trainer_while_the_first_writes_its_last_parts_leaves_the_cell_whole(tmp_path, cpu_env, capsys,
                                                                                     reference):
    """The race that lost data: trainers started again and again on the cell while its first trainer finishes."""
    url = str(tmp_path / "store")
    first = launch(url)
    last_step = threading.Event()
    lines: list[str] = []

    def read() -> None:
        for line in first.stdout:
            lines.append(line)
            if line.startswith("{") and json.loads(line)["step"] == TOTAL:
                last_step.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert last_step.wait(120), "".join(lines)
    codes = []
    while first.poll() is None:  # the first one evaluates, reads its parts back, writes model.pt and _SUCCESS
        codes.append(train(CELL, url, *ARGS))
    codes.append(train(CELL, url, *ARGS))
    reader.join()
    assert first.returncode == 0, "".join(lines)
    out = capsys.readouterr().out
    assert set(codes) <= {0, 203} and codes[-1] == 0, out
    assert "already finished" in out
    if 203 in codes:
        assert "held by" in out and "the cell is left to it, exit 203" in out
    same(outcome(open_store(url)), reference)


@pytest.mark.slow
def test_a_trainer_that_loses_its_lease_stops_and_writes_no_more(tmp_path, cpu_env):
    url = str(tmp_path / "store")
    store = open_store(url)
    proc = launch(url, "--lease-seconds", "1.5")
    deadline = time.monotonic() + 60
    while not Checkpointer(store, PREFIX).complete_steps():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    held = current_holder(store, PREFIX)
    # Another trainer takes over (as after an expiry): the next record, created atomically.
    taker = {"owner": "taker", "generation": held.generation + 1, "host": "elsewhere", "pid": 1,
             "expires": time.time() + 600, "ttl_s": 600}
    assert store.create(f"{PREFIX}/lease/{held.generation + 1:08d}.json", json.dumps(taker).encode())
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 203, out
    assert "lost the lease" in out and "held by elsewhere pid 1" in out
    assert not store.exists(success_key("f", Cell.from_json(CELL).id))


def _truncate(store, key: str) -> None:
    data = store.get_bytes(key)
    store.put_bytes(key, data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["unreadable _SUCCESS", "a part cut", "a part lost"])
def test_a_damaged_finished_cell_is_trained_again_into_the_same_result(tmp_path, cpu_env, capsys, reference, damage):
    url = str(tmp_path / "store")
    store = open_store(url)
    assert train(CELL, url, *ARGS) == 0
    parts = store.list(f"{PREFIX}/steps/")
    if damage == "unreadable _SUCCESS":
        store.put_bytes(f"{PREFIX}/_SUCCESS", b'{"status": "do')
    elif damage == "a part cut":
        _truncate(store, parts[3])
    else:
        store.delete(parts[5])
    state = cell_state(store, "f", Cell.from_json(CELL).id)
    assert state.state == "damaged"
    capsys.readouterr()
    assert train(CELL, url, *ARGS) == 0
    out = capsys.readouterr().out
    assert f"withdrawing {store.join(PREFIX + '/_SUCCESS')} (not finished: {state.problems[0]}" in out
    same(outcome(store), reference)


@pytest.mark.slow
def test_a_cut_part_below_the_checkpoint_resumes_from_an_older_one(tmp_path, cpu_env, reference):
    """Killed mid-run, one part under its newest checkpoint cut: the resume goes back to where parts are whole."""
    url = str(tmp_path / "store")
    store = open_store(url)
    proc = launch(url)
    checkpoints = Checkpointer(store, PREFIX)
    deadline = time.monotonic() + 60
    while len(checkpoints.complete_steps()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.01)
    proc.kill()
    proc.communicate()
    older, newer = checkpoints.complete_steps()[-2:]
    state = checkpoints.load(newer)
    # The last step part the newer checkpoint covers, but the older one does not.
    cut = f"{PREFIX}/steps/part-{state['logs']['steps'] - 1:06d}.arrow"
    assert checkpoints.load(older)["logs"]["steps"] < state["logs"]["steps"]
    _truncate(store, cut)
    code = launch(url)
    out, _ = code.communicate(timeout=120)
    assert code.returncode == 0, out
    assert f"training again from the checkpoint at step {older}" in out
    same(outcome(store), reference)
