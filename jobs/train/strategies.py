"""Learning-rate strategies across batch sizes (design section 4, paper sections 2 and 4).

A cell's step size depends on its batch size m, the base batch m_0 at which
eta_0 was tuned, and the strategy:

    blr     eta_0                                  the same for every m
    lsr     eta_0 * m / m_0 (cell.science.lsr_lr)  reached by a linear warm-up from eta_0 over W epochs
    srsr    eta_0 * sqrt(m / m_0)                  no warm-up (as in the paper)
    longer  eta_0, and E * m / m_0 epochs          the budget held in iterations, not epochs
    oracle  m / (beta + (m - 1) * lambda_1)        Ma et al.'s optimal step for least squares (linreg only)

Warm-up: lsr's from eta_0 over W epochs (the paper's); or, for any strategy,
``warmup: {steps | examples | tokens: N}``, linear from 0: the update after s
steps gets peak x (s + 1) / W (W the warm-up in updates, at least 1).

After the warm-up the same decay applies to every strategy: ``none``; ``step``,
x0.1 once 50 % and again once 75 % of the cell's total steps are done;
``cosine``, from the peak to zero over the steps after the warm-up; ``linear``,
from the peak to zero over those steps, reaching 0 at the last update's end;
``wsd`` (warm-up, stable, decay; Hu et al. 2024), the peak until the last
``wsd.decay_fraction`` of the total steps, then down to ``wsd.final`` x peak
with shape ``linear`` (1 - p) or ``1-sqrt`` (1 - sqrt(p), Hägele et al. 2024),
p the fraction of the decay done.

Steps are counted as updates already made: ``lr_at(cell, s, ...)`` is the
rate of update s + 1, the one whose row in the step log has ``step = s + 1``.

The evaluation grid is one geometric sequence of iterations shared by every
batch size of a sweep, so the loss contours over (batch size, iterations) of
paper Figure 1 line up without interpolation: it has ``eval.points`` points
between 1 and the step budget of the base batch m_0, the same ratio carries on
past it for smaller batches, and each cell keeps the part up to its own total.

A branch (``cell.branch``, docs/branches.md) trains at one constant rate: its
base's rate at the branch point t (the update after t, warm-up and decay
included), scaled to k x B by the branch's rule through the strategy that
states it (``BRANCH_RULES``: linear as lsr, sqrt as srsr, oracle as oracle).
It evaluates at ``eval.points`` steps spread evenly over its length, the same
examples for every multiplier whose steps divide evenly.
"""

from __future__ import annotations

import math

from ..cell.science import lsr_lr
from ..cell.spec import BRANCH_RULES, Cell, WsdSpec, branch_start, total_steps

#: Step decay: the factor, and the fractions of training after which it applies.
STEP_DECAY_FACTOR = 0.1
STEP_DECAY_AT = (0.5, 0.75)


def base_total_steps(cell: Cell, base_steps_per_epoch: int) -> int:
    """The step budget of the same cell at the base batch m_0 (the anchor of the shared eval grid)."""
    return total_steps(cell, base_steps_per_epoch, batch_size=cell.base_batch)


def warmup_steps(cell: Cell, steps_per_epoch: int) -> int:
    """Steps of the linear warm-up: ``warmup`` in steps, examples or tokens at batch m (at least 1); else W
    epochs for ``lsr``, none for the other strategies."""
    w = cell.warmup
    if cell.branch is not None:
        return 0  # a branch runs at its rate from its first update
    if w is not None:
        if w.steps is not None:
            return w.steps
        per_step = cell.batch_size * (cell.tokens_per_example() or 1 if w.tokens is not None else 1)
        return max(1, round((w.examples if w.examples is not None else w.tokens) / per_step))
    if cell.strategy != "lsr":
        return 0
    return round(cell.warmup_epochs * steps_per_epoch)


def peak_lr(cell: Cell, derived: dict | None = None) -> float:
    """The strategy's step size for batch m, before any decay."""
    m, m0, eta0 = cell.batch_size, cell.base_batch, cell.base_lr
    if cell.branch is not None:
        return branch_lr(cell, derived)
    if cell.strategy in ("blr", "longer"):
        return eta0
    if cell.strategy == "lsr":
        return lsr_lr(eta0, m, m0)
    if cell.strategy == "srsr":
        return eta0 * math.sqrt(m / m0)
    if cell.strategy == "oracle":
        if not derived or "beta" not in derived or "lambda_1" not in derived:
            raise ValueError("oracle step needs derived beta and lambda_1 (the linreg data's info)")
        return oracle_lr(m, derived["beta"], derived["lambda_1"])
    raise ValueError(f"strategy {cell.strategy!r}")


def base_rate_at_branch(cell: Cell, derived: dict) -> float:
    """The rate of the base's update after the branch point t (``derived``: the data's figures, n_train among
    them, which the base's step budget and t depend on)."""
    base, n_train = cell.base_cell(), derived["n_train"]
    return lr_at(base, branch_start(cell, n_train), max(1, n_train // base.batch_size), derived)


def branch_lr(cell: Cell, derived: dict | None) -> float:
    """A branch's constant rate: the base's rate eta_t at t, scaled to the branch's batch k x B by its rule,
    computed by the strategy that states the rule (eta_t as eta_0 at m_0 = B: lsr eta_t k, srsr eta_t sqrt(k),
    oracle eta*(k B))."""
    if not derived or "n_train" not in derived:
        raise ValueError("a branch's rate needs the data's figures (n_train; beta and lambda_1 for oracle)")
    rate = base_rate_at_branch(cell, derived)
    if rate <= 0:
        return 0.0
    base = cell.base_cell()
    scaled = base.model_copy(update={
        "strategy": BRANCH_RULES[cell.branch.rule], "base_lr": rate, "base_batch": base.batch_size,
        "batch_size": cell.batch_size, "warmup_epochs": 0.0, "warmup": None, "keep": None})
    return peak_lr(scaled, derived)


def oracle_lr(m: int, beta: float, lambda_1: float) -> float:
    """eta*(m) = m / (beta + (m - 1) * lambda_1), Ma, Bassily and Belkin (2018), for 0.5 * mean squared error."""
    return m / (beta + (m - 1) * lambda_1)


def lr_at(cell: Cell, step: int, steps_per_epoch: int, derived: dict | None = None) -> float:
    """The learning rate of the update made after ``step`` updates (0-based)."""
    if cell.branch is not None:
        return branch_lr(cell, derived)  # constant (Plan.lr computes it once)
    total = total_steps(cell, steps_per_epoch)
    peak = peak_lr(cell, derived)
    warm = warmup_steps(cell, steps_per_epoch)
    if step < warm and cell.warmup is not None:
        return peak * (step + 1) / warm  # linear from 0: the last warm-up update runs at the peak
    if step < warm:
        # Linear from eta_0 at step 0 towards the peak, reached at step `warm`.
        return cell.base_lr + (peak - cell.base_lr) * step / warm
    if cell.decay == "cosine":  # peak * 0.5 * (...) in this order: an SGD cell's rates stay bit for bit
        span = max(1, total - warm)
        progress = min(1.0, (step - warm) / span)
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * decay_factor(cell, step, warm, total)


def decay_factor(cell: Cell, step: int, warm: int, total: int) -> float:
    """The decay's multiplier of the peak for the update after ``step`` updates (``warm`` of ``total`` warm up)."""
    if cell.decay == "linear":
        return max(0.0, 1.0 - (step - warm) / max(1, total - warm))
    if cell.decay == "wsd":
        wsd = cell.wsd or WsdSpec()
        decay = max(1, round(wsd.decay_fraction * total))
        start = max(warm, total - decay)
        if step < start:
            return 1.0
        done = min(1.0, (step - start) / max(1, total - start))
        shape = done if wsd.shape == "linear" else math.sqrt(done)
        return 1.0 - (1.0 - wsd.final) * shape
    if cell.decay == "step":
        return STEP_DECAY_FACTOR ** sum(step >= f * total for f in STEP_DECAY_AT)
    if cell.decay == "cosine":
        span = max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / span)))
    return 1.0


def eval_steps(cell: Cell, total: int, base_total: int) -> list[int]:
    """Iterations (after that many updates) at which the cell evaluates: 0, the shared grid up to ``total``, ``total``.

    The grid is round(r^k) for k = 0, 1, ... with r = base_total^(1 / (points - 1)),
    deduplicated; it depends on the sweep (base budget, points), not on the cell's batch size.
    """
    points = max(2, cell.eval.points)
    if cell.branch is not None:  # evenly spaced over the branch's length, in examples as in steps
        return sorted({round(j * total / (points - 1)) for j in range(points)})
    ratio = max(2, base_total) ** (1.0 / (points - 1))
    grid = {0, total}
    k = 0
    while True:
        value = round(ratio**k)
        if value > total:
            break
        grid.add(value)
        k += 1
    return sorted(grid)


def ramp_factor(cell: Cell, batch: int, derived: dict | None = None) -> float:
    """The ramp's LR factor at ``batch`` (a multiple k of the cell's batch B): the rate of its rule at k x B over
    the rate at B, computed by the strategy that states the rule (``BRANCH_RULES``: linear k, sqrt sqrt(k),
    oracle eta*(k B) / eta*(B))."""
    def rate(m: int) -> float:
        return peak_lr(cell.model_copy(update={
            "strategy": BRANCH_RULES[cell.ramp.rule], "base_lr": 1.0, "base_batch": cell.batch_size,
            "batch_size": m, "warmup_epochs": 0.0, "warmup": None, "ramp": None}), derived)
    return rate(batch) / rate(cell.batch_size)


def ramp_stages(cell: Cell, n_train: int, derived: dict | None = None) -> list[dict]:
    """A ramp's phases as planned: each one's first epoch, batch, steps per epoch (full batches of that size),
    first step, the examples before it and its LR factor; the phases the budget never reaches left out."""
    stages, step, examples = [], 0, 0
    phases = cell.ramp.phases
    for i, phase in enumerate(phases):
        spe = max(1, n_train // phase.batch)
        end = phases[i + 1].epoch if i + 1 < len(phases) else cell.epochs
        steps = spe * (end - phase.epoch) if i + 1 < len(phases) else round((end - phase.epoch) * spe)
        stages.append({"epoch": phase.epoch, "batch": phase.batch, "steps_per_epoch": spe, "first_step": step,
                       "first_examples": examples, "steps": steps,
                       "lr_factor": ramp_factor(cell, phase.batch, derived)})
        step, examples = step + steps, examples + steps * phase.batch
    return stages


def ramp_total_steps(cell: Cell, stages: list[dict]) -> int:
    """Updates of a ramp cell: its phases' steps over the budget in epochs, capped by ``max_steps``; at least 1."""
    total = sum(stage["steps"] for stage in stages)
    if cell.max_steps is not None:
        total = min(total, cell.max_steps)
    return max(1, total)
