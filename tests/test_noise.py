"""The two-batch-size gradient-noise estimator against exactly known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from critbatch.analysis.noise import (
    b_simple,
    bias_corrected_ema,
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


def _monte_carlo(n: int, b: int, B: int, replace: bool, draws: int = 20000):
    """Mean and standard error of the estimator over many (small, large) batch pairs at fixed weights.

    The small batch is the first b examples of the large one, as with
    micro-batches against their mean.
    """
    X, y, w, rng = _problem(n)
    per_example = (X @ w - y)[:, None] * X
    if replace:
        idx = rng.integers(0, n, size=(draws, B))
    else:
        idx = rng.permuted(np.tile(np.arange(n), (draws, 1)), axis=1)[:, :B]
    g_big = per_example[idx].mean(1)
    g_small = per_example[idx[:, :b]].mean(1)
    g2, tr = gns_components((g_small**2).sum(1), (g_big**2).sum(1), b, B)
    se = lambda a: a.std(ddof=1) / math.sqrt(draws)  # noqa: E731
    return exact_linreg_noise(X, y, w), (g2.mean(), se(g2)), (tr.mean(), se(tr))


@pytest.mark.parametrize("n, b, B, replace", [(200, 4, 32, True), (40, 4, 20, False), (200, 4, 32, False)])
def test_estimator_recovers_exact_values_on_average(n, b, B, replace):
    """Tolerance: 4 standard errors of the Monte-Carlo mean (20,000 draws), here 1-4 % of the values."""
    exact, (g2_mean, g2_se), (tr_mean, tr_se) = _monte_carlo(n, b, B, replace)
    want_g2, want_tr = expected_components(*exact, b, B, n=None if replace else n)
    assert abs(g2_mean - want_g2) < 4 * g2_se
    assert abs(tr_mean - want_tr) < 4 * tr_se
    assert g2_se < 0.02 * want_g2 and tr_se < 0.02 * want_tr  # the check has teeth


def test_without_replacement_the_finite_population_correction_matters():
    # On 40 examples with B = 20 the uncorrected |G|^2 is off by far more than the sampling error.
    (g2, _), (g2_mean, g2_se), _ = _monte_carlo(40, 4, 20, replace=False)
    assert abs(g2_mean - g2) > 20 * g2_se


def test_b_simple_is_the_ratio_of_bias_corrected_emas():
    # Per step (b=1, B=3): |G|^2 = (3*3 - 5)/2 = 2 and (9 - 8)/2 = 0.5;
    # tr(Sigma) = (5 - 3)/(2/3) = 3 and (8 - 3)/(2/3) = 7.5.
    # beta = 0.5: EMA(|G|^2) = (0.25*2 + 0.5*0.5)/0.75 = 1, EMA(tr) = (0.25*3 + 0.5*7.5)/0.75 = 6.
    small, big = [5.0, 8.0], [3.0, 3.0]
    assert b_simple(small, big, 1, 3, beta=0.5) == pytest.approx(6.0)
    # Not the mean of per-step ratios (1.5 and 15 -> 8.25), nor the last ratio unless beta = 0.
    assert b_simple(small, big, 1, 3, beta=0.0) == pytest.approx(15.0)


def test_b_simple_skips_unmeasured_rows_and_handles_degenerate_input():
    assert b_simple([5.0, math.nan, 8.0], [3.0, math.nan, 3.0], 1, 3, beta=0.5) == pytest.approx(6.0)
    assert math.isnan(b_simple([], [], 1, 3))
    assert b_simple([3.0], [3.0], 1, 3) == 0.0  # no noise at all
    assert math.isnan(b_simple([9.0], [3.0], 1, 3))  # |G|^2 = (9 - 9)/2 = 0: undefined


def test_bias_corrected_ema_of_a_constant_is_that_constant():
    np.testing.assert_allclose(bias_corrected_ema([4.0] * 5, beta=0.9), [4.0] * 5)
    with pytest.raises(ValueError, match="beta"):
        bias_corrected_ema([1.0], beta=1.0)
