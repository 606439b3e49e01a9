"""The gradient noise scale of McCandlish et al. (2018), "An Empirical Model of Large-Batch Training".

A cell measures, at the same weights, the squared norm of the gradient of a
small batch b and of a large batch B (micro-batches against their mean, or one
data-parallel rank against the all-reduced gradient) and logs both
(``noise_g_small_sq``, ``noise_g_big_sq`` in the steps table). For a batch of b
examples drawn independently,

    E |G_b|^2 = |G|^2 + tr(Sigma) / b                              (McCandlish et al., appendix A)

where G is the true gradient and Sigma the per-example gradient covariance.
Two batch sizes give two equations in the two unknowns (design section 6):

    |G|^2     ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

Each single estimate is unbiased but very noisy (and may be negative), so the
simple noise scale B_simple = tr(Sigma) / |G|^2 is formed from smoothed
estimates: the ratio of two exponential moving averages, never the average of
per-step ratios (a ratio of noisy quantities is biased).

On the least-squares problem ``linreg`` both quantities follow exactly from
the data (:func:`exact_linreg_noise`), which is how the estimator is checked.
"""

from __future__ import annotations

import math
from typing import Union

import numpy as np

ArrayLike = Union[float, np.ndarray, "list[float]"]


def gns_components(g_small_sq: ArrayLike, g_big_sq: ArrayLike, b_small: ArrayLike,
                   b_big: ArrayLike) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Unbiased estimates ``(|G|^2, tr(Sigma))`` from |G_b|^2 and |G_B|^2 (design section 6).

    Works elementwise on arrays (one value per measured step) or on floats;
    floats in, floats out. Requires ``b_small < b_big``.
    """
    gs, gb = np.asarray(g_small_sq, dtype=np.float64), np.asarray(g_big_sq, dtype=np.float64)
    bs, bb = np.asarray(b_small, dtype=np.float64), np.asarray(b_big, dtype=np.float64)
    if np.any(bs >= bb) or np.any(bs <= 0):
        raise ValueError(f"gradient noise: need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    g2 = (bb * gb - bs * gs) / (bb - bs)
    trace_sigma = (gs - gb) / (1.0 / bs - 1.0 / bb)
    if g2.ndim == 0:
        return float(g2), float(trace_sigma)
    return g2, trace_sigma


def bias_corrected_ema(values: ArrayLike, beta: float = 0.95) -> np.ndarray:
    """Adam-style EMA: m_t = beta m_{t-1} + (1 - beta) x_t, m_0 = 0, reported as m_t / (1 - beta^t).

    The correction removes the pull towards the zero start, so early values are
    averages of what was seen rather than shrunken towards 0.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"gradient noise: EMA beta must be in [0, 1), got {beta}")
    x = np.asarray(values, dtype=np.float64).ravel()
    out = np.empty_like(x)
    m = 0.0
    for t, value in enumerate(x, start=1):
        m = beta * m + (1.0 - beta) * value
        out[t - 1] = m / (1.0 - beta**t)
    return out


def b_simple(g_small_sq: ArrayLike, g_big_sq: ArrayLike, b_small: ArrayLike, b_big: ArrayLike,
             beta: float = 0.95) -> float:
    """B_simple = EMA(tr Sigma) / EMA(|G|^2) at the end of a sequence of measurements.

    The inputs are sequences in step order (the measured rows of a cell's steps
    table); rows where either squared norm is missing (NaN) are skipped. The
    bias correction is the same factor for both averages, so it cancels in the
    ratio; it is kept so the two averages are meaningful on their own. Returns
    NaN for an empty sequence or when the smoothed |G|^2 is not positive (the
    noise scale is then undefined: the gradient signal is lost in the noise).
    """
    gs = np.atleast_1d(np.asarray(g_small_sq, dtype=np.float64))
    gb = np.atleast_1d(np.asarray(g_big_sq, dtype=np.float64))
    bs = np.broadcast_to(np.asarray(b_small, dtype=np.float64), gs.shape)
    bb = np.broadcast_to(np.asarray(b_big, dtype=np.float64), gs.shape)
    keep = np.isfinite(gs) & np.isfinite(gb)
    if not keep.any():
        return math.nan
    g2, trace_sigma = gns_components(gs[keep], gb[keep], bs[keep], bb[keep])
    ema_g2 = bias_corrected_ema(g2, beta)[-1]
    ema_trace = bias_corrected_ema(trace_sigma, beta)[-1]
    if ema_g2 <= 0.0:
        return math.nan
    return float(ema_trace / ema_g2)


def exact_linreg_noise(X, y, w) -> tuple[float, float]:
    """Exact ``(|G|^2, tr(Sigma))`` of the loss 0.5 (x.w - y)^2 over the data set (X, y) at weights w.

    The per-example gradient is g_i = (x_i.w - y_i) x_i; G is their mean and
    Sigma their covariance over the n examples (normalised by n: the
    covariance of one example drawn uniformly from the data). Accepts numpy
    arrays or torch tensors; computed in float64.

    For batches drawn *without* replacement (one epoch's permutation, as the
    train loop does) the two-batch estimator averages to slightly different
    values; :func:`expected_components` gives them.
    """
    X, y, w = (_to_numpy(a) for a in (X, y, w))
    residual = X @ w - y  # (n,)
    per_example = residual[:, None] * X  # (n, d): row i is g_i
    grad = per_example.mean(axis=0)
    g2 = float(grad @ grad)
    centred = per_example - grad
    trace_sigma = float(np.einsum("ij,ij->", centred, centred) / X.shape[0])
    return g2, trace_sigma


def expected_components(g2: float, trace_sigma: float, b_small: int, b_big: int,
                        n: int | None = None) -> tuple[float, float]:
    """What :func:`gns_components` averages to, given the exact ``|G|^2`` and ``tr(Sigma)``.

    ``n=None``: examples drawn independently (with replacement): the estimator
    is unbiased, the result is ``(g2, trace_sigma)``. With ``n`` (drawn without
    replacement from n examples, the small batch a subset of the large one or
    not) the finite-population correction gives E|G_b|^2 = |G|^2 +
    tr(Sigma) (n - b) / (b (n - 1)), hence ``(g2 - trace_sigma / (n - 1),
    trace_sigma n / (n - 1))``.
    """
    if n is None:
        return g2, trace_sigma
    if not b_small < b_big <= n:
        raise ValueError(f"gradient noise: need b_small < b_big <= n, got {b_small}, {b_big}, {n}")
    return g2 - trace_sigma / (n - 1), trace_sigma * n / (n - 1)


def _to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)
