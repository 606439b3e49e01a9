"""Batch-size ramps (docs/ramp.md): the cell field and its errors, the plan by numbers, the trainer's rows, a
resume mid-ramp, and the measured saving in steps against constant batches."""

from __future__ import annotations

import json
import math

import pytest
import torch

from critbatch.analysis.load import load_sweeps
from critbatch.analysis.ramp import ramp_rows, ramp_table
from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.cell.layout import cell_prefix
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.data.datasets import load_task_data
from critbatch.jobs.store import open_store
from critbatch.jobs.sweep.grid import grid_from_dict, load_grid
from critbatch.jobs.train.plan import Plan
from factories import SMALL_GRID, final_weights, read_rows, read_success, train
from sgdtrace import GOLDEN

PHASES = [{"epoch": 0, "batch": 4}, {"epoch": 3, "batch": 8}, {"epoch": 6, "batch": 16}]
#: SMALL_GRID's linreg (64 examples) at batch 4 for 10 epochs, the rate decaying linearly, ramped to 8 and 16.
RAMP = {
    **{k: v for k, v in SMALL_GRID.items() if k not in ("resources", "batch_size")},
    "batch_size": 4, "epochs": 10, "strategy": "blr", "base_lr": 0.01, "decay": "linear", "sweep": "ramp",
    "eval": {"points": 8, "train_subset": None}, "ramp": {"rule": "linear", "phases": PHASES},
}


def ramp_cell(**over) -> Cell:
    return Cell.from_dict({**json.loads(json.dumps(RAMP)), **over})


def problems_of(**over) -> list[str]:
    with pytest.raises(ConfigError) as err:
        ramp_cell(**over)
    return str(err.value).splitlines()


# ---- the field and its errors ------------------------------------------------------------------


@pytest.mark.parametrize("phases, line", [
    ([{"epoch": 1, "batch": 4}], "cell.ramp.phases[0].epoch: 1; allowed: 0"),
    ([{"epoch": 0, "batch": 8}], "cell.ramp.phases[0].batch: 8; allowed: the cell's batch_size 4"),
    ([{"epoch": 0, "batch": 4}, {"epoch": 2, "batch": 6}], "cell.ramp.phases[1].batch: 6 is not a multiple of "
     "batch_size 4; allowed: multiples of 4, e.g. 8"),
    ([{"epoch": 0, "batch": 4}, {"epoch": 2, "batch": 16}, {"epoch": 4, "batch": 8}], "cell.ramp.phases[2].batch: 8 "
     "is smaller than phases[1].batch 16; allowed: 16 or more"),
    ([{"epoch": 0, "batch": 4}, {"epoch": 5, "batch": 8}, {"epoch": 5, "batch": 16}], "cell.ramp.phases[2].epoch: 5 "
     "does not follow phases[1].epoch 5; allowed: epochs in increasing order, above 5"),
    ([{"epoch": 0, "batch": 4}, {"epoch": 10, "batch": 8}], "cell.ramp.phases[1].epoch: 10 is not inside the budget "
     "of 10 epochs; allowed: 1 to 9"),
    ([{"epoch": 0, "batch": 4}, {"epoch": 2, "batch": 128}], "cell.ramp.phases[1].batch: 128 is larger than the "
     "training set (64 examples)"),
])
def test_a_ramp_that_does_not_fit_names_the_phase_and_what_is_allowed(phases, line):
    assert line in "\n".join(problems_of(ramp={"rule": "linear", "phases": phases}))


@pytest.mark.parametrize("over, line", [
    ({"noise": {"every": 10}}, "cell.noise.every: 10, but the noise probe measures at one batch; allowed with a "
     "ramp: 0"),
    ({"keep": {"at": [0.5]}}, "cell.ramp: a ramp does not go with keep"),
    ({"strategy": "longer"}, "cell.strategy: 'longer' holds the budget in iterations at one batch"),
    ({"ramp": {"rule": "linear", "phases": []}}, "cell.ramp.phases:"),
    ({"ramp": {"rule": "cubic", "phases": PHASES}}, "cell.ramp.rule:"),
    ({"dataset": {"name": "digits"}, "model": "digits_cnn"}, "cell.ramp.rule: 'oracle' needs dataset 'linreg'"),
    ({"dataset": {"name": "pycorpus", "options": {"seq_len": 32}}, "model": "gpt", "ramp": {
        "rule": "sqrt", "phases": PHASES}}, "cell.ramp: 'pycorpus' is a token stream"),
])
def test_what_a_ramp_does_not_go_with_is_an_error_naming_the_field(over, line):
    if over.get("dataset", {}).get("name") == "digits":
        over = {**over, "ramp": {"rule": "oracle", "phases": PHASES}}
    assert any(p.startswith(line) for p in problems_of(**over)), problems_of(**over)


def test_a_branch_with_a_ramp_is_an_error():
    base = ramp_cell(ramp=None, keep={"at": [0.5]})
    lines = problems_of(batch_size=8, ramp={"rule": "linear", "phases": [{"epoch": 0, "batch": 8}]}, keep={"at": [0.5]},
                        branch={"base": base.id, "at": 0.5, "multiplier": 2, "rule": "linear",
                                "length": {"examples": 64}, "seed": 0})
    assert any(p.startswith("cell.ramp: a ramp does not go with branch") for p in lines), lines


def test_an_unset_ramp_keeps_every_pinned_id_and_a_set_one_changes_it():
    for preset, pin in json.loads(GOLDEN.read_text()).items():
        cell = Cell.from_json(pin["cell"])
        assert "ramp" not in cell.to_dict() and cell.id == pin["cell_id"], preset
    plain = ramp_cell(ramp=None)
    assert "ramp" not in plain.canonical_json()
    assert ramp_cell().id != plain.id
    assert ramp_cell().model_copy(update={"ramp": None}).id == plain.id


def test_a_grid_ramp_block_adds_the_ramp_of_each_cell_at_its_first_batch():
    spec = {**RAMP, "batch_size": [4, 16], "seed": [0, 1]}
    grid = grid_from_dict(spec)
    cells = grid.cells()
    assert [(c.batch_size, c.seed, c.ramp is not None) for c in cells] == [
        (4, 0, False), (4, 1, False), (16, 0, False), (16, 1, False), (4, 0, True), (4, 1, True)]
    assert cells[4].model_copy(update={"ramp": None}).id == cells[0].id  # the same cell but for its ramp
    assert [grid.plan(c).micro_batch for c in cells[4:]] == [4, 4]  # sized for B, as the constant B cell
    with pytest.raises(ConfigError) as err:
        grid_from_dict({**spec, "ramp": {"rule": "linear", "phases": [{"epoch": 0, "batch": 8}]}})
    assert str(err.value) == "ramp.phases[0].batch: 8 is the batch_size of no cell of the grid (a ramp starts from " \
        "one); allowed: 4, 16"
    with pytest.raises(ConfigError) as err:
        grid_from_dict({**spec, "ramp": [RAMP["ramp"], {"rule": "linear", "phases": [
            {"epoch": 0, "batch": 4}, {"epoch": 3, "batch": 6}]}]})
    assert str(err.value) == "ramp[1].phases[1].batch: 6 is not a multiple of batch_size 4; allowed: multiples of " \
        "4, e.g. 8"


def test_a_bad_ramp_in_a_grid_file_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    from critbatch.jobs.cli import main

    import yaml
    spec = {**RAMP, "noise": {"every": 5}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec))
    code = main(["run", str(tmp_path / "grid.yaml"), "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2
    assert "noise.every: 5, but the noise probe measures at one batch; allowed with a ramp: 0" in err
    assert "Traceback" not in err and not (tmp_path / "store").exists()


# ---- the plan by numbers -----------------------------------------------------------------------


def test_the_plan_counts_each_epoch_at_its_batch_and_anchors_the_rate_at_b():
    cell = ramp_cell()
    plan = Plan.of(cell, load_task_data(cell, "/unused"), world=2)
    # 64 examples: 16 steps per epoch at 4 for epochs 0-2, 8 at 8 for 3-5, 4 at 16 for 6-9.
    assert plan.total == 3 * 16 + 3 * 8 + 4 * 4 == 88
    assert [(s["epoch"], s["batch"], s["accumulation"], s["first_step"], s["first_examples"], s["lr_factor"])
            for s in plan.derived["ramp"]] == [(0, 4, 1, 0, 0, 1.0), (3, 8, 2, 48, 192, 2.0), (6, 16, 4, 72, 384, 4.0)]
    assert plan.micro == 2 and [plan.accumulation_of(e) for e in (0, 2, 3, 5, 6, 9)] == [1, 1, 2, 2, 4, 4]
    assert [plan.batch(e) for e in (0, 3, 9)] == [4, 8, 16] and [plan.epoch_steps(e) for e in (0, 3, 9)] == [16, 8, 4]
    # The rate at B's step at the same point of the data (linear decay over B's 160 steps) x k.
    def at_b(s):
        return 0.01 * (1 - s / 160)
    assert plan.lr(0) == at_b(0) and plan.lr(47) == at_b(47)
    assert plan.lr(48) == pytest.approx(2 * at_b(48)) and plan.lr(50) == pytest.approx(2 * at_b(52))
    assert plan.lr(72) == pytest.approx(4 * at_b(96)) and plan.lr(87) == pytest.approx(4 * at_b(156))
    assert [plan.samples(s) for s in (48, 50, 72, 88)] == [192, 208, 384, 640]
    assert [plan.epoch_at(s) for s in (24, 52, 74, 88)] == [1.5, 3.5, 6.5, 10.0]
    banner = plan.banner(noise="off", device=torch.device("cpu"), store="x")
    assert "from epoch 3 (step 48, 192 examples): batch 8 = 2 x accumulation 2 x world size 2, 8 steps/epoch, " \
        "lr x 2" in banner


def test_the_sqrt_and_oracle_rules_and_a_fractional_budget():
    sqrt = ramp_cell(epochs=9.5, ramp={"rule": "sqrt", "phases": PHASES})
    plan = Plan.of(sqrt, load_task_data(sqrt, "/unused"), world=1)
    assert plan.total == 48 + 24 + 14  # the last phase: 3.5 epochs of 4 steps
    assert [s["lr_factor"] for s in plan.derived["ramp"]] == [1.0, math.sqrt(2), 2.0]
    oracle = ramp_cell(strategy="oracle", ramp={"rule": "oracle", "phases": PHASES})
    plan = Plan.of(oracle, load_task_data(oracle, "/unused"), world=1)
    beta, lam = plan.derived["beta"], plan.derived["lambda_1"]

    def eta(m):
        return m / (beta + (m - 1) * lam)
    assert [s["lr_factor"] for s in plan.derived["ramp"]] == pytest.approx([1.0, eta(8) / eta(4), eta(16) / eta(4)])
    # Step 80 starts epoch 8 (72 + 2 epochs of 4 steps): the decay at B's step 8 x 16.
    assert plan.lr(80) == pytest.approx(eta(16) * (1 - 128 / 160))


# ---- training ----------------------------------------------------------------------------------


def test_a_ramp_cell_logs_its_examples_rates_and_epochs_as_planned(tmp_path, cpu_env):
    cell = ramp_cell()
    assert train(cell.to_json(), str(tmp_path)) == 0
    store = open_store(str(tmp_path))
    prefix = cell_prefix(cell.sweep, cell.id)
    rows = read_rows(store, prefix, "steps")
    plan = Plan.of(cell, load_task_data(cell, "/unused"), world=1)
    assert [r["step"] for r in rows] == list(range(1, 89))
    assert [r["samples_seen"] for r in rows] == [plan.samples(s) for s in range(1, 89)]
    assert rows[-1]["samples_seen"] == 640 and rows[48]["samples_seen"] == 200
    assert [r["lr"] for r in rows] == [plan.lr(s) for s in range(88)]
    assert [r["epoch"] for r in rows[47:50]] == [3.0, 3.125, 3.25]
    record = json.loads(store.get_text(f"{prefix}/cell.json"))
    assert record["derived"]["ramp"] == plan.derived["ramp"] and record["derived"]["total_steps"] == 88
    evals = read_rows(store, prefix, "evals")
    assert {(r["step"], r["epoch"]) for r in evals if r["step"] in (0, 88)} == {(0, 0.0), (88, 10.0)}
    assert read_success(store, prefix)["steps"] == 88


def test_a_ramp_paused_mid_ramp_and_resumed_equals_the_run_straight_through(tmp_path, cpu_env):
    """Paused in the second phase (step 60 of 88, accumulating two micro-batches), then run on: the same weights
    and the same logged losses, rates and examples, bit for bit."""
    cell = ramp_cell(optimizer={"name": "sgd", "momentum": 0.9, "weight_decay": 0.0}).to_json()
    prefix = cell_prefix("ramp", Cell.from_json(cell).id)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert train(cell, straight) == 0
    assert train(cell, resumed, "--pause-at", "60", "--checkpoint-steps", "7") == 0
    first = open_store(resumed)
    assert not first.exists(f"{prefix}/_SUCCESS") and max(r["step"] for r in read_rows(first, prefix, "steps")) == 60
    assert train(cell, resumed) == 0
    a, b = open_store(straight), open_store(resumed)
    wa, wb = final_weights(a, prefix), final_weights(b, prefix)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    columns = ("step", "epoch", "samples_seen", "lr", "train_loss")
    rows_a = [tuple(r[c] for c in columns) for r in read_rows(a, prefix, "steps")]
    rows_b = sorted({tuple(r[c] for c in columns) for r in read_rows(b, prefix, "steps")})
    assert rows_b == rows_a
    losses = {(r["step"], r["split"]): r["loss"] for r in read_rows(a, prefix, "evals")}
    again = {(r["step"], r["split"]): r["loss"] for r in read_rows(b, prefix, "evals")}
    # The pause evaluates at its step too (and the straight run's grid has no 60): the rest are the same numbers.
    assert {k: v for k, v in again.items() if k[0] != 60} == losses and (60, "train") not in losses


# ---- the measurement ---------------------------------------------------------------------------


def test_the_local_ramp_preset_saves_steps_against_constant_b_for_a_few_more_examples(tmp_path, cpu_env):
    """The preset's three cells (linreg, batch 4, batch 32, a ramp 4 -> 8 -> 16 -> 32 under the oracle step) to
    eps = 0.01. Measured here: the ramp takes 491 steps to constant 4's 808 (39 % fewer) and 3760 examples to its
    3233 (x 1.16); constant 32 takes 185 steps and 5917 examples. Asserted with room for another machine's
    floating point: 30 to 50 % fewer steps, at most 1.3 x the examples, and fewer examples than constant 32."""
    grid = load_grid("local-ramp")
    store = str(tmp_path / "store")
    for cell in grid.cells():
        assert train(cell.to_json(), store) == 0
    loaded = load_sweeps(open_store(store), ["local-ramp"])
    assert sorted(c.status for c in loaded.cells) == ["reached"] * 3  # each stopped at its threshold, the ramp too
    rows = ramp_rows(loaded.cells, [0.01])
    assert len(rows) == 1
    row = rows[0]
    assert row["k_final"] < row["k_ramp"] < row["k_first"]
    assert 30.0 <= row["steps_saved_pct"] <= 50.0, row
    assert 1.0 <= row["examples_ratio"] <= 1.3, row
    assert row["examples_ramp"] < row["examples_final"]
    # Without an explicit target the ramp's own stop threshold is the one.
    assert [r["eps"] for r in ramp_rows(loaded.cells)] == [0.01]
    table = ramp_table(loaded.cells)
    assert table.missing is None and "4@0 8@2 16@4 32@8" in table.markdown
    assert ramp_table([c for c in loaded.cells if c.cell.get("ramp") is None]).missing == \
        "no ramp cells in this sweep"


#: A digits ramp long enough to be killed mid-run: 16 for two epochs (89 steps each), 32 for two (44), 64 for four
#: (22): 354 steps.
DIGITS_RAMP = {
    "dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "blr", "batch_size": 16, "base_lr": 0.02,
    "base_batch": 16, "epochs": 8, "sweep": "ramp", "eval": {"points": 10, "train_subset": 200},
    "noise": {"every": 0}, "decay": "cosine",
    "ramp": {"rule": "linear", "phases": [{"epoch": 0, "batch": 16}, {"epoch": 2, "batch": 32},
                                          {"epoch": 4, "batch": 64}]},
}


@pytest.mark.slow  # three processes of a few seconds each
def test_a_ramp_killed_mid_ramp_and_resumed_equals_the_run_straight_through(tmp_path, cpu_env):
    """SIGKILL once a checkpoint inside the second phase exists; the resumed run ends with the weights and the
    logged rows of the run straight through."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from critbatch.jobs.train.checkpoint import Checkpointer

    cell = json.dumps(DIGITS_RAMP)
    prefix = cell_prefix("ramp", Cell.from_json(cell).id)

    def launch(url: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "critbatch.jobs.cli", "train", "--cell", cell, "--store", url, "--threads", "1",
             "--progress", "none", "--flush-steps", "8", "--checkpoint-steps", "10"],
            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    proc = launch(straight)
    assert proc.wait(timeout=180) == 0, proc.communicate()[0]
    proc = launch(killed)
    checkpoints = Checkpointer(open_store(killed), prefix)
    deadline = time.monotonic() + 120
    while not any(s > 178 for s in checkpoints.complete_steps()):  # past the first phase's 178 steps
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    resume_from = checkpoints.complete_steps()[-1]
    assert 178 < resume_from < 354
    proc = launch(killed)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0 and f"resumed from the checkpoint at step {resume_from}" in out, out
    a, b = open_store(straight), open_store(killed)
    wa, wb = final_weights(a, prefix), final_weights(b, prefix)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    columns = ("step", "epoch", "samples_seen", "lr", "train_loss")
    rows_b = [tuple(r[c] for c in columns) for r in read_rows(b, prefix, "steps")]
    assert [r[0] for r in rows_b] == list(range(1, 355))  # each step once
    assert rows_b == [tuple(r[c] for c in columns) for r in read_rows(a, prefix, "steps")]
    assert rows_b[-1][2] == 2 * 89 * 16 + 2 * 44 * 32 + 4 * 22 * 64


@pytest.mark.slow  # torchrun with two gloo processes, about half a minute
def test_a_ramp_on_two_ranks_trains_the_curve_of_one_process(tmp_path, cpu_env):
    """Two gloo ranks split each micro-batch of B = 32 (16 rows each) and accumulate 2 of them at batch 64: the
    same examples, rates and (to rounding) losses as one process with micro-batches of 32."""
    import os
    import subprocess
    import sys

    cell = json.dumps({
        "dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "blr", "batch_size": 32,
        "base_lr": 0.02, "base_batch": 32, "epochs": 2, "sweep": "ramp", "noise": {"every": 0},
        "eval": {"points": 6, "train_subset": 200},
        "ramp": {"rule": "sqrt", "phases": [{"epoch": 0, "batch": 32}, {"epoch": 1, "batch": 64}]}})
    prefix = cell_prefix("ramp", Cell.from_json(cell).id)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert train(cell, one) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
         "critbatch.jobs.cli", "train", "--cell", cell, "--store", two, "--threads", "1", "--progress", "none"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "batch 64 = 16 x accumulation 2 x world size 2" in proc.stdout
    a, b = read_rows(open_store(one), prefix, "steps"), read_rows(open_store(two), prefix, "steps")
    assert len(a) == len(b) == 44 + 22
    assert [(r["step"], r["samples_seen"], r["lr"]) for r in b] == [(r["step"], r["samples_seen"], r["lr"]) for r in a]
    # Summed in another order, round-off grows over the 66 steps: 1.8e-4 at the end on one CPU, hence 1e-3.
    assert [r["train_loss"] for r in b] == pytest.approx([r["train_loss"] for r in a], rel=1e-3)
