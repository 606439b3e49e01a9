"""The two-batch-size gradient-noise estimator against exactly known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from critbatch.analysis.noise import (
    NoiseTrace,
    b_simple_at,
    expected_components,
    exact_linreg_noise,
    gns_components,
)


def _problem(n: int, d: int = 8, seed: int = 0):
    """A small noisy least-squares problem at weights away from its optimum."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    w = 0.3 * rng.normal(size=d)
    return X, y, w, rng


@pytest.mark.parametrize(
    "g2, trace_sigma, b, B",
    [(1.0, 10.0, 1, 2), (0.01, 50.0, 8, 256), (3.5, 0.0, 4, 32), (0.0, 2.0, 16, 64)],
)
def test_components_invert_the_expected_norms(g2, trace_sigma, b, B):
    # Feeding E|G_b|^2 = |G|^2 + tr(Sigma)/b exactly must give back the two unknowns.
    got = gns_components(g2 + trace_sigma / b, g2 + trace_sigma / B, b, B)
    assert got == pytest.approx((g2, trace_sigma), abs=1e-12)
    assert isinstance(got[0], float) and isinstance(got[1], float)


def test_components_are_elementwise_on_arrays():
    g2, tr = gns_components(np.array([5.0, 8.0]), np.array([3.0, 3.0]), 1, 3)
    np.testing.assert_allclose(g2, [2.0, 0.5])
    np.testing.assert_allclose(tr, [3.0, 7.5])


@pytest.mark.parametrize("b, B", [(4, 4), (8, 4), (0, 4)])
def test_components_reject_bad_batch_sizes(b, B):
    with pytest.raises(ValueError, match="0 < b_small < b_big"):
        gns_components(1.0, 1.0, b, B)


def test_exact_linreg_noise_matches_autograd_per_example_gradients():
    X, y, w, _ = _problem(n=30, d=5)
    grads = []
    for xi, yi in zip(torch.tensor(X), torch.tensor(y)):
        wt = torch.tensor(w, requires_grad=True)
        (0.5 * (xi @ wt - yi) ** 2).backward()
        grads.append(wt.grad)
    per_example = torch.stack(grads)
    mean = per_example.mean(0)
    g2, trace_sigma = exact_linreg_noise(torch.tensor(X), torch.tensor(y), torch.tensor(w))
    assert g2 == pytest.approx(float(mean @ mean), rel=1e-12)
    assert trace_sigma == pytest.approx(float(((per_example - mean) ** 2).sum(1).mean()), rel=1e-12)


def _monte_carlo(per_example: np.ndarray, b: int, B: int, replace: bool, n_fpc: int | None, rng,
                 draws: int = 20000):
    """Mean and standard error of the estimator over many (small, large) batch pairs at fixed weights.

    The small batch is the first b examples of the large one, as with
    micro-batches against their mean; without replacement the large batch is
    a uniformly random subset (one slice of an epoch's permutation).
    """
    n = len(per_example)
    if replace:
        idx = rng.integers(0, n, size=(draws, B))
    else:
        idx = rng.permuted(np.tile(np.arange(n), (draws, 1)), axis=1)[:, :B]
    # Squared norms of batch means through the Gram matrix of the per-example gradients: |mean_S g|^2 =
    # z K z / |S|^2 with z the counts of each example in S (no draws x B x d array).
    gram = per_example @ per_example.T
    rows = np.arange(draws)[:, None]
    z_big, z_small = np.zeros((draws, n)), np.zeros((draws, n))
    np.add.at(z_big, (rows, idx), 1.0)
    np.add.at(z_small, (rows, idx[:, :b]), 1.0)
    norm_sq = lambda z, size: ((z @ gram) * z).sum(1) / size**2  # noqa: E731
    g2, tr = gns_components(norm_sq(z_small, b), norm_sq(z_big, B), b, B, n=n_fpc)
    se = lambda a: a.std(ddof=1) / math.sqrt(draws)  # noqa: E731
    return (g2.mean(), se(g2)), (tr.mean(), se(tr))


def _per_example(X, y, w):
    return (X @ w - y)[:, None] * X


@pytest.mark.parametrize("n, b, B, replace", [(200, 4, 32, True), (40, 4, 20, False), (200, 4, 32, False)])
def test_uncorrected_estimator_averages_to_expected_components(n, b, B, replace):
    """Tolerance: 4 standard errors of the Monte-Carlo mean (20,000 draws), here 1-4 % of the values."""
    X, y, w, rng = _problem(n)
    (g2_mean, g2_se), (tr_mean, tr_se) = _monte_carlo(_per_example(X, y, w), b, B, replace, None, rng)
    want_g2, want_tr = expected_components(*exact_linreg_noise(X, y, w), b, B, n=None if replace else n)
    assert abs(g2_mean - want_g2) < 4 * g2_se
    assert abs(tr_mean - want_tr) < 4 * tr_se
    assert g2_se < 0.02 * want_g2 and tr_se < 0.02 * want_tr  # the check has teeth


def test_without_replacement_the_finite_population_correction_matters():
    # On 40 examples with B = 20 the uncorrected |G|^2 is off by far more than the sampling error.
    X, y, w, rng = _problem(40)
    (g2_mean, g2_se), _ = _monte_carlo(_per_example(X, y, w), 4, 20, False, None, rng)
    g2, _ = exact_linreg_noise(X, y, w)
    assert abs(g2_mean - g2) > 20 * g2_se


@pytest.fixture(scope="module")
def linreg_data():
    """The linreg problem itself (design section 7), small: 128 samples, 256 features, two spikes."""
    from critbatch.jobs.cell.spec import Cell, DatasetSpec
    from critbatch.jobs.data.datasets import load_task_data

    cell = Cell(dataset=DatasetSpec(name="linreg", options={"n": 128, "d": 256, "spikes": 2, "spike_var": 20.0}),
                model="linear", strategy="oracle", batch_size=8, base_lr=1.0, base_batch=2, epochs=1.0)
    data = load_task_data(cell, "/x")
    X, y = data.train_x.double().numpy(), data.train_y.double().numpy()
    teacher = np.linalg.lstsq(X, y, rcond=None)[0]
    return X, y, teacher


@pytest.mark.parametrize("where, b, B", [(0.0, 4, 32), (0.5, 8, 64), (0.9, 4, 96), (0.99, 16, 96)])
def test_corrected_estimator_matches_exact_linreg_noise(linreg_data, where, b, B):
    """At weights a fraction ``where`` of the way from 0 to the solution (where |G|^2 shrinks much faster than
    tr(Sigma)), batches drawn without replacement: the corrected estimates average to the exact values."""
    X, y, teacher = linreg_data
    w = where * teacher
    exact_g2, exact_tr = exact_linreg_noise(X, y, w)
    rng = np.random.default_rng([int(100 * where), b, B])
    (g2_mean, g2_se), (tr_mean, tr_se) = _monte_carlo(_per_example(X, y, w), b, B, False, len(X), rng)
    assert abs(g2_mean - exact_g2) < 4 * g2_se and abs(tr_mean - exact_tr) < 4 * tr_se
    assert tr_se < 0.02 * exact_tr  # the check has teeth
    # Uncorrected, |G|^2 would be off by tr(Sigma)/(n - 1): beyond the sampling error wherever that is small.
    bias = exact_tr / (len(X) - 1)
    assert bias > 4 * g2_se or where < 0.9


def _trace(steps, g2, tr):
    return NoiseTrace.from_measurements(np.asarray(steps, float), np.asarray(g2, float), np.asarray(tr, float))


def test_b_simple_is_a_ratio_of_sums_over_the_window_ending_at_k():
    # Measured every step; |G|^2 halves at step 101, tr(Sigma) stays 10: B_simple 10 before, 20 after.
    steps = np.arange(1, 201)
    g2 = np.where(steps <= 100, 1.0, 0.5) * (1 + 0.2 * (-1.0) ** steps)  # alternating +-20 % per step
    tr = np.full(200, 10.0)
    trace = _trace(steps, g2, tr)
    w = trace.window_ending(100)  # the last half of 100 steps: 51..100
    assert w.count == 50
    assert b_simple_at([w]).value == pytest.approx(10.0, rel=1e-9)  # sum 500 / sum 50, not mean(10/g2)
    assert b_simple_at([trace.window_ending(200)]).value == pytest.approx(20.0, rel=1e-9)
    # a short crossing widens to the last 20 measurements
    assert trace.window_ending(24).count == 20


def test_unresolved_gradient_is_a_bound_not_nan():
    rng = np.random.default_rng(0)
    steps = np.arange(1, 101)
    g2 = 0.01 + rng.normal(0, 1.0, 100)  # |G|^2 lost in its own noise
    tr = 50.0 + rng.normal(0, 1.0, 100)
    scale = b_simple_at([_trace(steps, g2, tr).window_ending(100)])
    assert scale.bound and math.isfinite(scale.value) and scale.value > 0
    assert scale.hi == math.inf and "> " in scale.text(lambda v: f"{v:.3g}")
    assert math.isnan(b_simple_at([]).value) and b_simple_at([]).text(str) == "not measured"


def test_corrected_components_invert_the_finite_population_norms():
    g2, tr, n, b, B = 0.3, 40.0, 100, 4, 50
    fpc = lambda m: (n - m) / (m * (n - 1))  # noqa: E731
    assert gns_components(g2 + tr * fpc(b), g2 + tr * fpc(B), b, B, n=n) == pytest.approx((g2, tr), rel=1e-12)
    with pytest.raises(ValueError, match="b_big <= n"):
        gns_components(1.0, 1.0, 4, 200, n=100)
