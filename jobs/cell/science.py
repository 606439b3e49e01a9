"""The rules the trainer and the analysis both apply, each written once here (design section 6).

    crossing(steps, values, eps)      k(m; eps): the first step where a loss curve is <= eps
    lsr_lr(base_lr, m, m0)            the linear scaling rule's step size, eta_0 m / m0

The trainer (critbatch.jobs.train: the stop at the threshold, the LSR
strategy, the linear-approximation step) and the analysis
(critbatch.analysis.compute) import them from here, the contract both may
read, so ``_SUCCESS``'s k and the report's k cannot come from two rules.
Torch-free, like the rest of the cell contract.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def crossing(steps: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray, eps: float) -> float:
    """k(m; eps): the first step at which the curve is <= eps, interpolated in log(loss) from the point before;
    NaN if it never is.

    With i the first point whose value is <= eps (a NaN never is; -inf is) and j the last point before it
    with a finite value (NaN and inf points are skipped), k lies between them where the straight line
    through (s_j, log v_j) and (s_i, log v_i) meets log eps:

        k = s_j + (log v_j - log eps) / (log v_j - log v_i) * (s_i - s_j)

    linear in the loss itself instead when v_i <= 0 or eps <= 0 (no logarithm). With no finite point
    before i, k = s_i. Where this comes from: design section 6 defines k(m; eps) as the first iteration
    with training loss <= eps; between two logged points a loss falling roughly exponentially is a
    straight line in log(loss), so the interpolation is exact for exponential decay.
    """
    v = np.asarray(values, dtype=float)
    s = np.asarray(steps, dtype=float)
    hit = np.flatnonzero(v <= eps)
    if not len(hit):
        return math.nan
    i = int(hit[0])
    j = i - 1
    while j >= 0 and not np.isfinite(v[j]):
        j -= 1
    if j < 0:
        return float(s[i])
    lo, hi = float(v[j]), float(v[i])
    if hi > 0 and eps > 0:
        frac = (math.log(lo) - math.log(eps)) / (math.log(lo) - math.log(hi))
    else:
        frac = (lo - eps) / (lo - hi)
    return float(s[j] + frac * (s[i] - s[j]))


def lsr_lr(base_lr: float, m: int, m0: int) -> float:
    """The linear scaling rule's step size at batch size m: eta(m) = eta_0 * m / m0.

    eta_0 is the step size tuned at the base batch m0. The rule is Goyal et al. (2017)'s, and the LSR
    strategy of the paper (Table 1, section 4.2); the paper also takes it as the step of the
    linear-approximation error at the final weights, w = w* - eta_0 (m / m0) g_m(w*) (section 4.2,
    Figure 2 right). Computed as (eta_0 * m) / m0, the order every SGD cell's logged rates were made in.
    """
    return base_lr * m / m0
