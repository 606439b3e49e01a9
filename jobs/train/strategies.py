"""Learning-rate strategies across batch sizes (design section 4, paper sections 2 and 4).

A cell's step size depends on its batch size m, the base batch m_0 at which
eta_0 was tuned, and the strategy:

    blr     eta_0                                  the same for every m
    lsr     eta_0 * m / m_0                        reached by a linear warm-up from eta_0 over W epochs
    srsr    eta_0 * sqrt(m / m_0)                  no warm-up (as in the paper)
    longer  eta_0, and E * m / m_0 epochs          the budget held in iterations, not epochs
    oracle  m / (beta + (m - 1) * lambda_1)        Ma et al.'s optimal step for least squares (linreg only)

After the warm-up (lsr; zero steps for the others) the same decay applies to
every strategy: ``none``; ``step``, x0.1 once 50 % and again once 75 % of the
cell's total steps are done; ``cosine``, from the peak to zero over the steps
after the warm-up.

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

from critbatch.jobs.cell.spec import Cell, total_steps

#: Step decay: the factor, and the fractions of training after which it applies.
STEP_DECAY_FACTOR = 0.1
STEP_DECAY_AT = (0.5, 0.75)


def base_total_steps(cell: Cell, base_steps_per_epoch: int) -> int:
    """The step budget of the same cell at the base batch m_0 (the anchor of the shared eval grid)."""
    return total_steps(cell, base_steps_per_epoch, batch_size=cell.base_batch)


def warmup_steps(cell: Cell, steps_per_epoch: int) -> int:
    """Steps of the linear warm-up: W epochs for ``lsr``, none for the other strategies."""
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
    if step < warm:
        # Linear from eta_0 at step 0 towards the peak, reached at step `warm`.
        return cell.base_lr + (peak - cell.base_lr) * step / warm
    if cell.decay == "step":
        return peak * STEP_DECAY_FACTOR ** sum(step >= f * total for f in STEP_DECAY_AT)
    if cell.decay == "cosine":
        span = max(1, total - warm)
        progress = min(1.0, (step - warm) / span)
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak


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
