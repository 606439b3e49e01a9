"""Learning-rate strategies across batch sizes (design section 4, paper sections 2 and 4).

A cell's step size depends on its batch size m, the base batch m_0 at which
eta_0 was tuned, and the strategy:

    blr     eta_0                                  the same for every m
    lsr     eta_0 * m / m_0                        reached by a linear warm-up from eta_0 over W epochs
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
"""

from __future__ import annotations

import math

from critbatch.jobs.cell.spec import Cell, WsdSpec, total_steps

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
    if cell.strategy in ("blr", "longer"):
        return eta0
    if cell.strategy == "lsr":
        return eta0 * m / m0
    if cell.strategy == "srsr":
        return eta0 * math.sqrt(m / m0)
    if cell.strategy == "oracle":
        if not derived or "beta" not in derived or "lambda_1" not in derived:
            raise ValueError("oracle step needs derived beta and lambda_1 (the linreg data's info)")
        return oracle_lr(m, derived["beta"], derived["lambda_1"])
    raise ValueError(f"strategy {cell.strategy!r}")


def oracle_lr(m: int, beta: float, lambda_1: float) -> float:
    """eta*(m) = m / (beta + (m - 1) * lambda_1), Ma, Bassily and Belkin (2018), for 0.5 * mean squared error."""
    return m / (beta + (m - 1) * lambda_1)


def lr_at(cell: Cell, step: int, steps_per_epoch: int, derived: dict | None = None) -> float:
    """The learning rate of the update made after ``step`` updates (0-based)."""
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
