"""Compute: the science of design section 6, as pure functions over cell summaries and tables.

Tables are lists of flat dicts (one dict a row), written to CSV as they are.

Definitions, stated once (the report repeats them):

- The training-loss curve of a cell is its train-split evaluations, else
  the running mean of its minibatch losses (window min(W, a quarter of the
  steps so far), placed at the window's centre). A group uses one
  source for all its cells (the two differ systematically): evaluations when
  at least half of its cells have them; a cell without the group's source
  has no curve ("no data").
- k(m; eps): the first step at which the curve is <= eps, interpolated
  between the two logged points that bracket the crossing, linearly in
  log(loss) (critbatch.jobs.cell.science.crossing, the rule the trainer's
  stop at the threshold applies too). A cell whose curve never gets there
  is *censored*: k > the last step it logged. A cell still running (no ``_SUCCESS``) counts only once it
  has crossed eps (a crossing is final; not having crossed yet is not). A
  cell that stopped at its own threshold (status ``reached``, a batch-size
  search's) counts like a finished one for every eps its curve crossed, and
  not at all for a lower one (it stopped; it was not censored by a budget).
- Default threshold (paper 4.3): the lower quartile (numpy's linear
  percentile) of the loss values the largest batch size reaches over its
  run, evenly weighted in iterations (the curve interpolated onto an even
  step grid), all seeds and trials pooled (whole runs only: done or
  diverged, never a cell stopped at a threshold); taken from the largest batch size
  whose cell finished and learned (see :func:`default_threshold`). The
  strategies of one problem share it (the rule applied to all their cells),
  so their speedup curves are comparable. Thresholds along the run: the same
  rule at the quantiles ``ALONG_RUN``.
- Several values of a metaparameter (base_lr, momentum) at one batch size are
  trials; per batch size the trial with the fewest mean steps over its seeds
  wins (Shallue et al.'s steps-to-result), and its seeds give k(m).
- k(m) is the geometric mean over seeds; seeds that never reached eps enter
  as bounds (analysis.fit.censored_log_mean); a batch size none of whose
  seeds reached eps is censored (k only bounded below).
- Speedup s(m) = k(m_0) / k(m), m_0 the group's smallest batch size that
  reached eps; efficiency e(m) = s(m) m_0 / m.
- Regimes (paper 1): linear from m_0 while e >= 0.8; stagnation from the
  first larger batch size whose speedup grew by less than 10 % per doubling
  of m (or that never reached eps); diminishing returns in between.
- Critical batch size, the headline: McCandlish et al.'s B_crit of k(m) =
  S_min (1 + B_crit / m), fitted in log space over every seed, censored seeds
  as bounds, with a profile-likelihood interval (analysis.fit). From the
  same fit: 'm at e = level, from m0' = (m0 + B)/level - B, and Zhang et
  al.'s 20 %-more-steps batch size 1.2 m0 + 0.2 B. The efficiency-level
  figure is also measured from the data (interpolated in log m), with the
  B_crit it implies.
- B_simple(eps): the gradient noise scale over windows ending at each
  reached seed's k(m; eps) (analysis.noise.b_simple_at).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from pydantic import ValidationError

from critbatch.jobs.cell.logschema import STATUS_DIVERGED, STATUS_DONE, STATUS_REACHED
from critbatch.jobs.cell.science import crossing
from critbatch.jobs.cell.spec import Cell

from .fit import SEED_SCATTER_FLOOR, Fit, censored_log_mean, fit_mccandlish
from .load import INCOMPLETE, CellSummary, Curve
from .noise import NoiseWindow, b_simple_at

Table = list[dict[str, Any]]

#: Cell fields that do not define a speedup curve: they vary along it, or are trials, or only say how it was logged
#: (``stop``, and every ``stop.*`` field, only says where the run could end).
ALONG_CURVE = ("sweep", "batch_size", "seed", "accumulation", "eval.points", "noise.every", "stop")
#: Metaparameters whose values are trials (best trial per batch size).
TRIAL_FIELDS = ("base_lr", "optimizer.momentum")
#: Fields that each figure family lets vary between the groups it compares.
FAMILIES = {
    "strategy": ("strategy",),
    "model": ("model", "model_options"),
    "dataset": ("dataset.name", "dataset.max_train", "dataset.extra", "dataset.options"),
    "fraction": ("dataset.fraction",),
}
LINEAR_EFFICIENCY = 0.8
STAGNATION_GAIN = 1.10
DEFAULT_QUANTILE = 25.0
DEFAULT_THRESHOLD = "q25"
#: Quantiles of the default rule that give the thresholds along the run (B_crit(eps) beside B_simple(eps)).
ALONG_RUN = (75.0, 50.0, DEFAULT_QUANTILE, 10.0)
#: A threshold at or above this fraction of the initial loss is flagged: it measures only the first steps.
NEAR_INITIAL = 0.9
BOOTSTRAP_SEED = 0


# ---- curves and thresholds ------------------------------------------------------

def last_finite_step(curve: Curve) -> float:
    ok = np.flatnonzero(np.isfinite(curve.values))
    return float(curve.steps[ok[-1]]) if len(ok) else 0.0


# ---- groups ---------------------------------------------------------------------

def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("options", "model_options"):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


@dataclass
class Group:
    """The cells of one speedup curve."""

    key: str
    fields: dict[str, Any]  # the flattened cell fields shared by the group
    cells: list[CellSummary]
    label: str = ""
    source: str = "train_eval"  # train_eval | running_mean
    trial_fields: tuple[str, ...] = ()  # metaparameters with several values in this group

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({c.batch_size for c in self.cells})

    def trial_of(self, cell: CellSummary) -> str:
        flat = flatten(cell.cell)
        return ", ".join(f"{f}={flat[f]}" for f in self.trial_fields)

    @property
    def seeds(self) -> list[int]:
        return sorted({c.seed for c in self.cells})


def curve_fields(cell: dict[str, Any]) -> dict[str, Any]:
    """The flattened fields of a cell (``Cell.to_dict()``) that name its speedup curve: all but those that vary along
    one (ALONG_CURVE, ``stop.*``) and the trials' metaparameters. ``Group.key`` is their sorted JSON."""
    return {k: v for k, v in flatten(cell).items()
            if k not in ALONG_CURVE and k.split(".")[0] != "stop" and k not in TRIAL_FIELDS}


def curve_key(cell: dict[str, Any]) -> str:
    return json.dumps(curve_fields(cell), sort_keys=True, default=str)


def group_cells(cells: list[CellSummary]) -> list[Group]:
    """Partition cells into speedup curves: equal in every field but those that vary along one. A ramp cell (its
    batch changes over the run) and a branch cell (it starts from another cell's checkpoint) are no points of a
    curve: analysis.ramp and analysis.branches read them."""
    by_key: dict[str, Group] = {}
    for cell in (c for c in cells if c.cell.get("ramp") is None and not c.cell.get("branch")):
        fields = curve_fields(cell.cell)
        key = curve_key(cell.cell)
        if key not in by_key:
            by_key[key] = Group(key, fields, [])
        by_key[key].cells.append(cell)
    groups = list(by_key.values())
    varying = {k for g in groups for k, v in g.fields.items() if any(h.fields.get(k) != v for h in groups)}
    # Optimizers of different names have different options: the name says it, their options do not all apply.
    varying = {k for k in varying if all(k in g.fields for g in groups) or not k.startswith("optimizer.")}
    for g in groups:
        g.cells.sort(key=lambda c: (c.batch_size, c.seed, c.id))
        parts = [str(g.fields["dataset.name"]), str(g.fields["model"]), str(g.fields["strategy"])]
        shown = {"dataset.name", "model", "strategy"}
        parts += [f"{'optimizer' if k == 'optimizer.name' else k.split('.')[-1]}={_fmt(g.fields[k])}"
                  for k in sorted(varying - shown) if k in g.fields]
        g.label = parts[0] + "/" + parts[1] + "/" + parts[2] + (" " + " ".join(parts[3:]) if parts[3:] else "")
        flats = [flatten(c.cell) for c in g.cells]
        g.trial_fields = tuple(f for f in TRIAL_FIELDS if len({json.dumps(x.get(f)) for x in flats}) > 1)
        # One source per group (train-split evaluations and minibatch running means differ systematically):
        # evaluations when at least half the cells with data have them; the others then have no curve.
        usable = [c for c in g.cells if c.train_eval is not None or c.running_mean is not None]
        with_evals = [c for c in usable if c.train_eval is not None and len(c.train_eval) >= 2]
        g.source = "train_eval" if usable and 2 * len(with_evals) >= len(usable) else "running_mean"
    groups.sort(key=lambda g: g.label)
    return groups


def round_to_act(v: float) -> str:
    """Two significant digits: a batch size to act on, not a measurement."""
    return f"{float(f'{v:.2g}'):g}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def curve_of(cell: CellSummary, source: str) -> Curve | None:
    return cell.train_eval if source == "train_eval" else cell.running_mean


def default_threshold(groups: list[Group], quantile: float = DEFAULT_QUANTILE) -> tuple[float, int | None, bool]:
    """(eps, the batch size it comes from, provisional): the paper's lower quartile (section 4.3).

    ``groups``: the curves that share the threshold (the strategies of one
    problem, so their speedups are comparable; one group otherwise). The
    quartile (or ``quantile``) is of the loss values their largest batch size
    reaches over its run, weighted uniformly in iterations (its curve
    interpolated onto an even grid of steps): evaluations are log-spaced, and
    their raw values would over-weight the first steps and put the threshold
    near the initial loss. All the groups' cells at that batch size are pooled.

    Taken from the largest batch size whose cell finished and learned (status
    done, last loss below ``LEARNED_FRACTION`` of its first): a cell that
    diverged or stayed at chance (LSR at the largest batch sizes) reached no
    loss worth comparing, and its batch size is shown as censored. Failing
    that, from the largest finished cell; if none has finished, from the
    largest with any data, marked provisional.
    """
    with_data = [(c, cv) for g in groups for c in g.cells
                 if (cv := curve_of(c, g.source)) is not None and len(cv)]
    finished = [(c, cv) for c, cv in with_data if c.status in (STATUS_DONE, STATUS_DIVERGED)]
    learned = [(c, cv) for c, cv in finished if c.status == "done" and _learned(cv)]
    pool, provisional = (learned or finished, False) if finished else (with_data, True)
    if not pool:
        return math.nan, None, provisional
    m = max(c.batch_size for c, _ in pool)
    values = np.concatenate([uniform_values(cv) for c, cv in pool if c.batch_size == m])
    v = values[np.isfinite(values)]
    return (float(np.percentile(v, quantile)) if len(v) else math.nan), m, provisional


def threshold_families(groups: list[Group]) -> dict[str, list[Group]]:
    """Per group label, the groups that share its default threshold: its strategy family, else itself."""
    out = {g.label: [g] for g in groups}
    for fam in families(groups, "strategy"):
        for g in fam:
            out[g.label] = fam
    return out


#: A cell "learned" when its last training loss is below this fraction of its first.
LEARNED_FRACTION = 0.9
#: Points of the even step grid the default threshold's quartile is taken over.
UNIFORM_POINTS = 1024


def uniform_values(curve: Curve) -> np.ndarray:
    """The curve's finite values interpolated onto ``UNIFORM_POINTS`` evenly spaced steps."""
    ok = np.isfinite(curve.values)
    steps, values = np.asarray(curve.steps, dtype=float)[ok], np.asarray(curve.values, dtype=float)[ok]
    if len(steps) < 2:
        return values
    return np.interp(np.linspace(steps[0], steps[-1], UNIFORM_POINTS), steps, values)


def _learned(curve: Curve) -> bool:
    ok = np.flatnonzero(np.isfinite(curve.values))
    return len(ok) >= 2 and curve.values[ok[-1]] < LEARNED_FRACTION * curve.values[ok[0]]


def initial_loss(group: Group) -> float:
    """Median over the group's cells of the first value of their training-loss curve (usually step 0)."""
    firsts = []
    for c in group.cells:
        cv = curve_of(c, group.source)
        if cv is not None and len(cv):
            ok = np.flatnonzero(np.isfinite(cv.values))
            if len(ok):
                firsts.append(float(cv.values[ok[0]]))
    return float(np.median(firsts)) if firsts else math.nan


# ---- steps to threshold ------------------------------------------------------------

def steps_to_threshold(groups: list[Group], explicit: Iterable[float] = ()) -> tuple[Table, Table]:
    """Per cell and threshold: k, whether reached, the censoring bound, wall-clock time and samples to it.

    Returns (thresholds table, per-cell table). Thresholds: the default
    (``q25``) per group, shared by the strategies of one problem; the same
    rule at the quantiles ``ALONG_RUN`` (thresholds along the run, for
    B_crit(eps)); then every explicit eps.
    """
    thresholds: Table = []
    rows: Table = []
    shared = threshold_families(groups)
    for g in groups:
        initial = initial_loss(g)
        family = shared[g.label]
        choices = []
        for q in ALONG_RUN:
            eps_q, from_m, provisional = default_threshold(family, q)
            choices.append((f"q{q:g}", eps_q, from_m, provisional))
        choices += [(f"eps={e:g}", float(e), None, False) for e in explicit]
        for name, eps, from_m, provisional in choices:
            thresholds.append({
                "group": g.label, "threshold": name, "eps": eps, "source": g.source,
                "from_batch_size": from_m, "provisional": provisional,
                "shared_with": " ".join(x.label for x in family if x is not g) if from_m is not None else "",
                "initial_loss": initial,
                # A threshold this close to the starting loss measures only the first few steps.
                "near_initial": bool(eps >= NEAR_INITIAL * initial) if math.isfinite(eps * initial) else False,
            })
            for c in g.cells:
                rows.append(cell_crossing(g, c, name, eps))
    return thresholds, rows


def cell_crossing(g: Group, c: CellSummary, threshold: str, eps: float) -> dict[str, Any]:
    curve = curve_of(c, g.source)
    k = crossing(curve.steps, curve.values, eps) if curve is not None and len(curve) and math.isfinite(eps) \
        else math.nan
    reached = math.isfinite(k)
    bound = last_finite_step(curve) if curve is not None and len(curve) else 0.0
    if reached:
        use = "reached"
    elif c.status == INCOMPLETE:
        use = "running"  # may still get there: neither a crossing nor censored
    elif c.status == STATUS_REACHED:
        use = "stopped"  # it stopped at a higher threshold: its budget did not run out
    elif curve is None or not len(curve):
        use = "no data"
    else:
        use = "censored"
    wall = samples = math.nan
    if reached and len(c.grid_steps):
        wall = float(np.interp(k, c.grid_steps, c.grid_wall))
        samples = float(np.interp(k, c.grid_steps, c.grid_samples))
    return {
        "group": g.label, "threshold": threshold, "eps": eps, "cell_id": c.id, "sweep": c.sweep,
        "batch_size": c.batch_size, "seed": c.seed, "trial": g.trial_of(c), "status": c.status,
        "use": use, "k": k, "k_bound": bound if use == "censored" else math.nan,
        "wall_s": wall, "samples": samples,
    }


# ---- per batch size: best trial, speedup, efficiency, regimes ---------------------

@dataclass
class SeedSteps:
    """The winning trial's per-seed steps at one batch size (inf = censored, with its bound)."""

    batch_size: int
    trial: str
    k: np.ndarray  # inf where censored
    bound: np.ndarray  # the censored seeds' last steps (NaN where reached)
    wall: np.ndarray
    samples: np.ndarray
    trials_tried: int
    cell_ids: list[str] = field(default_factory=list)


def best_trials(rows: Table) -> list[SeedSteps]:
    """Per batch size, the trial with the fewest mean steps over seeds (censored = inf; ties: the first)."""
    usable = [r for r in rows if r["use"] in ("reached", "censored")]
    out = []
    for m in sorted({r["batch_size"] for r in usable}):
        at_m = [r for r in usable if r["batch_size"] == m]
        trials = sorted({r["trial"] for r in at_m})
        best, best_score = None, math.inf
        for t in trials:
            ks = np.array([r["k"] if r["use"] == "reached" else math.inf for r in at_m if r["trial"] == t])
            score = float(np.mean(ks))
            if best is None or score < best_score:
                best, best_score = t, score
        chosen = sorted((r for r in at_m if r["trial"] == best), key=lambda r: r["seed"])
        out.append(SeedSteps(
            batch_size=m, trial=best,
            k=np.array([r["k"] if r["use"] == "reached" else math.inf for r in chosen]),
            bound=np.array([r["k_bound"] for r in chosen]),
            wall=np.array([r["wall_s"] for r in chosen]),
            samples=np.array([r["samples"] for r in chosen]),
            trials_tried=len(trials), cell_ids=[r["cell_id"] for r in chosen],
        ))
    return out


def regimes(batch_sizes: np.ndarray, speedup: np.ndarray, efficiency: np.ndarray) -> list[str]:
    """Paper section 1: linear while e >= 0.8, stagnation once a doubling gains < 10 %, diminishing between.

    NaN speedup (the batch size never reached eps) is ``not reached`` and
    starts stagnation if it has not started. Regimes only move forward.
    """
    out: list[str] = []
    phase = "linear"
    for i, (m, s, e) in enumerate(zip(batch_sizes, speedup, efficiency)):
        if not math.isfinite(s):
            phase = "stagnation"
            out.append("not reached")
            continue
        if phase == "linear" and not e >= LINEAR_EFFICIENCY:
            phase = "diminishing"
        if phase == "diminishing" and i > 0 and math.isfinite(speedup[i - 1]):
            doublings = math.log2(m / batch_sizes[i - 1])
            gain = (s / speedup[i - 1]) ** (1.0 / doublings)
            if gain < STAGNATION_GAIN:
                phase = "stagnation"
        out.append(phase)
    return out


def efficiency_estimate(batch_sizes: np.ndarray, efficiency: np.ndarray, level: float) -> tuple[float, float]:
    """(largest m with e >= level, m where e crosses level interpolated in log m); NaN when none."""
    ok = np.flatnonzero(np.isfinite(efficiency) & (efficiency >= level))
    if not len(ok):
        return math.nan, math.nan
    i = int(ok[-1])
    m_a = float(batch_sizes[i])
    if i + 1 >= len(batch_sizes) or not math.isfinite(efficiency[i + 1]):
        return m_a, m_a
    e_a, e_b = float(efficiency[i]), float(efficiency[i + 1])
    frac = (e_a - level) / (e_a - e_b)
    return m_a, float(math.exp(math.log(m_a) + frac * (math.log(batch_sizes[i + 1]) - math.log(m_a))))


@dataclass
class CurveResult:
    """One group's speedup curve at one threshold."""

    group: Group
    threshold: str
    eps: float
    per_m: Table
    summary: dict[str, Any]
    fit: Fit
    bands: dict[int, tuple[float, float]] = field(default_factory=dict)  # speedup interval per m


def speedup_curve(group: Group, threshold: str, eps: float, rows: Table, *, level: float = 0.5,
                  bootstrap: int = 1000, rng: np.random.Generator | None = None,
                  seed_noise: float = SEED_SCATTER_FLOOR) -> CurveResult:
    """Speedup, efficiency, regimes, the McCandlish fit with its interval, the figures derived from it."""
    mine = [r for r in rows if r["group"] == group.label and r["threshold"] == threshold]
    best = best_trials(mine)
    seq_len = tokens_per_example(group)
    ms = np.array([b.batch_size for b in best], dtype=float)
    fit = fit_mccandlish(np.concatenate([np.full(len(b.k), b.batch_size) for b in best]) if best else [],
                         np.concatenate([b.k for b in best]) if best else [],
                         np.concatenate([b.bound for b in best]) if best else [], seed_noise=seed_noise)
    k_geo = np.array([_k_of(b, fit.sigma) for b in best])  # NaN: no seed reached eps
    censored = ~np.isfinite(k_geo)
    reached = np.flatnonzero(~censored)
    m0_i = int(reached[0]) if len(reached) else None
    speed = np.full(len(best), math.nan)
    if m0_i is not None:
        speed = np.where(censored, math.nan, k_geo[m0_i] / k_geo)
        speed[:m0_i] = math.nan
    m0 = float(ms[m0_i]) if m0_i is not None else math.nan
    eff = speed * m0 / ms
    if m0_i is None:
        labels = ["not reached"] * len(best)
    else:  # batch sizes below m_0 did not reach eps (m_0 is the smallest that did)
        labels = ["not reached"] * m0_i + regimes(ms[m0_i:], speed[m0_i:], eff[m0_i:])
    m_eff, m_eff_interp = efficiency_estimate(ms, eff, level) if m0_i is not None else (math.nan, math.nan)
    bands = _speedup_bands(best, m0_i, censored, bootstrap, rng) if bootstrap > 0 and m0_i is not None else {}

    per_m: Table = []
    for j, b in enumerate(best):
        reached_k = b.k[np.isfinite(b.k)]
        lower = np.where(np.isfinite(b.k), b.k, b.bound)
        per_m.append({
            "group": group.label, "threshold": threshold, "eps": eps, "batch_size": b.batch_size,
            "trial": b.trial, "trials": b.trials_tried, "seeds": len(b.k), "seeds_reached": len(reached_k),
            "k_mean": k_geo[j],
            "k_sd": float(np.std(reached_k, ddof=1)) if len(reached_k) > 1 else math.nan,
            "k_lower_bound": float(np.exp(np.mean(np.log(lower)))) if censored[j] else math.nan,
            "censored": bool(censored[j]), "speedup": speed[j],
            "ideal": b.batch_size / m0 if math.isfinite(m0) else math.nan,
            "efficiency": eff[j], "regime": labels[j],
            "speedup_lo": bands.get(b.batch_size, (math.nan, math.nan))[0],
            "speedup_hi": bands.get(b.batch_size, (math.nan, math.nan))[1],
            "fit_k": float(fit.k(b.batch_size)) if fit.ok else math.nan,
            "wall_s": float(np.mean(b.wall[np.isfinite(b.k)])) if len(reached_k) else math.nan,
            "samples": float(np.mean(b.samples[np.isfinite(b.k)])) if len(reached_k) else math.nan,
            # Language models: k(m) in tokens, samples x sequence length (Zhang et al. 2024 plot both)
            "tokens": float(np.mean(b.samples[np.isfinite(b.k)])) * seq_len if len(reached_k) and seq_len
            else math.nan,
        })

    noise = b_simple_at(_noise_windows(group, best))

    lin = [r["batch_size"] for r in per_m if r["regime"] == "linear"]
    stag = [r["batch_size"] for r in per_m if r["regime"] in ("stagnation", "not reached")]
    summary = {
        "group": group.label, "threshold": threshold, "eps": eps, "source": group.source, "m0": m0,
        "batch_sizes": len(best), "seeds": max((len(b.k) for b in best), default=0), "level": level,
        **fit_summary(fit, m0, level),
        "m_eff": m_eff, "m_eff_interp": m_eff_interp, "m_eff_implied_b": implied_b(m_eff_interp, m0, level),
        "b_simple": noise.value, "b_simple_lo": noise.lo, "b_simple_hi": noise.hi,
        "b_simple_bound": noise.bound, "b_simple_cells": noise.cells, "b_simple_text": noise.text(_num),
        "linear_until": max(lin) if lin else math.nan,
        "stagnation_from": min(stag) if stag else math.nan,
        "censored": " ".join(str(r["batch_size"]) for r in per_m if r["censored"]),
        "seeds_censored": int(sum(r["seeds"] - r["seeds_reached"] for r in per_m)),
        "bootstrap": bootstrap if bands else 0,
        "tokens_per_example": seq_len or math.nan,
        "E_min_tokens": fit.e_min() * seq_len if seq_len and fit.ok else math.nan,
    }
    return CurveResult(group, threshold, eps, per_m, summary, fit, bands)


def tokens_per_example(group: Group) -> int | None:
    """A language-model curve's sequence length (its dataset's ``seq_len``), else None."""
    try:
        return Cell.model_validate(group.cells[0].cell).tokens_per_example()
    except (ValidationError, ValueError, KeyError, IndexError):
        return None


#: Zhang et al. (2024): the batch size that needs this many times the steps of perfect scaling from m0.
ZHANG_EXCESS = 1.2


def fit_summary(fit: Fit, m0: float, level: float) -> dict[str, Any]:
    """The fit's numbers and what follows from it, as summary columns.

    Under k = S_min (1 + B/m) the efficiency from m0 is e(m) = (m0 + B)/(m + B),
    so the m where e falls to ``level`` is (m0 + B)/level - B, and Zhang et
    al.'s "20 % more steps than perfect scaling from m0" is 1.2 m0 + 0.2 B:
    both grow with B, so B's interval carries over.
    """
    b, lo, hi = fit.b_crit, fit.b_lo, fit.b_hi
    ok = fit.ok
    def at_level(x: float, lv: float) -> float:
        return (m0 + x) / lv - x if ok and math.isfinite(m0) else math.nan
    return {
        "b_crit": b if ok else math.nan, "b_crit_lo": lo, "b_crit_hi": hi,
        "s_min": fit.s_min if ok else math.nan, "s_min_lo": fit.s_lo, "s_min_hi": fit.s_hi,
        "e_min": fit.e_min() if ok else math.nan, "fit_sigma": fit.sigma,
        "fit_observations": fit.observations, "fit_censored": fit.censored, "fit_method": fit.method,
        "fit_problem": fit.problem or "",
        "m_level_fit": at_level(b, level), "m_level_fit_lo": at_level(lo, level),
        "m_level_fit_hi": at_level(hi, level),
        "m_zhang": at_level(b, 1 / ZHANG_EXCESS), "m_zhang_lo": at_level(lo, 1 / ZHANG_EXCESS),
        "m_zhang_hi": at_level(hi, 1 / ZHANG_EXCESS),
    }


def implied_b(m_level: float, m0: float, level: float) -> float:
    """The B_crit an efficiency-level figure implies under the fit's model: (level m_l - m0) / (1 - level)."""
    if not (math.isfinite(m_level) and math.isfinite(m0)) or level >= 1:
        return math.nan
    return max(0.0, (level * m_level - m0) / (1 - level))


def _k_of(b: SeedSteps, sigma: float) -> float:
    """k(m): the geometric mean over seeds, censored seeds entering as bounds (NaN if none reached)."""
    ok = np.isfinite(b.k)
    return float(np.exp(censored_log_mean(np.log(b.k[ok]), np.log(b.bound[~ok & np.isfinite(b.bound)]), sigma)))


def _speedup_bands(best: list[SeedSteps], m0_i: int, censored: np.ndarray, bootstrap: int,
                   rng: np.random.Generator | None) -> dict[int, tuple[float, float]]:
    """95 % percentile bootstrap of s(m) over seeds (geometric means), for batch sizes every seed reached."""
    if max(len(b.k) for b in best) < 2 or not np.isfinite(best[m0_i].k).all():
        return {}
    rng = rng or np.random.default_rng(BOOTSTRAP_SEED)
    logs = [np.log(b.k) for b in best]
    K = np.column_stack([lg[rng.integers(0, len(lg), size=(bootstrap, len(lg)))].mean(1) for lg in logs])
    out = {}
    for j, b in enumerate(best):
        if j >= m0_i and np.isfinite(b.k).all() and not censored[j]:
            out[b.batch_size] = _interval(np.exp(K[:, m0_i] - K[:, j]))
    return out


def _noise_windows(group: Group, best: list[SeedSteps]) -> list[NoiseWindow | None]:
    """The noise window ending at each reached seed's k, for the winning trial's cells."""
    cells = {c.id: c for c in group.cells}
    return [cells[cid].noise.window_ending(k) for b in best for cid, k in zip(b.cell_ids, b.k)
            if math.isfinite(k) and cid in cells and cells[cid].noise is not None]


def _num(v: float) -> str:
    if not math.isfinite(v):
        return "∞" if v > 0 else "–"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return math.nan, math.nan
    a = (1 - level) / 2 * 100
    return float(np.percentile(v, a)), float(np.percentile(v, 100 - a))


# ---- final metrics -------------------------------------------------------------------

def final_metrics(groups: list[Group]) -> Table:
    """Per group and batch size: final test metric and linear-approximation error over the cells that ran to the
    end (done); those that stopped at their threshold are counted in ``reached``, not averaged."""
    out: Table = []
    for g in groups:
        for m in g.batch_sizes:
            cells = [c for c in g.cells if c.batch_size == m and c.status != INCOMPLETE]
            done = [c for c in cells if c.status == STATUS_DONE]
            metric = g.cells[0].metric
            vals, lins, losses = [], [], []
            for c in done:
                final = (c.success or {}).get("final") or {}
                v = final.get("test_metric")
                if v is None and c.test_metric is not None and len(c.test_metric):
                    v = float(c.test_metric.values[-1])
                if v is not None and math.isfinite(v):
                    vals.append(float(v))
                tl = final.get("test_loss")
                if tl is None and c.test_eval is not None and len(c.test_eval):
                    tl = float(c.test_eval.values[-1])
                if tl is not None and math.isfinite(tl):
                    losses.append(float(tl))
                if final.get("lin_approx_error") is not None:
                    lins.append(float(final["lin_approx_error"]))
            out.append({
                "group": g.label, "strategy": g.fields["strategy"], "batch_size": m, "metric": metric,
                "cells": len(cells), "diverged": sum(c.status == "diverged" for c in cells),
                "reached": sum(c.status == STATUS_REACHED for c in cells),
                "test_metric": _mean(vals), "test_metric_sd": _sd(vals), "test_loss": _mean(losses),
                "lin_approx_error": _mean(lins), "lin_approx_error_sd": _sd(lins),
            })
    return out


def _mean(v: list[float]) -> float:
    return float(np.mean(v)) if v else math.nan


def _sd(v: list[float]) -> float:
    return float(np.std(v, ddof=1)) if len(v) > 1 else math.nan


# ---- contours and families ----------------------------------------------------------

def contour_grid(group: Group, which: str, *, trials: dict[int, str] | None = None, points: int = 80
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(batch sizes, steps, loss[m, step]) for a contour plot of the ``which`` curve (train | test).

    Each cell's curve is interpolated onto a shared log-spaced step grid
    (log loss linear in log step), averaged over seeds as a geometric mean,
    and left NaN past the cell's last logged step. Only the winning trial per
    batch size is drawn when ``trials`` names it.
    """
    def curve(c: CellSummary) -> Curve | None:
        return curve_of(c, group.source) if which == "train" else c.test_eval

    cells = [c for c in group.cells if (cv := curve(c)) is not None and len(cv) >= 2]
    if trials:
        cells = [c for c in cells if group.trial_of(c) == trials.get(c.batch_size, group.trial_of(c))]
    ms = np.array(sorted({c.batch_size for c in cells}), dtype=float)
    if not len(ms):
        return ms, np.zeros(0), np.zeros((0, 0))
    top = max(float(curve(c).steps[-1]) for c in cells)
    steps = np.geomspace(1.0, max(top, 2.0), points)
    Z = np.full((len(ms), points), np.nan)
    for i, m in enumerate(ms):
        logs = []
        for c in (c for c in cells if c.batch_size == m):
            cv = curve(c)
            keep = (cv.steps > 0) & np.isfinite(cv.values) & (cv.values > 0)
            if keep.sum() < 2:
                continue
            s, v = cv.steps[keep], np.log(cv.values[keep])
            row = np.interp(np.log(steps), np.log(s), v, left=np.nan, right=np.nan)
            row[steps < s[0]] = v[0]
            logs.append(row)
        if logs:
            stack = np.vstack(logs)
            count = np.isfinite(stack).sum(0)
            total = np.where(np.isfinite(stack), stack, 0.0).sum(0)
            Z[i] = np.where(count > 0, np.exp(total / np.maximum(count, 1)), np.nan)
    return ms, steps, Z


def families(groups: list[Group], axis: str) -> list[list[Group]]:
    """Sets of groups equal in everything but the ``axis`` fields, with at least two values of it."""
    fields = FAMILIES[axis]
    by_rest: dict[str, list[Group]] = {}
    for g in groups:
        rest = {k: v for k, v in g.fields.items() if not any(k == f or k.startswith(f + ".") for f in fields)}
        by_rest.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(g)
    out = []
    for members in by_rest.values():
        values = {json.dumps([g.fields.get(f) for f in fields], default=str) for g in members}
        if len(values) > 1:
            out.append(sorted(members, key=lambda g: g.label))
    return out
