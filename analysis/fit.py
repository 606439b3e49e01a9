"""McCandlish et al.'s k(m) = S_min (1 + B_crit / m), fitted with censored observations and a profile interval.

The model, in log space (design section 6): every seed's steps to threshold is
one observation,

    log k_i = log S_min + log(1 + B / m_i) + sigma * z_i,      z_i ~ N(0, 1),   B >= 0,

so a seed that is 15 % slower counts the same at every batch size, and the
smallest batch sizes (the largest k) do not dominate as they do in a least-
squares fit of k against 1/m. A seed whose budget ran out before it reached
eps (censored: k > its last step c_i) enters through P(log k_i > log c_i), a
Tobit term, so a budget that cuts off the largest batch sizes bounds the fit
from below instead of removing the points that carry B.

For a fixed B the model is a censored regression with a known offset in two
parameters, concave in Olsen's (1978) parameters gamma = 1/sigma, delta =
log S_min / sigma; it is solved by Newton's method at every B of a log-spaced
grid at once, which gives the profile log-likelihood l_p(B). The estimate is
its maximum; the 95 % interval is {B : 2 (l_p(B_hat) - l_p(B)) <= q}, with q the
small-sample calibration of the likelihood ratio of a Gaussian regression,
q = n log(1 + F_{1, n-2}(0.95) / (n - 2)) (the chi-square quantile 3.84 under-
covers with the 10-30 observations of a sweep; see the measured coverage in
tests/test_analysis_fit.py). With one seed per batch size sigma, and so the
interval, comes from the scatter across batch sizes about the fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from critbatch.jobs.cell.analysis_args import SEED_NOISE

#: Grid of the profile: B from this fraction of the smallest batch size to this multiple of the largest.
GRID_BELOW, GRID_ABOVE, GRID_POINTS = 1e-3, 1e3, 240
CONFIDENCE = 0.95
#: Coverage of the nominal 95 % interval, measured by ``benchmarks/bench_fit_coverage.py`` over 1000 synthetic
#: sweeps per seed count (analysis.synthetic.censored_sweep: 13 batch sizes 4..16384, 15 % lognormal seed
#: noise, the largest batch sizes censored by the budget); the report's methods section quotes it. The
#: chi-square cutoff 3.84 gave 0.87 with one seed and 0.92 with two or three.
MEASURED_COVERAGE = {1: 0.947, 2: 0.942, 3: 0.946, 5: 0.944}
#: Leave-one-seed-out coverage on real training (tests/data/seed_noise.json, analysis.seednoise.coverage; checked
#: by tests/test_seed_noise.py): per number of seeds, intervals holding the all-seed estimate / intervals fitted.
MEASURED_REAL_COVERAGE = {1: (52, 52), 3: (327, 340)}
#: The seed-to-seed scatter of log k measured on real training (benchmarks/bench_seed_noise.py, docs/seed-noise.md):
#: the floor of sigma when one seed per batch size cannot measure it (``critbatch analyze --seed-noise``).
SEED_SCATTER_FLOOR = SEED_NOISE
#: The fewest batch sizes with an uncensored observation for a fit (three parameters).
MIN_BATCH_SIZES = 3
_NEWTON_STEPS = 40
#: The scatter is floored here (1e-6 in log k): noise-free data has sigma = 0, where the likelihood has no maximum.
_GAMMA_MAX = 1e6


@dataclass
class Fit:
    """The fit of one speedup curve; ``problem`` says in words why there is none."""

    b_crit: float = math.nan
    s_min: float = math.nan
    sigma: float = math.nan  # scatter of log k about the fit
    b_lo: float = math.nan  # the interval of B_crit; b_hi = inf: not bounded above by the data
    b_hi: float = math.nan
    s_lo: float = math.nan  # S_min over the B interval (S_min falls as B rises)
    s_hi: float = math.nan
    observations: int = 0
    censored: int = 0
    batch_sizes: int = 0
    seeds_per_batch: float = 0.0
    one_seed: bool = False  # one seed per batch size: the interval is indicative (the report says so)
    floor: float = 0.0  # the floor of sigma the fit used (0: none)
    method: str = ""
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def floored(self) -> bool:
        """Whether the scatter sits at its floor (the data alone would have given a smaller one)."""
        return self.floor > 0 and math.isfinite(self.sigma) and self.sigma <= self.floor * (1 + 1e-6)

    def k(self, m) -> np.ndarray:
        return self.s_min * (1.0 + self.b_crit / np.asarray(m, dtype=float))

    def e_min(self) -> float:
        return self.s_min * self.b_crit


def fit_mccandlish(m, k, bound, *, confidence: float = CONFIDENCE, seed_noise: float = 0.0) -> Fit:
    """Fit k(m) = S_min (1 + B/m) to per-seed observations.

    ``m``, ``k``, ``bound``: one entry per seed; ``k`` finite where the seed
    reached eps, else the seed is censored with ``k > bound``.

    ``seed_noise``: the seed-to-seed scatter of log k to assume when the data
    cannot measure it, with one seed per batch size: the fit's scatter is then
    not allowed below it (the profile is taken over sigma >= seed_noise). With
    one seed, a few uncensored batch sizes fix S_min and B_crit almost exactly
    and leave no room for the scatter, which then comes out near 0 and
    collapses the interval (measured on real training: docs/seed-noise.md).
    """
    m = np.asarray(m, dtype=float)
    k = np.asarray(k, dtype=float)
    bound = np.asarray(bound, dtype=float)
    reached = np.isfinite(k) & (k > 0)
    cens = ~reached & np.isfinite(bound) & (bound > 0)
    fit = Fit(observations=int(reached.sum() + cens.sum()), censored=int(cens.sum()))
    ms_reached = np.unique(m[reached])
    fit.batch_sizes = len(np.unique(m[reached | cens]))
    fit.seeds_per_batch = (reached.sum() + cens.sum()) / max(1, fit.batch_sizes)
    if len(ms_reached) < MIN_BATCH_SIZES:
        fit.problem = (f"no fit: only {len(ms_reached)} batch size(s) reached the threshold "
                       f"(at least {MIN_BATCH_SIZES} are needed for S_min, B_crit and the scatter)")
        return fit
    y_u, m_u = np.log(k[reached]), m[reached]
    y_c, m_c = np.log(bound[cens]), m[cens]
    n = len(y_u) + len(y_c)
    one_seed = fit.seeds_per_batch <= 1.0
    floor = seed_noise if one_seed else 0.0
    fit.one_seed, fit.floor = one_seed, floor
    fit.method = ("profile likelihood; one seed per batch size, so the scatter comes from the spread across "
                  "batch sizes about the fit" if one_seed else
                  "profile likelihood; the scatter from seeds and batch sizes about the fit")
    if floor > 0:
        fit.method += (f", not below {floor:g} in log k (the seed-to-seed scatter measured on real training: "
                       "one seed cannot measure its own)")

    slope = np.polyfit(np.log(m_u), y_u, 1)[0]
    if slope > 0 and _steps_rise(m_u, y_u):
        fit.problem = (f"no fit: the steps to threshold rise with the batch size (by {100 * (2 ** slope - 1):.0f} % "
                       f"per doubling), so larger batches do not save steps and k = S_min (1 + B/m) does not apply")
        return fit

    grid = np.concatenate([[0.0], np.geomspace(GRID_BELOW * m.min(), GRID_ABOVE * m.max(), GRID_POINTS)])
    gamma_max = 1.0 / floor if floor > 0 else _GAMMA_MAX
    data = (y_u, m_u, y_c, m_c, gamma_max)
    prof = _profile(grid, *data)[0]
    i = int(np.nanargmax(prof))
    b_hat, a_hat, s_hat, l_max = _refine(grid, prof, i, *data)
    if s_hat <= 0 or not math.isfinite(l_max):
        fit.problem = "no fit: the observations lie exactly on the curve, or the likelihood has no maximum"
        return fit
    q = _cutoff(n, confidence)
    fit.b_crit, fit.s_min, fit.sigma = b_hat, math.exp(a_hat), s_hat
    if i == len(grid) - 1 or b_hat >= grid[-2]:
        fit.b_crit = math.inf
        fit.problem = (f"no finite fit: the steps fall as 1/m over every batch size measured (perfect scaling), "
                       f"so B_crit lies above the largest batch size, {m.max():g}")
    fit.b_lo, fit.b_hi = _interval(grid, prof, l_max - q / 2, b_hat, *data)
    if math.isfinite(fit.b_crit):
        fit.s_lo = math.exp(_profile(np.array([fit.b_hi]), *data)[1][0]) \
            if math.isfinite(fit.b_hi) else 0.0
        fit.s_hi = math.exp(_profile(np.array([fit.b_lo]), *data)[1][0])
    return fit


def _steps_rise(m_u: np.ndarray, y_u: np.ndarray) -> bool:
    """Whether log k rises with log m by more than its scatter allows (a one-sided t-test at 95 %)."""
    x = np.log(m_u)
    if len(np.unique(x)) < 3:
        return False
    res = stats.linregress(x, y_u)
    dof = len(x) - 2
    return bool(res.stderr > 0 and res.slope / res.stderr > stats.t.ppf(0.95, dof))


def likelihood_ratio_cutoff(n: int, confidence: float = CONFIDENCE) -> float:
    """The cut on 2 (l_p(B_hat) - l_p(B)) that the interval of ``n`` observations uses (see the module docstring)."""
    return _cutoff(n, confidence)


def _cutoff(n: int, confidence: float) -> float:
    """The likelihood-ratio cutoff: n log(1 + F_{1,n-2} / (n-2)), the exact one of a Gaussian regression."""
    dof = max(1, n - 2)
    return n * math.log1p(stats.f.ppf(confidence, 1, dof) / dof)


def _profile(grid: np.ndarray, y_u, m_u, y_c, m_c, gamma_max: float = _GAMMA_MAX
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(l_p(B), log S_min(B), sigma(B)) at every B of ``grid``: Newton's method in (gamma, delta), all B at once,
    with gamma = 1 / sigma at most ``gamma_max``."""
    x_u = np.log1p(grid[:, None] / m_u[None, :])  # (G, n_u)
    x_c = np.log1p(grid[:, None] / m_c[None, :])
    u = y_u[None, :] - x_u  # log k minus the offset
    c = y_c[None, :] - x_c
    n_u = u.shape[1]
    # Start: least squares on the uncensored points.
    a0 = u.mean(1)
    s0 = np.maximum(u.std(1), 1e-3)
    gamma = np.minimum(1.0 / s0, gamma_max)
    delta = a0 * gamma
    ll = _loglik(gamma, delta, u, c, n_u)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _newton(gamma, delta, ll, u, c, n_u, gamma_max)


def _newton(gamma, delta, ll, u, c, n_u, gamma_max):
    for _ in range(_NEWTON_STEPS):
        r = gamma[:, None] * u - delta[:, None]
        sc = delta[:, None] - gamma[:, None] * c
        lam = np.exp(stats.norm.logpdf(sc) - special.log_ndtr(sc))
        w = lam * (sc + lam)
        g_g = n_u / gamma - (r * u).sum(1) - (lam * c).sum(1)
        g_d = r.sum(1) + lam.sum(1)
        h_gg = -n_u / gamma ** 2 - (u * u).sum(1) - (w * c * c).sum(1)
        h_gd = u.sum(1) + (w * c).sum(1)
        h_dd = -n_u - w.sum(1)
        det = h_gg * h_dd - h_gd ** 2
        step_g = -(h_dd * g_g - h_gd * g_d) / det
        step_d = -(-h_gd * g_g + h_gg * g_d) / det
        # At the floor of the scatter with the likelihood still rising in gamma: Newton in delta alone.
        capped = (gamma >= gamma_max * (1 - 1e-12)) & (g_g > 0)
        step_g = np.where(capped, 0.0, step_g)
        step_d = np.where(capped, -g_d / h_dd, step_d)
        t = np.ones_like(gamma)
        for _ in range(30):  # halve the step until the likelihood does not fall and gamma stays positive
            ng, nd = np.minimum(gamma + t * step_g, gamma_max), delta + t * step_d
            good = (ng > 0) & np.isfinite(nd)
            nll = np.where(good, _loglik(np.where(good, ng, 1.0), np.where(good, nd, 0.0), u, c, n_u), -np.inf)
            bad = ~(nll >= ll - 1e-12 * np.maximum(1.0, np.abs(ll)))
            if not bad.any():
                break
            t = np.where(bad, t / 2, t)
        ok = nll >= ll - 1e-12 * np.maximum(1.0, np.abs(ll))
        gamma, delta = np.where(ok, ng, gamma), np.where(ok, nd, delta)
        done = np.all(np.abs(nll - ll) < 1e-10 * np.maximum(1.0, np.abs(ll)))
        ll = np.where(ok, nll, ll)
        if done:
            break
    return ll, delta / gamma, 1.0 / gamma


def _loglik(gamma, delta, u, c, n_u) -> np.ndarray:
    r = gamma[:, None] * u - delta[:, None]
    cens = special.log_ndtr(delta[:, None] - gamma[:, None] * c).sum(1) if c.shape[1] else 0.0
    return n_u * np.log(gamma) - 0.5 * (r * r).sum(1) + cens


def _at(b: float, *data) -> float:
    return float(_profile(np.array([b]), *data)[0][0])


def _refine(grid, prof, i, *data) -> tuple[float, float, float, float]:
    """The maximum of the profile near grid point i (bounded scalar search in log B)."""
    if 0 < i < len(grid) - 1:
        lo, hi = grid[i - 1], grid[i + 1]
        lo = lo if lo > 0 else grid[1] / 10
        res = optimize.minimize_scalar(lambda t: -_at(math.exp(t), *data),
                                       bounds=(math.log(lo), math.log(hi)), method="bounded",
                                       options={"xatol": 1e-6})
        b = math.exp(res.x) if -res.fun > prof[i] else grid[i]
    else:
        b = grid[i]
    ll, a, s = _profile(np.array([b]), *data)
    return b, float(a[0]), float(s[0]), float(ll[0])


def _interval(grid, prof, level, b_hat, *data) -> tuple[float, float]:
    """Where the profile crosses ``level`` below and above B_hat (0 and inf where it never does)."""
    outside = prof < level
    below = np.flatnonzero(outside & (grid < b_hat))
    above = np.flatnonzero(outside & (grid > b_hat))

    def root(a: float, b: float) -> float:
        return float(optimize.brentq(lambda x: _at(x, *data) - level, a, b, xtol=1e-9, rtol=1e-7))

    lo = 0.0 if not len(below) else root(grid[below[-1]], min(grid[below[-1] + 1], b_hat))
    hi = math.inf if not len(above) else root(max(grid[above[0] - 1], b_hat), grid[above[0]])
    return lo, hi


def censored_log_mean(logs: np.ndarray, log_bounds: np.ndarray, sigma: float) -> float:
    """The mean of log k at one batch size from reached seeds (``logs``) and censored ones (``log k > bound``).

    With every seed reached it is their mean (the log of the geometric mean);
    censored seeds pull it up through the same normal model, with the group's
    scatter ``sigma``. NaN without a reached seed, or with censored seeds and
    no scatter (no fit).
    """
    logs = np.asarray(logs, dtype=float)
    log_bounds = np.asarray(log_bounds, dtype=float)
    if not len(logs):
        return math.nan
    if not len(log_bounds):
        return float(logs.mean())
    if not sigma > 0:  # no scatter to weigh the bounds with: the batch size counts as censored
        return math.nan

    def neg(mu: float) -> float:
        return float(0.5 * (((logs - mu) / sigma) ** 2).sum() - special.log_ndtr((mu - log_bounds) / sigma).sum())

    top = max(logs.max(), log_bounds.max()) + 10 * sigma
    return float(optimize.minimize_scalar(neg, bounds=(logs.min() - 10 * sigma, top), method="bounded",
                                          options={"xatol": 1e-9}).x)
