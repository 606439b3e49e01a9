"""Two gloo processes under torchrun train the same curve as one process at the same global batch.

Tolerance: step losses and evaluations agree to rtol 1e-4 over all 40 steps.
The two runs differ only in the order of floating-point sums (the all-reduce,
the sharded evaluation), so they drift apart by rounding alone; the digits CNN
has no BatchNorm, whose per-rank statistics would make them differ by design.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.store import open_store
from critbatch.jobs.cell.layout import cell_prefix
from factories import read_rows, read_success, train

STEPS = 40
BASE = {
    "dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "srsr", "batch_size": 32,
    "base_lr": 0.02, "base_batch": 16, "epochs": 2, "sweep": "d", "max_steps": STEPS,
    "eval": {"points": 6, "train_subset": 200}, "noise": {"every": 5},
}


def cell_text(accumulation: int) -> str:
    return json.dumps({**BASE, "accumulation": accumulation})


def torchrun(cell: str, url: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "critbatch.jobs.cli", "train", "--cell", cell, "--store", url, "--threads", "1",
           "--progress", "none"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("single") / "store")
    assert train(cell_text(1), url) == 0
    store = open_store(url)
    prefix = cell_prefix("d", Cell.from_json(cell_text(1)).id)
    return read_rows(store, prefix, "steps"), read_rows(store, prefix, "evals"), read_success(store, prefix)


@pytest.mark.slow
@pytest.mark.parametrize("accumulation, b_small", [(1, 16), (2, 8)])
def test_two_ranks_match_one_process(tmp_path, cpu_env, single, accumulation, b_small):
    ref_steps, ref_evals, ref_done = single
    url = str(tmp_path / "store")
    cell = cell_text(accumulation)
    out = torchrun(cell, url)
    assert out.count(f"global batch 32 = micro-batch {16 // accumulation} x accumulation {accumulation} "
                     f"x world size 2") == 1  # printed by rank 0 alone
    store = open_store(url)
    prefix = cell_prefix("d", Cell.from_json(cell).id)
    steps = read_rows(store, prefix, "steps")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # one writer: no duplicates
    assert [r["train_loss"] for r in steps] == pytest.approx([r["train_loss"] for r in ref_steps], rel=1e-4)
    assert [r["lr"] for r in steps] == [r["lr"] for r in ref_steps]
    # Noise: the small batch is one rank's share (no accumulation) or one micro-batch, B the global batch.
    measured = [r for r in steps if r["noise_b_small"] is not None]
    assert [r["step"] for r in measured] == list(range(5, STEPS + 1, 5))
    assert {(r["noise_b_small"], r["noise_b_big"]) for r in measured} == {(b_small, 32)}
    ref_big = [r["noise_g_big_sq"] for r in ref_steps if r["noise_g_big_sq"] is not None]
    assert [r["noise_g_big_sq"] for r in measured] == pytest.approx(ref_big, rel=1e-3)  # the same full gradient

    evals = read_rows(store, prefix, "evals")
    key = lambda r: (r["step"], r["split"])  # noqa: E731
    assert sorted(map(key, evals)) == sorted(map(key, ref_evals))
    ref = {key(r): (r["loss"], r["value"]) for r in ref_evals}
    for r in evals:
        assert r["loss"] == pytest.approx(ref[key(r)][0], rel=1e-4)
        assert r["value"] == pytest.approx(ref[key(r)][1], abs=1e-9)  # accuracy: a count, exact
    done = read_success(store, prefix)
    assert done["status"] == "done" and done["steps"] == STEPS
    assert done["final"]["lin_approx_error"] == pytest.approx(ref_done["final"]["lin_approx_error"], rel=1e-2)
