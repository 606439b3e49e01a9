"""Kill `critbatch train` at a random step after a checkpoint, restart it: same weights, every step logged once.

CPU, one thread: a resumed run must end with final weights bit-identical to an
uninterrupted run, and its step losses must be the very same numbers.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from critbatch.jobs.train.checkpoint import Checkpointer
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.store import open_store
from critbatch.jobs.cell.layout import cell_prefix
from factories import final_weights, read_rows, read_success, train

CELL = json.dumps({
    "dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "lsr", "batch_size": 32,
    "base_lr": 0.02, "base_batch": 16, "epochs": 8, "warmup_epochs": 1, "sweep": "r",
    "eval": {"points": 12, "train_subset": 200}, "noise": {"every": 7}, "max_steps": 300,
})
TOTAL = 300
PREFIX = cell_prefix("r", Cell.from_json(CELL).id)


def launch(store: str, *extra: str, cell: str = CELL) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "critbatch.jobs.cli", "train", "--cell", cell, "--store", store,
           "--threads", "1", "--progress", "none", "--flush-steps", "16", "--checkpoint-steps", "25", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its final weights and step losses."""
    url = str(tmp_path_factory.mktemp("reference") / "store")
    code, out = finish(launch(url))
    assert code == 0, out
    store = open_store(url)
    return final_weights(store, PREFIX), read_rows(store, PREFIX, "steps"), read_rows(store, PREFIX, "evals")


def wait_for_checkpoint(store, proc: subprocess.Popen, after: int = 0, timeout: float = 120,
                        prefix: str = PREFIX) -> int:
    """The step of the first complete checkpoint newer than ``after``."""
    deadline = time.monotonic() + timeout
    ckpt = Checkpointer(store, prefix)
    while time.monotonic() < deadline:
        steps = [s for s in ckpt.complete_steps() if s > after]
        if steps:
            return steps[-1]
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def interrupt(url: str, sig: signal.Signals, after: int, cell: str = CELL, total: int = TOTAL) -> int:
    """Start (or resume) the run, send ``sig`` at a random moment past its next checkpoint; the step to resume from."""
    store = open_store(url)
    prefix = cell_prefix("r", Cell.from_json(cell).id)
    proc = launch(url, cell=cell)
    wait_for_checkpoint(store, proc, after, prefix=prefix)
    time.sleep(random.uniform(0.0, 0.25))  # a random step past that checkpoint (tens of steps here)
    assert proc.poll() is None, "the run finished before it could be interrupted; make it longer"
    proc.send_signal(sig)
    code, out = finish(proc)
    if after:
        assert f"resumed from the checkpoint at step {after}" in out
    if sig == signal.SIGTERM:
        assert code == 143, out
        assert "on SIGTERM (checkpointed)" in out
        stopped = int(out.split("stopped at step ")[1].split()[0])
        # SIGTERM: the step in flight is finished and checkpointed before the exit.
        assert Checkpointer(store, prefix).complete_steps()[-1] == stopped
    else:
        assert code == -signal.SIGKILL, out
    assert not store.exists(f"{prefix}/_SUCCESS")
    resume_from = Checkpointer(store, prefix).complete_steps()[-1]
    assert after < resume_from < total
    return resume_from


@pytest.mark.slow  # a minute with its reference run
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, reference):
    """SIGTERM at a random step, resume, SIGKILL at a later random step, resume again, finish."""
    ref_weights, ref_steps, ref_evals = reference
    url = str(tmp_path / "store")
    store = open_store(url)
    after = interrupt(url, signal.SIGTERM, after=0)
    after = interrupt(url, signal.SIGKILL, after=after)

    code, out = finish(launch(url))
    assert code == 0, out
    assert f"resumed from the checkpoint at step {after}" in out
    assert read_success(store, PREFIX)["status"] == "done"

    weights = final_weights(store, PREFIX)
    assert weights.keys() == ref_weights.keys()
    for name, value in ref_weights.items():
        assert torch.equal(weights[name], value), name

    steps = read_rows(store, PREFIX, "steps")
    assert [r["step"] for r in steps] == list(range(1, TOTAL + 1))  # each step exactly once
    assert [r["train_loss"] for r in steps] == [r["train_loss"] for r in ref_steps]
    assert [r["noise_g_big_sq"] for r in steps] == [r["noise_g_big_sq"] for r in ref_steps]
    walls = [r["wall_time_s"] for r in steps]
    assert walls == sorted(walls)  # training time carries on across restarts
    evals = read_rows(store, PREFIX, "evals")
    key = lambda r: (r["step"], r["split"])  # noqa: E731
    assert sorted(map(key, evals)) == sorted(map(key, ref_evals))  # no evaluation twice or missing
    assert {key(r): r["loss"] for r in evals} == {key(r): r["loss"] for r in ref_evals}


@pytest.mark.slow
def test_store_outage_mid_run_loses_no_row(tmp_path, cpu_env, s3_server, s3_url):
    """The S3 server goes down after the first checkpoint and comes back: the run finishes, every step logged once."""
    import threading

    cell = json.dumps({**json.loads(CELL), "max_steps": 200, "noise": {"every": 0}, "sweep": "t"})
    prefix = cell_prefix("t", Cell.from_json(cell).id)
    watcher = open_store(s3_url)
    seen: dict[str, bool] = {}

    def outage() -> None:
        deadline = time.monotonic() + 120
        while not Checkpointer(watcher, prefix).complete_steps() and time.monotonic() < deadline:
            time.sleep(0.05)
        seen["running_when_stopped"] = not watcher.exists(f"{prefix}/_SUCCESS")
        s3_server.stop()
        time.sleep(1.0)
        s3_server.start()

    thread = threading.Thread(target=outage)
    thread.start()
    try:
        assert train(cell, s3_url, "--checkpoint-steps", "30", "--flush-steps", "20", "--flush-seconds", "0.2") == 0
    finally:
        thread.join()
    assert seen["running_when_stopped"]
    store = open_store(s3_url)
    assert [r["step"] for r in read_rows(store, prefix, "steps")] == list(range(1, 201))
    assert read_success(store, prefix)["status"] == "done"


GPT = {
    "dataset": {"name": "pycorpus", "options": {"seq_len": 16}}, "model": "gpt",
    "model_options": {"n_layer": 1, "n_head": 2, "n_embd": 16, "seq_len": 16, "dropout": 0.1}, "strategy": "srsr",
    "batch_size": 8, "base_lr": 0.003, "base_batch": 4, "tokens": 19200.0, "sweep": "r", "warmup": {"steps": 20},
    "decay": "wsd", "eval": {"points": 8, "train_subset": 16}, "noise": {"every": 7},
}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [{"name": "adamw"}, {"name": "muon", "ns_steps": 3}], ids=["adamw", "muon"])
def test_gpt_cell_killed_and_resumed_matches_uninterrupted(tmp_path, optimizer):
    """A GPT cell (dropout on, token windows, WSD) with AdamW or Muon: SIGKILL at a random step past a checkpoint,
    resume; the final weights, step losses and noise figures are the uninterrupted run's, bit for bit."""
    cell = json.dumps({**GPT, "optimizer": optimizer})
    prefix = cell_prefix("r", Cell.from_json(cell).id)
    total = 150  # 19200 tokens / (8 x 16)
    ref_url = str(tmp_path / "reference")
    code, out = finish(launch(ref_url, cell=cell))
    assert code == 0, out
    url = str(tmp_path / "store")
    after = interrupt(url, signal.SIGKILL, after=0, cell=cell, total=total)
    code, out = finish(launch(url, cell=cell))
    assert code == 0 and f"resumed from the checkpoint at step {after}" in out, out
    ref, got = open_store(ref_url), open_store(url)
    ref_weights, weights = final_weights(ref, prefix), final_weights(got, prefix)
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)
    steps, ref_steps = read_rows(got, prefix, "steps"), read_rows(ref, prefix, "steps")
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    for column in ("train_loss", "lr", "noise_g_big_sq"):
        assert [r[column] for r in steps] == [r[column] for r in ref_steps], column
