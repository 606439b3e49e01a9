"""Stop at the threshold (jobs/train/stop.py) and pausing (``--pause-at``): the window rule, and real cells."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from critbatch.analysis.compute import crossing
from critbatch.analysis.load import load_cell
from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.cell.layout import cell_prefix, success_key
from critbatch.jobs.cell.spec import Cell, StopSpec
from critbatch.jobs.store import LocalStore
from critbatch.jobs.train.main import train_cell
from critbatch.jobs.train.stop import ThresholdStop, dense_steps
from critbatch.jobs.train.trainer import Paused

# ---- the rule, on loss sequences -----------------------------------------------------------------------


@pytest.mark.parametrize("evals, confirmed_at, voided", [
    # below at 100: window 25 steps, evaluations at 109, 117, 125 (added by wants_eval); all below: stop at 125
    ([(0, 2.0), (50, 1.2), (100, 0.9), (109, 0.8), (117, 0.85), (125, 0.7)], 125, 0),
    # one back above eps voids the window; the next crossing opens another (at 140: 35 steps)
    ([(0, 2.0), (100, 0.9), (109, 1.1), (140, 0.95), (152, 0.9), (164, 0.9), (175, 0.9)], 175, 1),
    # a loss that never stays below never stops
    ([(0, 2.0), (100, 0.9), (109, 1.1), (140, 1.2), (200, 1.05)], None, 1),
    # a short run: the window is at least confirm_evals steps
    ([(0, 2.0), (4, 0.9), (5, 0.9), (6, 0.9), (7, 0.9)], 7, 0),
])
def test_window_rule(evals, confirmed_at, voided):
    stop = ThresholdStop(StopSpec(threshold=1.0))
    seen = None
    for step, loss in evals:
        if stop.observe(step, loss):
            seen = step
            break
    assert seen == confirmed_at
    assert stop.voided == voided
    # k: the first crossing, interpolated in log loss between the evaluations around it, as the analysis reads it
    steps, values = np.array([s for s, _ in evals], float), np.array([v for _, v in evals])
    assert stop.k == pytest.approx(crossing(steps, values, 1.0))


def test_window_evaluations_are_requested():
    stop = ThresholdStop(StopSpec(threshold=1.0, confirm=0.5, confirm_evals=2))
    stop.observe(0, 3.0)
    stop.observe(40, 0.5)
    assert [s for s in range(41, 80) if stop.wants_eval(s)] == [50, 60]
    state = stop.state_dict()
    again = ThresholdStop(StopSpec(threshold=1.0, confirm=0.5, confirm_evals=2))
    again.load_state_dict(json.loads(json.dumps(state)))  # through a checkpoint's JSON-like state
    assert again.observe(50, 0.4) is False and again.observe(60, 0.3) is True and again.k == stop.k


def test_dense_evaluations_around_the_expected_crossing():
    steps = dense_steps(StopSpec(threshold=0.1, expect=400), total=2000, base_total=2000, points=50)
    assert min(steps) == 200 and max(steps) <= 800 and len(steps) > 4 * 49 * np.log(4) / np.log(2000) - 2
    assert dense_steps(StopSpec(threshold=0.1), total=2000, base_total=2000, points=50) == set()


def test_stop_is_part_of_the_id_only_when_set():
    fields = {"dataset": {"name": "linreg"}, "model": "linear", "strategy": "oracle", "batch_size": 8,
              "base_lr": 1.0, "base_batch": 2, "epochs": 5.0}
    plain = Cell.from_dict(fields)
    assert "stop" not in plain.to_json() and Cell.from_dict({**fields, "stop": None}).id == plain.id
    stopped = Cell.from_dict({**fields, "stop": {"threshold": 0.1}})
    assert stopped.id != plain.id and json.loads(stopped.to_json())["stop"]["threshold"] == 0.1
    with pytest.raises(ConfigError, match=r"cell\.stop\.confirm: 5\.0 is outside \(0, 4\]"):
        Cell.from_dict({**fields, "stop": {"threshold": 0.1, "confirm": 5.0}})


# ---- real cells ----------------------------------------------------------------------------------------

FIELDS = {"dataset": {"name": "linreg", "options": {"n": 64, "d": 128, "spikes": 4, "spike_var": 20.0}},
          "model": "linear", "strategy": "oracle", "batch_size": 8, "base_lr": 1.0, "base_batch": 2, "epochs": 12.0,
          "optimizer": {"momentum": 0.0, "weight_decay": 0.0}, "eval": {"points": 30, "train_subset": None},
          "noise": {"every": 0}, "sweep": "stop"}


def _train(store, cell, **kwargs):
    return train_cell(cell, store, data_root="unused", progress="none", flush_steps=7, **kwargs)


def _logs(store, cell):
    prefix = cell_prefix(cell.sweep, cell.id)
    summary, skipped = load_cell(store, cell.sweep, cell.id, store.list(prefix + "/"))
    assert not skipped
    return summary


def _eps(store) -> float:
    """A loss the full run crosses a third of the way through: the geometric mean of its first and last."""
    full = Cell.from_dict(FIELDS)
    _train(store, full)
    curve = _logs(store, full).train_eval
    return float(np.sqrt(curve.values[0] * curve.values[-1]))


def test_a_cell_stops_within_its_window_with_the_full_runs_k(cpu_env, tmp_path):
    store = LocalStore(tmp_path / "store")
    eps = _eps(store)
    full = _logs(store, Cell.from_dict(FIELDS))
    k_full = crossing(full.train_eval.steps, full.train_eval.values, eps)
    cell = Cell.from_dict({**FIELDS, "stop": {"threshold": eps}})
    summary = _train(store, cell)
    assert summary["status"] == "reached"
    assert summary["k"] == pytest.approx(k_full) and summary["stop"]["k"] == summary["k"]
    logs = _logs(store, cell)
    # It stopped at the end of a window w = max(3, ceil(s / 4)) opened by an evaluation s at or below eps, whose
    # three evaluations (at s + ceil(w j / 3)) were all at or below eps too.
    loss = dict(zip(logs.train_eval.steps.astype(int), logs.train_eval.values))
    end = summary["stop"]["confirmed_at"]
    assert summary["steps"] == logs.last_step == end
    opened = [s for s, v in loss.items() if v <= eps and s + max(3, math.ceil(0.25 * s)) == end]
    assert len(opened) == 1
    width = end - opened[0]
    assert all(loss[opened[0] + math.ceil(width * j / 3)] <= eps for j in (1, 2, 3))
    assert summary["steps"] < full.last_step / 1.5
    # The log contract: every step once, none missing, the summary's count.
    assert logs.duplicates == 0 and summary["logs"]["steps"]["rows"] == summary["steps"]
    assert np.array_equal(logs.grid_steps[[0, -1]], [1, summary["steps"]])
    assert json.loads(store.get_text(success_key(cell.sweep, cell.id)))["status"] == "reached"


def test_a_paused_cell_resumes_to_the_same_k(cpu_env, tmp_path):
    store = LocalStore(tmp_path / "store")
    eps = _eps(store)
    straight = Cell.from_dict({**FIELDS, "stop": {"threshold": eps, "confirm": 0.5}})
    once = _train(store, straight)
    paused = straight.model_copy(update={"sweep": "stop-paused"})
    with pytest.raises(Paused, match="paused at step 5"):
        _train(store, paused, pause_at=5)
    assert not store.exists(success_key(paused.sweep, paused.id))
    with pytest.raises(Paused):  # asked again for the same step: nothing to train
        _train(store, paused, pause_at=5)
    resumed = _train(store, paused)
    assert (resumed["status"], resumed["steps"], resumed["k"]) == (once["status"], once["steps"], once["k"])
    logs = _logs(store, paused)
    assert logs.duplicates == 0 and resumed["logs"]["steps"]["rows"] == resumed["steps"]
    with pytest.raises(ConfigError, match="--pause-at: must be a step >= 1, got 0"):
        _train(store, paused.model_copy(update={"sweep": "x"}), pause_at=0)
