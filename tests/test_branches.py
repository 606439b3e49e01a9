"""Kept checkpoints and branch cells: a base run keeps its checkpoints at chosen points, and branches at k x its
batch start from them (docs/branches.md)."""

from __future__ import annotations

import json
import math
import time

import pytest

from critbatch.jobs.cell.errors import ConfigError, ExitCode
from critbatch.jobs.cell.layout import cell_prefix, checkpoint_dir
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.cli import main as cli_main
from critbatch.jobs.cluster.markers import MarkerBook
from critbatch.jobs.cluster.status import cell_states, format_table
from critbatch.jobs.local.executor import run_cells
from critbatch.jobs.store import open_store
from critbatch.jobs.sweep.grid import grid_from_dict
from critbatch.jobs.train.checkpoint import Checkpointer
from critbatch.jobs.train.strategies import branch_lr, lr_at

from factories import BRANCH_GRID, read_rows, train

#: n 64, batch 4: 16 steps per epoch, 64 in all; at 0.3 -> step 19 (12 examples into epoch 1), 0.5 -> step 32.
KEPT = {0.3: 19, 0.5: 32}


def grid(**changes) -> "Grid":  # noqa: F821 - the grid module's class
    return grid_from_dict({**json.loads(json.dumps(BRANCH_GRID)), **changes})


def cells_of(g) -> tuple[Cell, dict[tuple[float, int], Cell]]:
    """The grid's base and its branches by (point, multiplier)."""
    base = next(c for c in g.cells() if c.branch is None)
    return base, {(c.branch.at, c.branch.multiplier): c for c in g.cells() if c.branch is not None}


# ---- identity ----------------------------------------------------------------------------------------------


def test_keep_and_branch_enter_the_id_only_when_set():
    g = grid()
    base, branches = cells_of(g)
    plain = base.model_copy(update={"keep": None})
    assert "keep" not in json.loads(plain.canonical_json()) and "branch" not in json.loads(plain.canonical_json())
    assert json.loads(base.canonical_json())["keep"] == {"at": [0.3, 0.5], "steps": []}
    assert plain.id != base.id
    assert len(g.cells()) == 1 + 2 * 2 and len({c.id for c in g.cells()}) == 5


def test_a_branch_names_its_base_and_its_point():
    base, branches = cells_of(grid())
    b = branches[(0.3, 4)]
    assert b.batch_size == 16 and b.branch.base == base.id and b.branch.at == 0.3 and b.branch.seed == 0
    assert b.base_cell().id == base.id  # the base is the branch at batch_size / k, without branch
    record = json.loads(b.to_json())
    assert record["branch"] == {"base": base.id, "at": 0.3, "multiplier": 4, "rule": "linear",
                                "length": {"examples": 128}, "seed": 0}
    assert Cell.from_json(b.to_json()).id == b.id  # round-trips, through cell.json too
    # Another base (another seed) or another point is another branch.
    other_seed, _ = cells_of(grid(seed=1))
    assert cells_of(grid(seed=1))[1][(0.3, 4)].branch.base == other_seed.id
    assert len({branches[(0.3, 4)].id, branches[(0.5, 4)].id, cells_of(grid(seed=1))[1][(0.3, 4)].id}) == 3


@pytest.mark.parametrize("change, message", [
    ({"branch": {"from": "0123456789", "multipliers": [2], "length": {"examples": 128}, "rule": "linear"}},
     r"branch.from: '0123456789' selects no cell of the grid; cells with keep: [0-9a-f]{10}"),
    ({"branch": {"at": [0.4], "multipliers": [2], "length": {"examples": 128}, "rule": "linear"}},
     r"branch.at: 0.4 is not a kept point of the base cell [0-9a-f]{10}; allowed: 0.3, 0.5"),
    ({"branch": {"multipliers": [2, 32], "length": {"examples": 128}, "rule": "linear"}},
     r"multiplier 32, seed 0\): batch_size: 128 is larger than the training set \(64 examples\)"),
    ({"branch": {"multipliers": [3], "length": {"examples": 128}, "rule": "linear"}},
     r"branch.length.examples: 128 is not a multiple of the batch 12 .*allowed: multiples of 12, e.g. 132"),
    ({"branch": {"multipliers": [2], "length": {"examples": 128}, "rule": "oracle"}, "keep": None},
     r"branch: no cell of the grid keeps checkpoints"),
    ({"keep": {"at": [0.29, 0.3]}}, r"keep.at\[1\]: 0.3 of 64 steps is step 19, as keep.at\[0\] is"),
    ({"keep": {"steps": [64]}}, r"keep.steps\[0\]: step 64, not before the run's last step \(64\)"),
    ({"branch": {"multipliers": [2], "length": {"examples": 128}, "rule": "cubic"}},
     r"branch.rule: unknown rule 'cubic'; allowed: linear, sqrt, oracle"),
])
def test_bad_branches_and_keep_points_are_refused_by_field(change, message):
    with pytest.raises(ConfigError, match=message):
        grid(**change)


def test_a_branch_cell_must_name_its_own_base():
    _, branches = cells_of(grid())
    data = json.loads(branches[(0.3, 4)].to_json())
    data["branch"]["base"] = "0123456789"
    with pytest.raises(ConfigError, match=r"cell.branch.base: 0123456789 is not the id of this cell's base"):
        Cell.from_dict(data)


def test_the_grid_schema_knows_the_branch_block():
    from critbatch.jobs.sweep.grid import grid_schema

    schema = grid_schema()
    assert "branch" in schema["properties"] and "keep" in schema["properties"]
    assert "from" in json.dumps(schema["$defs"]["BranchBlock"]["properties"])


# ---- training ----------------------------------------------------------------------------------------------


@pytest.fixture
def trained_base(tmp_path, cpu_env):
    """The base cell trained into a local store: (store url, grid)."""
    url, g = str(tmp_path / "store"), grid()
    base, _ = cells_of(g)
    assert train(base.to_json(), url, "--checkpoint-steps", "5") == 0  # rolling checkpoints too, pruned at the end
    return url, g


def test_the_base_keeps_its_checkpoints_after_success(trained_base):
    url, g = trained_base
    store, (base, _) = open_store(url), cells_of(g)
    prefix = cell_prefix(base.sweep, base.id)
    done = json.loads(store.get_text(f"{prefix}/_SUCCESS"))
    assert done["status"] == "done" and done["steps"] == 64
    assert done["kept"] == [
        {"at": at, "step": step, "examples": 4 * step, "tokens": None, "checkpoint": f"checkpoint/step-{step:010d}"}
        for at, step in KEPT.items()]
    assert Checkpointer(store, prefix).complete_steps() == [19, 32]  # and no other checkpoint survives
    assert {k.split("/")[-2] for k in store.list(f"{prefix}/checkpoint/")} == {"step-0000000019", "step-0000000032"}
    for step in KEPT.values():
        state = Checkpointer(store, prefix).load(step)
        assert state["step"] == step and state["samples_seen"] == 4 * step
    assert json.loads(store.get_text(f"{prefix}/cell.json"))["derived"]["keep"] == [
        {k: v for k, v in point.items() if k != "checkpoint"} for point in done["kept"]]
    # status: the branches may start now; before the base ran they were waiting on it (next test).
    rows = cell_states(g, MarkerBook(store, g.sweep).read(), None)
    assert {r["state"] for r in rows if r["cell"] != base.id} == {"pending"}


def test_status_shows_a_branch_waiting_on_its_base(tmp_path):
    g = grid()
    base, branches = cells_of(g)
    store = open_store(str(tmp_path / "store"))
    rows = {r["cell"]: r for r in cell_states(g, MarkerBook(store, g.sweep).read(), None)}
    assert rows[base.id]["state"] == "pending"
    waiting = rows[branches[(0.5, 4)].id]
    assert waiting["state"] == "waiting"
    assert waiting["why"] == f"on base {base.id}: its checkpoint at step 32 is not in the store yet"
    assert format_table(list(rows.values())).splitlines()[-1] == \
        "done 0  diverged 0  damaged 0  running 0  pending 1  waiting 4  failed 0  lost 0  (total 5)"


def test_a_multiplier_1_branch_repeats_the_base_bit_for_bit(trained_base):
    """k = 1, rule linear, the base's seed: the base's steps 20..51 again (momentum, data position and all),
    from step 19, 12 examples into the base's second epoch."""
    url, g = trained_base
    store, (base, branches) = open_store(url), cells_of(g)
    branch = branches[(0.3, 1)]
    assert train(branch.to_json(), url) == 0
    base_rows = {r["step"]: r for r in read_rows(store, cell_prefix(base.sweep, base.id), "steps")}
    rows = read_rows(store, cell_prefix(branch.sweep, branch.id), "steps")
    assert [r["step"] for r in rows] == list(range(1, 33))  # 128 examples at batch 4
    assert [float.hex(r["train_loss"]) for r in rows] == [float.hex(base_rows[19 + j]["train_loss"])
                                                          for j in range(1, 33)]
    assert [r["lr"] for r in rows] == [base_rows[19 + j]["lr"] for j in range(1, 33)]
    assert [r["epoch"] for r in rows] == pytest.approx([base_rows[19 + j]["epoch"] for j in range(1, 33)])
    derived = json.loads(store.get_text(f"{cell_prefix(branch.sweep, branch.id)}/cell.json"))["derived"]["branch"]
    assert derived == {"base": base.id, "at": 0.3, "start_step": 19, "start_examples": 76, "start_tokens": None,
                       "base_batch": 4, "multiplier": 1, "rule": "linear", "base_lr": rows[0]["lr"],
                       "lr": rows[0]["lr"], "examples": 128}


def test_a_multiplier_4_branch_trains_at_4x_the_batch_on_the_same_examples(trained_base):
    url, g = trained_base
    store, (base, branches) = open_store(url), cells_of(g)
    one, four = branches[(0.3, 1)], branches[(0.3, 4)]
    for branch in (one, four):
        assert train(branch.to_json(), url) == 0
    rows = read_rows(store, cell_prefix(four.sweep, four.id), "steps")
    assert [r["step"] for r in rows] == list(range(1, 9))  # 128 examples at batch 16
    assert [r["samples_seen"] for r in rows] == [16 * s for s in range(1, 9)]
    assert [r["lr"] for r in rows] == [pytest.approx(4 * 0.002)] * 8  # linear: eta_t x k (the base's blr rate)
    # Both start from the same weights (their step-0 evaluations agree) and end on the same 128 examples.
    evals = {b.id: read_rows(store, cell_prefix(b.sweep, b.id), "evals") for b in (one, four)}
    at_start = [{(r["split"], r["loss"]) for r in evals[b.id] if r["step"] == 0} for b in (one, four)]
    assert at_start[0] == at_start[1] and len(at_start[0]) == 2
    done = [json.loads(store.get_text(f"{cell_prefix(b.sweep, b.id)}/_SUCCESS")) for b in (one, four)]
    assert [d["samples_seen"] for d in done] == [128, 128] and [d["steps"] for d in done] == [32, 8]
    # Evaluations at the same examples: 0, 32, 64, 96, 128 (eval.points 5).
    assert sorted({r["step"] * 16 for r in evals[four.id]}) == [0, 32, 64, 96, 128]
    assert sorted({r["step"] * 4 for r in evals[one.id]}) == [0, 32, 64, 96, 128]


def test_a_branch_whose_base_has_not_run_exits_197_after_the_wait(tmp_path, cpu_env, capsys):
    url = str(tmp_path / "store")
    _, branches = cells_of(grid())
    branch = branches[(0.5, 4)]
    started = time.monotonic()
    assert train(branch.to_json(), url, "--base-wait", "1") == ExitCode.BASE_PENDING == 197
    assert 1.0 <= time.monotonic() - started < 30
    out = capsys.readouterr().out
    assert f"has not written its checkpoint at step 32" in out and "exit 197" in out
    assert open_store(url).list(f"{branch.sweep}/cells/") == []  # nothing written, not even a lease


def test_a_branch_whose_base_finished_without_its_checkpoint_is_refused(trained_base, capsys):
    url, g = trained_base
    store, (base, branches) = open_store(url), cells_of(g)
    store.delete_prefix(checkpoint_dir(cell_prefix(base.sweep, base.id), 32) + "/")
    assert train(branches[(0.5, 4)].to_json(), url, "--base-wait", "30") == ExitCode.CONFIG
    assert (f"base cell {base.id} finished (done after 64 steps) without a checkpoint at step 32; its kept steps: "
            "19, 32") in capsys.readouterr().err


@pytest.mark.slow
def test_run_starts_each_branch_after_its_base(tmp_path, cpu_env):
    """Branches queued before their base (and two at a time): each starts once the base's checkpoint is there,
    so none waits inside its trainer, and every one ends done."""
    g = grid(branch={"multipliers": [1, 4], "length": {"examples": 128}, "rule": "linear", "at": [0.3]})
    store = open_store(str(tmp_path / "store"))
    cells = sorted(g.cells(), key=lambda c: c.branch is None)  # the base last
    result = run_cells(cells, store, parallel=2, log_dir=tmp_path / "logs", extra_args=["--base-wait", "0"])
    assert result.exit_code == 0 and sorted(result.done) == sorted(c.id for c in cells)
    for cell in cells:
        log = (tmp_path / "logs" / f"{cell.sweep}-{cell.id}.log").read_text()
        assert "waits up to" not in log and "exit 197" not in log
        if cell.branch is not None:
            assert f"starts from base cell {cell.branch.base} at step 19" in log


@pytest.mark.slow
def test_run_does_not_start_the_branches_of_a_failed_base(tmp_path, cpu_env):
    g = grid(branch={"multipliers": [2], "length": {"examples": 128}, "rule": "linear", "at": [0.3]})
    store = open_store(str(tmp_path / "store"))
    result = run_cells(g.cells(), store, data_root=str(tmp_path / "no-data"), log_dir=tmp_path / "logs",
                       extra_args=["--device", "cuda"])  # the base fails at once (exit 4: no CUDA here)
    base, branches = cells_of(g)
    assert result.failed == [base.id, branches[(0.3, 2)].id] and result.exit_code == 1
    assert not (tmp_path / "logs" / f"{g.sweep}-{branches[(0.3, 2)].id}.log").exists()


def test_branches_of_an_lsr_base_with_a_warm_up_and_steps_points():
    """A branch runs at one rate: the base's warm-up (longer than a branch) does not apply to it; points given
    as steps select the base's keep.steps."""
    g = grid(strategy="lsr", warmup_epochs=1.0, keep={"steps": [20, 40]},
             branch={"steps": [40], "multipliers": [2], "length": {"examples": 64}, "rule": "sqrt"})
    base, _ = cells_of(g)
    (branch,) = [c for c in g.cells() if c.branch is not None]
    assert (branch.branch.step, branch.branch.at, branch.batch_size, branch.branch.rule) == (40, None, 8, "sqrt")
    assert branch.base_cell().id == base.id and "at" not in json.loads(branch.to_json())["branch"]
    assert branch_lr(branch, {"n_train": 64}) == pytest.approx(0.002 * math.sqrt(2))  # sqrt: eta_t x sqrt(k)
    assert lr_at(branch, 0, 8, {"n_train": 64}) == lr_at(branch, 7, 8, {"n_train": 64})  # one rate throughout


def test_cells_prints_what_the_branches_spend_against_a_full_grid(capsys):
    """local-mnist1d: 3 points x 8 multipliers x 2 seeds, 9216 examples each; the base 24 epochs of 4000 at 32;
    a full grid trains each batch k x 32 at both seeds for 24 epochs of whole batches."""
    assert cli_main(["cells", "local-mnist1d"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    branches, base = 3 * 8 * 2 * 9216, 24 * 4000
    grid = 2 * sum(24 * (4000 // (k * 32)) * k * 32 for k in (1, 2, 3, 4, 6, 8, 12, 16))
    spent = branches + base
    assert line == (f"branches: 48 cells from 1 base run(s) train {branches:,} examples, the base runs {base:,}: "
                    f"{spent:,} in all, {100 * spent / grid:.1f} % of what a full grid of the same 8 batch sizes x "
                    f"2 seed(s), each for the base's budget, would train {grid:,} (the branches alone "
                    f"{100 * branches / grid:.1f} %)")
    assert cli_main(["cells", "digits"]) == 0
    assert "branches:" not in capsys.readouterr().err  # a grid without branches prints no cost


def test_the_cost_of_branches_whose_data_size_is_unknown_counts_the_branches_alone():
    from critbatch.jobs.sweep.cost import BranchCost

    text = BranchCost(branches=4, bases=1, branch_examples=4096, base_examples=None, grid_examples=None).text()
    assert text == ("branches: 4 cells from 1 base run(s) train 4,096 examples; the base runs' budget and a full "
                    "grid's are not counted (the training-set size is known only once the data is loaded)")
