"""The rules written once in the cell contract (critbatch.jobs.cell.science), and their callers agreeing.

k(m; eps) on hand-made curves with known answers; the trainer's stop at the threshold and the analysis giving
the same k on the same curve; the LSR step the strategy and the linear-approximation probe share.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from critbatch.analysis import compute
from critbatch.jobs.cell.science import crossing, lsr_lr
from critbatch.jobs.cell.spec import Cell, StopSpec
from critbatch.jobs.train.optimizers import probe_step
from critbatch.jobs.train.stop import ThresholdStop
from critbatch.jobs.train.strategies import peak_lr

# ---- k(m; eps) -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps, values, eps, expected",
    [
        ([0, 10, 20], [2.0, 1.0, 0.5], 1.0, 10.0),  # exactly on a point
        ([0, 10, 20], [2.0, 1.0, 0.5], 2 ** -0.5, 15.0),  # halfway in log(loss)
        ([0, 10, 20], [2.0, 1.0, 0.5], 0.4, math.nan),  # never reached
        ([0, 10, 20], [2.0, 1.0, 0.5], 3.0, 0.0),  # reached at the start
        ([0, 10, 20, 30], [2.0, math.nan, 1.0, 0.5], 2 ** -0.5, 25.0),  # NaN points are skipped
        ([0, 10, 20], [2.0, math.inf, 0.5], 1.0, 10.0),  # so are inf points: from (0, 2) to (20, 0.5)
        ([0, 10, 20], [math.nan, 2.0, 0.5], 5.0, 10.0),  # no finite point before the first at or below eps
        ([0, 4], [1.0, 0.0], 0.25, 3.0),  # zero loss: linear interpolation
        ([0, 4], [1.0, -1.0], 0.0, 2.0),  # eps 0 (a loss that can go negative): linear too
    ],
)
def test_crossing(steps, values, eps, expected):
    got = crossing(np.array(steps, float), np.array(values, float), eps)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_crossing_is_exact_for_exponential_decay():
    tau, a = 37.3, 2.0
    steps = np.unique(np.round(np.geomspace(1, 1000, 30)))
    values = a * np.exp(-steps / tau)
    for eps in (1.5, 0.3, 1e-3):
        assert crossing(steps, values, eps) == pytest.approx(tau * math.log(a / eps), rel=1e-10)


def test_the_analysis_reads_k_with_this_rule():
    assert compute.crossing is crossing


# ---- the trainer's stop and the analysis on the same curve ---------------------------------------------

curves = st.lists(st.tuples(st.integers(1, 50), st.floats(0.0, 10.0)), min_size=1, max_size=40)


def stop_k(evals: list[tuple[int, float]], eps: float) -> float:
    """The k the trainer records: ThresholdStop fed the evaluations in order, as the training loop feeds it."""
    stop = ThresholdStop(StopSpec(threshold=eps))
    for step, loss in evals:
        stop.observe(step, loss)
    return math.nan if stop.k is None else stop.k


@settings(max_examples=300, deadline=None)
@given(curve=curves, eps=st.floats(0.01, 5.0))
def test_the_trainers_k_is_the_analysis_k(curve, eps):
    """Finite losses (zero included), evaluations at increasing steps: the two k agree bit for bit."""
    steps = np.cumsum([gap for gap, _ in curve]) - curve[0][0]  # from step 0
    values = [v for _, v in curve]
    k_stop = stop_k(list(zip(steps.tolist(), values)), eps)
    k_analysis = compute.crossing(steps.astype(float), np.array(values), eps)
    assert (math.isnan(k_stop) and math.isnan(k_analysis)) or k_stop == k_analysis


def test_after_a_non_finite_evaluation_the_trainer_takes_the_step_itself():
    """The stop keeps only the evaluation before the current one: a non-finite one brackets nothing, so k is
    the current step; the analysis, holding the whole curve, interpolates from the last finite point."""
    evals = [(0, 2.0), (50, math.nan), (100, 0.5)]
    assert stop_k(evals, 1.0) == 100.0
    assert compute.crossing(np.array([0.0, 50, 100]), np.array([2.0, math.nan, 0.5]), 1.0) == 50.0


# ---- the LSR step ----------------------------------------------------------------------------------------

CELL = {"dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "lsr", "batch_size": 256,
        "base_lr": 0.1, "base_batch": 64, "epochs": 1}


def test_lsr_lr():
    assert lsr_lr(0.1, 256, 64) == pytest.approx(0.4, rel=1e-15)
    assert lsr_lr(0.05, 32, 32) == 0.05 and lsr_lr(0.2, 16, 64) == pytest.approx(0.05, rel=1e-15)


@pytest.mark.parametrize("strategy", ["blr", "lsr", "srsr"])
def test_the_strategy_and_the_linear_approximation_step_share_the_lsr_rule(strategy):
    cell = Cell.from_dict({**CELL, "strategy": strategy})
    # paper 4.2: the step of the linear-approximation error is the LSR step whatever the cell's strategy (SGD)
    assert probe_step(cell) == lsr_lr(0.1, 256, 64)
    assert (peak_lr(cell) == lsr_lr(0.1, 256, 64)) == (strategy == "lsr")
