"""The critical batch size over training from branch cells (analysis/branches.py, docs/branches.md): the local
B_crit(t) recovers a known answer, from curves built to have it and from real branches of the known-answer
linreg problem under the oracle step; Merrill et al.'s tolerance CBS(t) by numbers; the report's section."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from critbatch.analysis import branches
from critbatch.analysis.load import CellSummary, Curve, load_sweeps
from critbatch.analysis.report import analyze, validate_options
from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.local.executor import run_cells
from critbatch.jobs.store import open_store
from critbatch.jobs.sweep.grid import grid_from_dict

from factories import SMALL_GRID


def test_tolerance_cbs_is_the_last_batch_within_eps_of_the_best_smaller_one():
    # 16 is within 1 % of the best below it (8: 1.000), 32 is not (1.02 > 1.01): 16, even though 64 is back within.
    final = {4: 1.004, 8: 1.000, 16: 1.009, 32: 1.02, 64: 1.001}
    assert branches.tolerance_cbs(final, 0.01) == 16
    assert branches.tolerance_cbs(final, 0.03) == 64
    assert branches.tolerance_cbs({4: 1.0, 8: 1.5}, 0.01) == 4
    assert branches.tolerance_cbs({4: 1.0, 8: math.nan, 16: 1.0}, 0.01) == 4  # a diverged branch ends it
    assert math.isnan(branches.tolerance_cbs({4: math.nan, 8: 1.0}, 0.01))


def _branch_summary(k: int, b: int, b_crit: float, e_min: float, length: int, *, start: int, seed: int = 0,
                    points: int = 33) -> CellSummary:
    """A branch cell at multiplier k whose train-split loss falls as exp(-examples / E(m)) with McCandlish's
    E(m) = E_min (1 + m / B_crit): its steps to any loss are S_min (1 + B_crit / m), S_min = E_min / B_crit."""
    m = k * b
    steps = np.linspace(0, length // m, points)
    loss = np.exp(-steps * m / (e_min * (1 + m / b_crit)))
    cell = {"dataset": {"name": "linreg", "options": {}}, "model": "linear", "strategy": "oracle", "batch_size": m,
            "seed": 0, "optimizer": {"name": "sgd"},
            "branch": {"base": "ab12cd34ef", "at": 0.5, "multiplier": k, "rule": "linear", "seed": seed}}
    derived = {"total_steps": length // m, "branch": {
        "base": "ab12cd34ef", "at": 0.5, "start_step": start, "start_examples": start * b, "start_tokens": None,
        "base_batch": b, "multiplier": k, "rule": "linear", "base_lr": 0.1, "lr": 0.1 * k, "examples": length}}
    empty = np.zeros(0)
    return CellSummary(id=f"{k:02d}{seed:08d}", sweep="s", cell=cell, derived=derived, code_version="x",
                       status="done", success={"status": "done"}, train_eval=Curve(steps, loss), test_eval=None,
                       test_metric=None, metric="none", running_mean=None, grid_steps=empty, grid_wall=empty,
                       grid_samples=empty, last_step=int(steps[-1]), diverged_at=None, noise_points=0, noise=None)


def test_local_b_crit_recovers_the_critical_batch_size_the_curves_were_built_with():
    b, b_crit, length = 4, 24.0, 4096
    cells = [_branch_summary(k, b, b_crit, e_min=200.0, length=length, start=100) for k in (1, 2, 4, 8, 16, 32)]
    (p,) = branches.branch_points(cells, seed_noise=0.1)
    # The target: the k = 1 loss at half the length, exp(-2048 / (200 (1 + 4/24))).
    assert p.target == pytest.approx(math.exp(-2048 / (200 * (1 + 4 / 24))), rel=1e-3)
    reached = [r for r in p.rows if math.isfinite(r.steps_to_target)]
    # Batch m reaches it within the length while E(m) <= 2 E(4): m <= 2 x 4 + 24 = 32.
    assert [r.batch_size for r in reached] == [4, 8, 16, 32]
    assert p.fit.ok and p.fit.censored == 2
    assert p.fit.b_crit == pytest.approx(b_crit, rel=0.02)
    assert p.fit.b_lo < b_crit < p.fit.b_hi and p.fit.one_seed
    assert p.start_examples == 400 and p.multipliers == [1, 2, 4, 8, 16, 32]


def test_tolerance_cbs_over_seeds_and_the_trend_line():
    # Two points, two seeds; the losses after the length rise with m, more steeply at the later point.
    early = [_branch_summary(k, 4, 8.0, 200.0, 4096, start=100, seed=s) for k in (1, 2, 4, 8) for s in (0, 1)]
    late = [_branch_summary(k, 4, 72.0, 200.0, 4096, start=900, seed=s) for k in (1, 2, 4, 8, 16, 32)
            for s in (0, 1)]
    for c in late:
        c.derived["branch"]["start_examples"] = 3600
    points = branches.branch_points(early + late, tolerance=0.5, seed_noise=0.1)
    assert [p.start_step for p in points] == [100, 900]
    for p in points:
        assert len(p.cbs_seeds) == 2 and p.cbs_range[0] == p.cbs_range[1] == p.cbs  # the seeds' curves are equal
        assert p.cbs <= p.fit.b_hi
    line = branches.trend(points)  # no base in the analysis: the points are named by their steps
    found = re.fullmatch(r"linreg/linear, sgd, oracle \(base ab12cd34ef\): the critical batch size \(local B_crit\) "
                         r"grows from ~([\d.]+) at step 100 to ~([\d.]+) at step 900 \(2 points\)", line)
    assert found and float(found[1]) == pytest.approx(8, rel=0.05) and float(found[2]) == pytest.approx(72, rel=0.05)
    assert branches.ramp_snippet(points) is None  # no base in the analysis: no epochs to place the phases at
    for p, epoch in zip(points, (0.8, 7.2)):
        p.base_epoch = epoch
    snippet = branches.ramp_snippet(points).splitlines()
    # B = 4: CBS 8 at epoch 0.8 -> 8 from epoch 1; CBS 72 at epoch 7.2 -> 64 from epoch 8 (the largest batch
    # tried is 128).
    assert snippet[2:4] == ["batch_size: [4, 64]   # the constant batches to measure the ramp against",
                            "ramp: {rule: linear, phases: [{epoch: 0, batch: 4}, {epoch: 1, batch: 8}, "
                            "{epoch: 8, batch: 64}]}"], snippet


def test_the_tolerance_option_is_checked():
    with pytest.raises(ConfigError, match=r"--tolerance: must be a relative loss difference in \(0, 1\), got 0"):
        validate_options(None, 0.5, 100, 50, tolerance=0.0)


#: The known-answer problem as a base at batch 2 keeping its checkpoints at 10 % and 50 % of its 256 steps, and
#: branches at 1, 2, 3, 4, 6 and 8 times its batch under the oracle step, 1152 examples each (13 cells, about a
#: minute on 2 cores). Under the oracle step the examples-efficiency of batch m is 1 / (beta + (m - 1) lambda_1)
#: at every t, so McCandlish's B_crit is beta / lambda_1 - 1 at every point (10.3 for this data).
KNOWN = {**SMALL_GRID, "sweep": "known-branches", "batch_size": 2, "base_batch": 2, "epochs": 8,
         "eval": {"points": 17}, "noise": {"every": 2}, "keep": {"at": [0.1, 0.5]},
         "branch": {"multipliers": [1, 2, 3, 4, 6, 8], "length": {"examples": 1152}, "rule": "oracle"}}


@pytest.mark.slow
def test_branches_of_the_known_answer_problem_find_its_critical_batch_size_at_every_point(tmp_path, cpu_env):
    g = grid_from_dict(json.loads(json.dumps(KNOWN)))
    store = open_store(str(tmp_path / "store"))
    result = run_cells(g.cells(), store, parallel=2, log_dir=tmp_path / "logs")
    assert result.exit_code == 0 and len(result.done) == 13
    a = analyze(store, [g.sweep], bootstrap=50)
    assert [grp.batch_sizes for grp in a.groups] == [[2]]  # the branches are not cells of a grid
    assert [p.fraction for p in a.branches] == pytest.approx([0.1, 0.5], abs=0.01)
    for p in a.branches:
        assert p.analytic == pytest.approx(10.29, abs=0.01)
        assert p.fit.ok and abs(p.fit.b_crit / p.analytic - 1) < 0.3, (p.fraction, p.fit.b_crit)  # measured: -18 %
        assert p.fit.b_lo < p.analytic < p.fit.b_hi
        assert p.cbs <= p.fit.b_crit  # the tolerance CBS is the smaller by construction
        assert p.b_simple is not None and p.b_simple.cells == 1
    art = next(x for x in a.artifacts if x.name == "cbs_over_training")
    assert art.png and not art.missing and len(art.rows) == 2
    assert "| 0.1 (step 26) | 52 | 1 2 3 4 6 8 | 1 |" in art.markdown
    from critbatch.analysis.report import over_training, ramps

    (line,) = over_training(a)
    (snippet,) = ramps(a)  # B_crit(t) about 8.5 at 10 % (epoch 0.8) and 50 %: batch 8 from epoch 1 on
    assert "ramp: {rule: oracle, phases: [{epoch: 0, batch: 2}, {epoch: 1, batch: 8}]}" in snippet, snippet
    assert re.search(r"stays near its value from ~[\d.]+ at 10 % of training to ~[\d.]+ at 50 % of training", line)
    loaded = load_sweeps(store, [g.sweep])
    assert len([c for c in loaded.cells if branches.is_branch(c)]) == 12
