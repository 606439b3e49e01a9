"""The gradient noise scale of McCandlish et al. (2018), "An Empirical Model of Large-Batch Training".

A cell measures, at the same weights, the squared norm of the gradient of a
small batch b and of a large batch B (micro-batches against their mean, or one
data-parallel rank against the all-reduced gradient) and logs both
(``noise_g_small_sq``, ``noise_g_big_sq`` in the steps table). Batches are
drawn without replacement from the n training examples (one permutation per
epoch), so with the finite-population correction (design section 6)

    E |G_b|^2 = |G|^2 + tr(Sigma) (n - b) / (b (n - 1))

where G is the true gradient and Sigma the per-example gradient covariance
(normalised by n). Two batch sizes give two equations in the two unknowns:

    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B) * (n - 1) / n
    |G|^2     ~ |G_B|^2 - tr(Sigma) (n - B) / (B (n - 1))

(without the correction, the estimates average to |G|^2 - tr(Sigma)/(n - 1)
and tr(Sigma) n/(n - 1): on 512 examples an error of tr(Sigma)/511 in |G|^2,
which late in training is larger than |G|^2 itself).

Each single estimate is unbiased but noisy (and may be negative), so the
simple noise scale B_simple = tr(Sigma) / |G|^2 is formed as a ratio of sums
over a window of measurements, never the mean of per-step ratios (a ratio of
noisy quantities is biased). It is read where it means something: over a
window ending where a cell crosses the threshold eps (:func:`b_simple_at`),
beside B_crit(eps). A window whose summed |G|^2 is not clearly positive gives
a lower bound on B_simple, not a NaN.

On the least-squares problem ``linreg`` both quantities follow exactly from
the data (:func:`exact_linreg_noise`), which is how the estimator is checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Union

import numpy as np

ArrayLike = Union[float, np.ndarray, "list[float]"]

#: B_simple(eps) of a cell: the measurements in the last half of its steps to eps ...
WINDOW_FRACTION = 0.5
#: ... widened, where that holds fewer, to its last this many measurements.
WINDOW_MIN_MEASUREMENTS = 20
#: |G|^2 counts as resolved when its window mean is this many standard errors above zero; else a bound.
RESOLVED_SE = 2.0


def gns_components(g_small_sq: ArrayLike, g_big_sq: ArrayLike, b_small: ArrayLike, b_big: ArrayLike,
                   n: ArrayLike | None = None) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Unbiased estimates ``(|G|^2, tr(Sigma))`` from |G_b|^2 and |G_B|^2.

    ``n``: the number of examples the batches are drawn from without
    replacement (finite-population correction); None: drawn independently.
    Works elementwise on arrays (one value per measured step) or on floats;
    floats in, floats out. Requires ``b_small < b_big`` (``<= n``).
    """
    gs, gb = np.asarray(g_small_sq, dtype=np.float64), np.asarray(g_big_sq, dtype=np.float64)
    bs, bb = np.asarray(b_small, dtype=np.float64), np.asarray(b_big, dtype=np.float64)
    if np.any(bs >= bb) or np.any(bs <= 0):
        raise ValueError(f"gradient noise: need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    nn = None if n is None else np.asarray(n, dtype=np.float64)
    if nn is not None and np.any(bb > nn):
        raise ValueError(f"gradient noise: need b_big <= n, got b_big={b_big}, n={n}")
    # A diverged step logs infinite norms: its estimates are NaN (skipped downstream), not a warning.
    with np.errstate(invalid="ignore", over="ignore"):
        trace_sigma = (gs - gb) / (1.0 / bs - 1.0 / bb)
        if nn is None:
            g2 = (bb * gb - bs * gs) / (bb - bs)
        else:
            trace_sigma = trace_sigma * (nn - 1.0) / nn
            g2 = gb - trace_sigma * (nn - bb) / (bb * (nn - 1.0))
    if g2.ndim == 0:
        return float(g2), float(trace_sigma)
    return g2, trace_sigma


@dataclass
class NoiseTrace:
    """A cell's gradient-noise estimates as running sums over its measured steps.

    ``sums[:, j]`` holds, over the measurements up to and including
    ``steps[j]``: count, sum |G|^2, sum |G|^2 squared, sum tr(Sigma), sum
    tr(Sigma) squared. Kept at a log-spaced subset of the measured steps (the
    loader thins them), so a window's sums are differences of two
    interpolated columns.
    """

    steps: np.ndarray
    sums: np.ndarray  # (5, len(steps))

    @classmethod
    def from_measurements(cls, steps, g2, trace_sigma, keep: np.ndarray | None = None) -> "NoiseTrace":
        g2, tr = np.asarray(g2, dtype=float), np.asarray(trace_sigma, dtype=float)
        rows = np.vstack([np.ones_like(g2), g2, g2 * g2, tr, tr * tr])
        sums = np.cumsum(rows, axis=1)
        steps = np.asarray(steps, dtype=float)
        if keep is not None:
            steps, sums = steps[keep], sums[:, keep]
        return cls(steps, sums)

    def __len__(self) -> int:
        return int(self.sums[0, -1]) if self.sums.shape[1] else 0

    def _at(self, step: float) -> np.ndarray:
        """The sums over measurements at steps <= ``step`` (interpolated between kept steps)."""
        if step < self.steps[0]:
            return np.zeros(5)
        return np.array([np.interp(step, self.steps, row) for row in self.sums])

    def window_ending(self, end: float) -> "NoiseWindow | None":
        """The window of :func:`b_simple_at`: the last half of the steps to ``end``, widened to 20 measurements."""
        if not self.sums.shape[1] or end < self.steps[0]:
            return None
        total = self._at(end)
        part = total - self._at(end * (1 - WINDOW_FRACTION))
        if part[0] < WINDOW_MIN_MEASUREMENTS:
            # Count back WINDOW_MIN_MEASUREMENTS measurements (or to the first one).
            start_count = max(0.0, total[0] - WINDOW_MIN_MEASUREMENTS)
            start = float(np.interp(start_count, self.sums[0], self.steps)) if start_count > 0 else -math.inf
            part = total - (self._at(start) if math.isfinite(start) else np.zeros(5))
        return NoiseWindow(*part)


@dataclass
class NoiseWindow:
    """Sums over one window of measurements."""

    count: float
    g2: float
    g2_sq: float
    trace: float
    trace_sq: float

    def mean_se(self, total: float, total_sq: float) -> tuple[float, float]:
        n = self.count
        mean = total / n
        var = max(0.0, (total_sq - total * total / n) / (n - 1)) if n > 1 else math.inf
        return mean, math.sqrt(var / n)


@dataclass
class NoiseScale:
    """B_simple over the windows of several cells: the ratio of the pooled window means.

    ``bound``: |G|^2 was not resolved (its pooled mean less than 2 standard
    errors above 0), and ``value`` is then a lower bound, tr(Sigma) over
    |G|^2's upper limit. ``lo``/``hi``: the range from |G|^2 +- 2 standard
    errors (``hi`` = inf when the lower limit is <= 0).
    """

    value: float
    lo: float
    hi: float
    bound: bool
    cells: int
    measurements: int
    g2: float
    trace: float

    def text(self, fmt) -> str:
        if not self.cells:
            return "not measured"
        if self.bound:
            return f"> {fmt(self.value)} (‖G‖² not resolved; {self.cells} cells)"
        hi = "∞" if not math.isfinite(self.hi) else fmt(self.hi)
        return f"{fmt(self.value)} [{fmt(self.lo)}, {hi}] ({self.cells} cells)"


def b_simple_at(windows: Iterable[NoiseWindow]) -> NoiseScale:
    """B_simple from the windows ending where cells cross eps.

    A ratio of sums, not a mean of ratios: tr(Sigma) and |G|^2 are each
    pooled over the cells' window means, weighted by the precision of each
    cell's |G|^2 (1 / its standard error squared), so a cell of small
    batches, whose two-batch estimate of |G|^2 is noisy, does not drown the
    cells that resolve it. |G|^2's pooled standard error follows from the
    same weights.
    """
    ws = [w for w in windows if w is not None and w.count >= 2]
    if not ws:
        return NoiseScale(math.nan, math.nan, math.nan, False, 0, 0, math.nan, math.nan)
    g2s = np.array([w.mean_se(w.g2, w.g2_sq) for w in ws])
    trs = np.array([w.mean_se(w.trace, w.trace_sq)[0] for w in ws])
    se = g2s[:, 1]
    exact = se <= 1e-12 * np.abs(g2s[:, 0]).max()
    weights = exact.astype(float) if exact.any() else 1.0 / se ** 2
    weights = weights / weights.sum()
    g2 = float(weights @ g2s[:, 0])
    g2_se = 0.0 if exact.any() else float(math.sqrt(weights ** 2 @ se ** 2))
    trace = float(weights @ trs)
    count = int(sum(w.count for w in ws))
    upper, lower = g2 + RESOLVED_SE * g2_se, g2 - RESOLVED_SE * g2_se
    if not lower > 0:
        value = trace / upper if upper > 0 else math.inf
        return NoiseScale(value, value, math.inf, True, len(ws), count, g2, trace)
    return NoiseScale(trace / g2, trace / upper, trace / lower, False, len(ws), count, g2, trace)


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
    """What :func:`gns_components` *without* ``n`` averages to, given the exact ``|G|^2`` and ``tr(Sigma)``.

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
