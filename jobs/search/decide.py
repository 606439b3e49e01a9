"""Where to measure next: the batch sizes and seeds that shrink B_crit's interval most for the samples they cost.

Pure functions over the observations the analysis makes of a sweep (one per
seed: k(m; eps), or censored, k > the last step; critbatch.analysis.compute),
fitted by the analysis's own fit (critbatch.analysis.fit.fit_mccandlish), so
the search stops on the interval the report will print.

The rule. Only candidates around the knee count: batch sizes within a factor
KNEE of the current interval [lo, hi] (all of them while there is no upper
bound). For each, the fit predicts what the cell would measure: k(m) =
S_min (1 + B/m), or a censored bound when that is past the cell's epoch
budget; and what it would cost: (1 + confirm) k(m) m samples (the stop
rule's window), or the whole budget. The candidate is added to the
observations at its prediction and the fit redone; its gain is how much the
interval narrows, in log(hi / lo), at the cutoff the interval had before (a
point on the curve adds no scatter; the cutoff falls with every observation
whatever it says). The candidates are taken greedily by gain
per sample, each one's prediction kept for the next, ``count`` at a time and
within the budget left; one that would narrow it by less than MIN_GAIN is
not worth its samples (typically a batch size predicted to run out of budget
before eps, which costs its whole budget to say only that k is larger). A
prediction adds a point on the curve, so it says where a point moves the
interval (its leverage on B), not what the point will be; the search measures
it and fits again.

Why around the knee. Under the model alone the two ends of the interval
disagree most far from the knee (they pivot about it): at m << B, where k =
E_min / m costs E_min samples, and at m >> B, where k = S_min costs the most.
But each end says one number (E_min, S_min), the ladder already measured
both, and a curve that is k = S_min (1 + B/m) only approximately bends at the
knee: the batch sizes there are the ones that decide B when the model is not
exact, and the full grid's answer rests on them as much as on the ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

from critbatch.analysis.fit import (CONFIDENCE, GRID_ABOVE, GRID_BELOW, SEED_SCATTER_FLOOR, Fit, fit_mccandlish,
                                    likelihood_ratio_cutoff)

#: Candidates count within this factor of the interval [lo, hi] of B_crit.
KNEE = 4.0
#: A candidate predicted to narrow the interval by less than this (in log(hi / lo): 2 %) is not worth its samples.
MIN_GAIN = 0.02


@dataclass(frozen=True)
class Observation:
    """One seed at one batch size: k (inf when censored) and, when censored, the last step it logged."""

    batch_size: float
    k: float
    bound: float = math.nan


@dataclass(frozen=True)
class Candidate:
    """A cell the search could run: a batch size at a seed, with its epoch budget in steps."""

    batch_size: int
    seed: int
    budget_steps: int
    kind: str = "batch size"  # "batch size" (not run yet) or "seed" (another seed where one ran)


@dataclass(frozen=True)
class Interval:
    """B_crit and its 95 % interval (lo may be 0, hi inf); NaN when there is no fit."""

    lo: float
    b: float
    hi: float

    @property
    def rel_width(self) -> float:
        """(hi - lo) / B: what ``search.target`` bounds; inf without a finite fit or upper bound."""
        if not (math.isfinite(self.b) and self.b > 0 and math.isfinite(self.hi)):
            return math.inf
        return (self.hi - self.lo) / self.b

    def contains(self, value: float) -> bool:
        return self.lo <= value <= self.hi

    def as_list(self) -> list[float | None]:
        return [_json(self.lo), _json(self.b), _json(self.hi)]


@dataclass(frozen=True)
class Choice:
    """A candidate chosen, with what the fit predicted for it and the interval before and (predicted) after."""

    candidate: Candidate
    predicted_k: float
    censored: bool
    cost: float  # samples
    before: Interval
    after: Interval

    def why(self) -> str:
        c = self.candidate
        what = "k > its budget" if self.censored else f"k ~ {self.predicted_k:.0f} steps"
        return (f"{c.kind} m={c.batch_size} seed {c.seed}: predicted {what}, {self.cost:.0f} samples; "
                f"interval [{_num(self.before.lo)}, {_num(self.before.hi)}] -> about "
                f"[{_num(self.after.lo)}, {_num(self.after.hi)}]")


def fit(observations: list[Observation], confidence: float = CONFIDENCE,
        seed_noise: float = SEED_SCATTER_FLOOR) -> Fit:
    """The analysis's fit of k(m) = S_min (1 + B/m) to ``observations`` (censored ones as bounds), with the seed
    scatter it assumes when there is one seed per batch size (``critbatch analyze --seed-noise``)."""
    return fit_mccandlish([o.batch_size for o in observations], [o.k for o in observations],
                          [o.bound for o in observations], confidence=confidence, seed_noise=seed_noise)


def same_cutoff(n_before: int, n_after: int) -> float:
    """The confidence at which ``n_after`` observations get the likelihood-ratio cutoff that ``n_before`` had.

    A predicted point lies on the curve, so it adds no scatter, and one more observation lowers the cutoff
    by itself: judged at the old cutoff, a point narrows the interval only by what it says about B.
    """
    q = likelihood_ratio_cutoff(n_before)
    dof = max(1, n_after - 2)
    return float(stats.f.cdf(dof * math.expm1(q / n_after), 1, dof))


def interval(f: Fit) -> Interval:
    if not f.ok:
        return Interval(math.nan, math.nan, math.nan)
    return Interval(f.b_lo, f.b_crit, f.b_hi)


def predict(f: Fit, candidate: Candidate, confirm: float) -> tuple[Observation, float]:
    """What ``candidate`` would measure under the fit, and its cost in samples (the stop rule's window included)."""
    m = candidate.batch_size
    k = float(f.k(m))
    if not math.isfinite(k) or k > candidate.budget_steps:
        return Observation(m, math.inf, float(candidate.budget_steps)), float(candidate.budget_steps * m)
    return Observation(m, k), float(min(candidate.budget_steps, math.ceil((1 + confirm) * k)) * m)


def log_width(iv: Interval, batch_sizes: list[float]) -> float:
    """log(hi / lo), with lo and hi clipped to the fit's own grid (0 and inf are its edges)."""
    if not math.isfinite(iv.b):
        return math.inf
    floor, cap = GRID_BELOW * min(batch_sizes), GRID_ABOVE * max(batch_sizes)
    return math.log(min(max(iv.hi, floor), cap) / min(max(iv.lo, floor), cap))


def choose(observations: list[Observation], candidates: list[Candidate], *, count: int, confirm: float,
           budget: float, seed_noise: float = SEED_SCATTER_FLOOR) -> list[Choice]:
    """Up to ``count`` candidates, greedily by the interval's narrowing per sample, their costs within ``budget``.

    Needs a finite fit of ``observations``; returns [] without one (the caller widens the ladder first).
    ``seed_noise``: the report's (so that with one seed per batch size the interval judged here is the one the
    report prints, not the collapsed one the scatter about the fit alone gives).
    """
    obs = list(observations)
    current = fit(obs, seed_noise=seed_noise)
    if not current.ok:
        return []
    left = around_knee(candidates, interval(current))
    n0 = current.observations  # every prediction is judged at the cutoff of the observations made
    chosen: list[Choice] = []
    while left and len(chosen) < count:
        before = interval(current)
        ms = [o.batch_size for o in obs] + [c.batch_size for c in left]
        width = log_width(before, ms)
        best: tuple[float, Choice, Fit, Observation] | None = None
        for cand in left:
            seen, cost = predict(current, cand, confirm)
            if cost > budget:
                continue
            trial = fit(obs + [seen], confidence=same_cutoff(n0, current.observations + 1), seed_noise=seed_noise)
            after = interval(trial)
            gain = width - log_width(after, ms) if trial.ok else -math.inf
            if not gain >= MIN_GAIN:
                continue
            score = gain / cost
            if best is None or score > best[0]:
                best = (score, Choice(cand, seen.k if math.isfinite(seen.k) else math.inf,
                                      not math.isfinite(seen.k), cost, before, after), trial, seen)
        if best is None:
            break
        _, choice, current, seen = best
        chosen.append(choice)
        obs.append(seen)
        budget -= choice.cost
        left = [c for c in left if c != choice.candidate]
    return chosen


def around_knee(candidates: list[Candidate], iv: Interval) -> list[Candidate]:
    """The candidates within a factor KNEE of [lo, hi]; all of them when none is."""
    lo, hi = max(iv.lo, 0.0) / KNEE, iv.hi * KNEE
    near = [c for c in candidates if lo <= c.batch_size <= hi]
    return near or list(candidates)


def ladder(batch_sizes: list[int], factor: float) -> list[int]:
    """The first batch sizes: from the smallest, the grid's nearest (in log) to every ``factor`` x.

    The largest batch size is left to the rule (``choose``) when three or more are below it: it is the
    dearest in samples, and with a small B it is past the point where a cell reaches eps within its
    budget, so it would cost its whole budget to say only that k > the budget.
    """
    ms = sorted(set(batch_sizes))
    if not ms:
        return []
    out = [ms[0]]
    target = ms[0] * factor
    while target < ms[-1] * math.sqrt(factor):
        nearest = min(ms, key=lambda m: abs(math.log(m / target)))
        if nearest > out[-1]:
            out.append(nearest)
        target *= factor
    if out[-1] != ms[-1]:
        out.append(ms[-1])
    if len(out) > 3:
        out.pop()
    return out


def _num(v: float) -> str:
    if not math.isfinite(v):
        return "inf" if v > 0 else "-"
    return f"{v:.3g}"


def _json(v: float) -> float | str | None:
    """A bound as JSON: a number, "inf" (not bounded above by the data), or null (no fit)."""
    if math.isnan(v):
        return None
    return float(v) if math.isfinite(v) else "inf"
