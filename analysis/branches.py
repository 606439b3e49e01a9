"""The critical batch size over training, from branch cells (docs/branches.md).

A base run keeps its checkpoints at points t; from each, branch cells train at k x its batch B on the
same number of examples. Per base and point this module computes two local figures:

(a) **local B_crit(t)**, McCandlish et al.'s critical batch size, the same quantity as a grid's headline:
    the target loss is the one the smallest multiplier's branches reach after half the branch length
    (geometric mean over their seeds, interpolated in log loss between evaluations); each branch's steps
    to it are the first crossing (``jobs.cell.science.crossing``) of its loss curve in its own steps,
    and a branch that does not reach it within its length is a censored bound at its steps. The fit
    k(m) = S_min (1 + B_crit / m) over m = k B is the grid's (:func:`analysis.fit.fit_mccandlish`), with
    its profile-likelihood interval over seeds and multipliers (and the measured seed scatter assumed
    when there is one seed per multiplier).
(b) **tolerance CBS(t)** (Merrill et al. 2025): each branch's loss after the branch length (its last
    train-split evaluation, else the running mean of its minibatch losses); the largest k B such that
    every multiplier up to it ends within a factor (1 + eps) of the best smaller one. Per seed, and for
    the geometric mean over seeds (the value shown); its resolution is the multiplier grid, and the
    range over seeds is its spread. Smaller than (a) by construction; it depends on eps and the length.

Beside them, the base run's gradient noise scale B_simple(t) (its noise columns, the window ending at t),
the analytic critical batch size where the problem has one (linreg under the oracle step:
beta / lambda_1 - 1, the same at every t), and the B_crit of a grid on the same problem when the
analysis has one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from critbatch.jobs.cell.analysis_args import TOLERANCE
from critbatch.jobs.cell.science import crossing

from .compute import round_to_act
from .fit import Fit, fit_mccandlish
from .load import CellSummary, Curve
from .noise import NoiseScale, b_simple_at

#: Merrill et al.'s tolerance: a batch keeps up while its loss is within (1 + eps) of the best smaller one's.
DEFAULT_TOLERANCE = TOLERANCE
#: The target loss of (a): the one the smallest multiplier reaches after this fraction of the branch length.
TARGET_FRACTION = 0.5


@dataclass
class BranchRow:
    """One branch cell's figures at its point."""

    cell_id: str
    multiplier: int
    batch_size: int
    seed: int
    steps: int  # the branch's own steps (length / (k B))
    examples_to_target: float  # NaN: not reached within the length
    steps_to_target: float
    final_loss: float
    status: str


@dataclass
class BranchPoint:
    """The branches of one base at one point t: both local critical batch sizes and what sits beside them."""

    sweep: str
    base: str
    label: str  # the problem, in words
    cell: dict[str, Any]  # a branch cell's fields (its base's but batch_size and branch)
    at: float | None  # the point as a fraction of the base's steps, as given (None: given as a step)
    start_step: int
    start_examples: int
    start_tokens: float | None
    fraction: float  # start_step / the base's total steps (NaN when the base is not in the analysis)
    base_epoch: float | None  # start_step / the base's steps per epoch (None when the base is not in the analysis)
    base_batch: int
    rule: str
    length: int  # examples
    source: str  # "train_eval" or "running_mean"
    target: float
    rows: list[BranchRow]
    fit: Fit
    tolerance: float
    cbs: float  # (b) from the geometric mean loss over seeds
    cbs_seeds: list[float]  # (b) per seed
    b_simple: NoiseScale | None
    analytic: float | None = None
    global_b: float | None = None  # a grid's B_crit on the same problem, when the analysis has one
    notes: list[str] = field(default_factory=list)

    @property
    def multipliers(self) -> list[int]:
        return sorted({r.multiplier for r in self.rows})

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.rows})

    @property
    def cbs_range(self) -> tuple[float, float]:
        v = [x for x in self.cbs_seeds if math.isfinite(x)]
        return (min(v), max(v)) if v else (math.nan, math.nan)

    def summary(self) -> dict[str, Any]:
        """One row of the table (and of branches.csv)."""
        lo, hi = self.cbs_range
        f = self.fit
        return {
            "sweep": self.sweep, "base": self.base, "problem": self.label, "at": self.at,
            "fraction": self.fraction, "start_step": self.start_step, "start_examples": self.start_examples,
            "start_tokens": self.start_tokens, "base_batch": self.base_batch, "rule": self.rule,
            "length_examples": self.length, "multipliers": " ".join(map(str, self.multipliers)),
            "seeds": len(self.seeds), "target_loss": self.target, "source": self.source,
            "b_crit": f.b_crit if f.ok else math.nan, "b_crit_lo": f.b_lo if f.ok else math.nan,
            "b_crit_hi": f.b_hi if f.ok else math.nan, "s_min": f.s_min if f.ok else math.nan,
            "fit_problem": f.problem or "", "one_seed": f.one_seed, "censored": f.censored,
            "tolerance": self.tolerance, "cbs_tolerance": self.cbs, "cbs_tolerance_lo": lo,
            "cbs_tolerance_hi": hi, "b_simple": self.b_simple.value if self.b_simple and self.b_simple.cells
            else math.nan, "b_simple_bound": bool(self.b_simple and self.b_simple.bound),
            "b_crit_analytic": self.analytic if self.analytic is not None else math.nan,
            "b_crit_global": self.global_b if self.global_b is not None else math.nan,
        }


def is_branch(c: CellSummary) -> bool:
    return bool(c.cell.get("branch"))


def branch_points(cells: list[CellSummary], *, tolerance: float = DEFAULT_TOLERANCE,
                  seed_noise: float = 0.0) -> list[BranchPoint]:
    """Every (sweep, base, point, rule, length) of the branch cells among ``cells``, computed, in the order
    of their base and point."""
    by_id = {(c.sweep, c.id): c for c in cells}
    groups: dict[tuple, list[CellSummary]] = {}
    for c in cells:
        if not is_branch(c):
            continue
        d = c.derived.get("branch") or {}
        if "start_step" not in d:
            continue  # a branch that never started (no derived record): nothing to read
        b = c.cell["branch"]
        key = (c.sweep, b["base"], d["start_step"], b["rule"], d.get("examples"))
        groups.setdefault(key, []).append(c)
    out = [_point(members, by_id.get((key[0], key[1])), tolerance, seed_noise)
           for key, members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))]
    return [p for p in out if p is not None]


def _point(cells: list[CellSummary], base: CellSummary | None, tolerance: float,
           seed_noise: float) -> BranchPoint | None:
    d0 = cells[0].derived["branch"]
    source = "train_eval" if all(c.train_eval is not None and len(c.train_eval) for c in cells) else "running_mean"
    curves = {c.id: _curve(c, source) for c in cells}
    usable = [c for c in cells if curves[c.id] is not None]
    if not usable:
        return None
    notes = [f"cell {c.id} (k = {c.derived['branch']['multiplier']}, seed {_seed(c)}) has no loss curve yet"
             for c in cells if curves[c.id] is None]
    length = int(d0.get("examples") or 0)
    k_min = min(c.derived["branch"]["multiplier"] for c in usable)

    # (a): the target from the smallest multiplier at half the length, then each branch's steps to it.
    half = TARGET_FRACTION * length
    at_half = [_log_interp(half, *curves[c.id]) for c in usable if c.derived["branch"]["multiplier"] == k_min]
    at_half = [v for v in at_half if math.isfinite(v)]
    target = float(math.exp(np.mean(at_half))) if at_half else math.nan
    rows = []
    for c in usable:
        ex, loss = curves[c.id]
        k = int(c.derived["branch"]["multiplier"])
        m = c.batch_size
        e = crossing(ex, loss, target) if math.isfinite(target) else math.nan
        finite = loss[np.isfinite(loss)]
        rows.append(BranchRow(c.id, k, m, _seed(c), int(c.derived.get("total_steps") or length // m), e, e / m,
                              float(finite[-1]) if len(finite) and c.status != "diverged" else math.nan, c.status))
    rows.sort(key=lambda r: (r.multiplier, r.seed))
    finished = [r for r in rows if r.status in ("done", "reached") or math.isfinite(r.steps_to_target)]
    fit = fit_mccandlish([r.batch_size for r in finished],
                         [r.steps_to_target if math.isfinite(r.steps_to_target) else math.nan for r in finished],
                         [r.steps if not math.isfinite(r.steps_to_target) and r.status in ("done", "reached")
                          else math.nan for r in finished], seed_noise=seed_noise)

    # (b): per seed, and for the geometric mean over seeds.
    per_seed = []
    for s in sorted({r.seed for r in rows}):
        per_seed.append(tolerance_cbs({r.batch_size: r.final_loss for r in rows if r.seed == s}, tolerance))
    pooled: dict[int, list[float]] = {}
    for r in rows:
        pooled.setdefault(r.batch_size, []).append(r.final_loss)
    cbs = tolerance_cbs({m: _geomean(v) for m, v in pooled.items()}, tolerance)

    start_step = int(d0["start_step"])
    fraction, base_epoch, b_simple, analytic = math.nan, None, None, None
    if base is not None:
        total, spe = base.derived.get("total_steps"), base.derived.get("steps_per_epoch")
        fraction = start_step / total if total else math.nan
        base_epoch = start_step / spe if spe else None
        if base.noise is not None:
            b_simple = b_simple_at([base.noise.window_ending(float(start_step))])
    if d0.get("rule") == "oracle" and (beta := cells[0].derived.get("beta")) and \
            (lam := cells[0].derived.get("lambda_1")):
        analytic = beta / lam - 1.0  # 1/eta*(m) = lambda_1 (1 + (beta/lambda_1 - 1)/m): the same at every t
    c0 = cells[0].cell
    return BranchPoint(
        sweep=cells[0].sweep, base=str(d0["base"]), label=problem_label(c0), cell=c0, at=d0.get("at"),
        start_step=start_step, start_examples=int(d0["start_examples"]), start_tokens=d0.get("start_tokens"),
        fraction=fraction, base_epoch=base_epoch, base_batch=int(d0["base_batch"]), rule=str(d0["rule"]),
        length=length, source=source,
        target=target, rows=rows, fit=fit, tolerance=tolerance, cbs=cbs, cbs_seeds=per_seed, b_simple=b_simple,
        analytic=analytic, notes=notes)


def tolerance_cbs(final: dict[int, float], tolerance: float) -> float:
    """Merrill et al.'s critical batch size from the losses after the branch length, by batch size: the
    largest batch such that it and every batch below it ends within (1 + tolerance) of the best smaller
    one's loss. NaN without a finite loss at the smallest batch."""
    ms = sorted(final)
    if not ms or not math.isfinite(final[ms[0]]):
        return math.nan
    best, cbs = final[ms[0]], float(ms[0])
    for m in ms[1:]:
        loss = final[m]
        if not (math.isfinite(loss) and loss <= (1.0 + tolerance) * best):
            break
        cbs, best = float(m), min(best, loss)
    return cbs


def problem_label(cell: dict[str, Any]) -> str:
    """The problem a base trains, in a few words: dataset, model, optimizer, strategy."""
    opt = cell.get("optimizer") or {}
    return f"{cell['dataset']['name']}/{cell['model']}, {opt.get('name', 'sgd')}, {cell['strategy']}"


def same_problem(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two cells train the same problem (dataset with its options, model, optimizer, strategy)."""
    keys = ("dataset", "model", "optimizer", "strategy")
    return all(a.get(k) == b.get(k) for k in keys)


def trend(points: list[BranchPoint]) -> str | None:
    """The answer box's line for one base: how the critical batch size moves from its first point to its last."""
    pts = [p for p in points if math.isfinite(p.fraction)] or points
    if len(pts) < 2:
        return None
    pts = sorted(pts, key=lambda p: p.start_step)

    def value(p: BranchPoint) -> tuple[float, str]:
        if p.fit.ok and math.isfinite(p.fit.b_crit):
            return p.fit.b_crit, "local B_crit"
        return p.cbs, "tolerance CBS"

    (first, kind_a), (last, kind_b) = value(pts[0]), value(pts[-1])
    if not (math.isfinite(first) and math.isfinite(last)) or kind_a != kind_b:
        return None
    where = [f"{100 * (p.at if p.at is not None else p.fraction):.3g} % of training" if math.isfinite(p.fraction)
             else f"step {p.start_step}" for p in (pts[0], pts[-1])]
    ratio = last / first
    verb = "grows" if ratio > 1.25 else "falls" if ratio < 0.8 else "stays near its value"
    return (f"{pts[0].label} (base {pts[0].base}): the critical batch size ({kind_a}) {verb} from "
            f"~{round_to_act(first)} at {where[0]} to ~{round_to_act(last)} at {where[1]} ({len(pts)} points)")


def ramp_snippet(points: list[BranchPoint]) -> str | None:
    """The batch-size ramp one base's critical batch size over training implies, as a grid snippet: from the
    first epoch boundary after each point (the batch changes only there; the first epoch stays at B), the
    batch is the largest power-of-two multiple of B not above CBS(t) (the local B_crit where fitted, else the
    tolerance CBS), never below the batch before it and at most the largest batch the branches tried;
    ``batch_size: [B, final]`` beside it makes the grid train the constant batches
    the ramp is measured against (docs/ramp.md). None without two points or a base epoch to place them at."""
    pts = sorted((p for p in points if p.base_epoch is not None), key=lambda p: p.start_step)
    if len(pts) < 2:
        return None
    b, cap = pts[0].base_batch, pts[0].base_batch * max(max(p.multipliers) for p in pts)
    phases, used = [(0, b)], []
    for p in pts:
        cbs, kind = (p.fit.b_crit, "local B_crit") if p.fit.ok and math.isfinite(p.fit.b_crit) else (p.cbs, "tolerance")
        if not math.isfinite(cbs):
            continue
        batch = min(cap, b * 2 ** max(0, math.floor(math.log2(max(cbs, b) / b))))
        batch = max(batch, phases[-1][1])
        epoch = max(1, int(math.ceil(p.base_epoch)))  # the first epoch boundary at or after t
        used.append(f"{100 * (p.at if p.at is not None else p.fraction):.3g} %: {kind} {round_to_act(cbs)} -> {batch}")
        if batch == phases[-1][1]:
            continue
        if epoch <= phases[-1][0] and len(phases) > 1:
            phases[-1] = (phases[-1][0], batch)  # two points before one boundary: the later batch from there on
        else:
            phases.append((max(epoch, phases[-1][0] + 1), batch))
    if len(phases) < 2:
        return None
    body = ", ".join(f"{{epoch: {e}, batch: {m}}}" for e, m in phases)
    return "\n".join([
        f"# the ramp the critical batch size over training of base {pts[0].base} implies ({pts[0].label}):",
        f"# {'; '.join(used)}",
        f"batch_size: [{b}, {phases[-1][1]}]   # the constant batches to measure the ramp against",
        f"ramp: {{rule: {pts[0].rule}, phases: [{body}]}}",
        "noise: {every: 0}      # a ramp cell takes no noise probe",
        "# give the cells a stop threshold (stop: {threshold: ...}) or analyze with --threshold: the ramp's",
        "# steps to it are compared with the constant batches'",
    ])


def _curve(c: CellSummary, source: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The loss curve in the branch's own examples (steps x its batch)."""
    curve: Curve | None = c.train_eval if source == "train_eval" else c.running_mean
    if curve is None or not len(curve):
        return None
    return curve.steps * c.batch_size, np.asarray(curve.values, dtype=float)


def _log_interp(x: float, xs: np.ndarray, values: np.ndarray) -> float:
    """log(loss) at ``x``, linear in examples between the points around it; NaN outside the curve."""
    ok = np.isfinite(values) & (values > 0)
    xs, values = xs[ok], values[ok]
    if not len(xs) or x < xs[0] or x > xs[-1]:
        return math.nan
    return float(np.interp(x, xs, np.log(values)))


def _geomean(values: list[float]) -> float:
    v = np.asarray(values, dtype=float)
    if not len(v) or not np.all(np.isfinite(v) & (v > 0)):
        return math.nan
    return float(np.exp(np.mean(np.log(v))))


def _seed(c: CellSummary) -> int:
    return int(c.cell["branch"].get("seed", c.seed))
