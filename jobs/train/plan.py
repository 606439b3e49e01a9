"""A cell's batch arithmetic and step budget, derived once and printed at start-up.

    global batch m   = micro-batch x accumulation x world size   (divisibility checked by Cell.problems)
    rank's share     = m / world, split into ``accumulation`` micro-batches whose losses are scaled by
                       1 / accumulation, so one update applies the mean gradient over all m examples
    steps per epoch  = floor(n_train / m)                         (the last partial batch is dropped)
    total steps      = E epochs of them, or T tokens / (m x seq_len) (``longer``: x m / m0), capped at ``max_steps``

In a batch-size study this is the number everything hangs on, so it is
printed before the first step and stored in ``cell.json`` (``derived``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from critbatch.jobs.cell.optimizers import scaled_optimizer
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.data.datasets import TaskData

from .stop import dense_steps
from .strategies import base_total_steps, eval_steps, lr_at, peak_lr, total_steps, warmup_steps


@dataclass(frozen=True)
class Plan:
    cell: Cell
    n_train: int
    world: int
    per_rank: int  # rows of each global batch on one rank
    micro: int  # rows of one forward/backward pass
    steps_per_epoch: int
    total: int
    base_total: int  # the budget at the base batch m0, the anchor of the shared evaluation grid
    eval_at: frozenset[int]
    derived: dict  # the data's figures (beta, lambda_1 for linreg, ...) and the above, for cell.json

    @classmethod
    def of(cls, cell: Cell, data: TaskData, world: int) -> "Plan":
        spe = data.steps_per_epoch(cell.batch_size)
        total = total_steps(cell, spe)
        base_total = base_total_steps(cell, data.steps_per_epoch(cell.base_batch))
        per_rank = cell.batch_size // world
        micro = per_rank // cell.accumulation
        derived = {
            **data.info, "n_train": data.n_train, "steps_per_epoch": spe, "total_steps": total,
            "base_total_steps": base_total, "warmup_steps": warmup_steps(cell, spe), "world_size": world,
            "micro_batch": micro,
        }
        return cls(cell, data.n_train, world, per_rank, micro, spe, total, base_total,
                   frozenset(eval_steps(cell, total, base_total)).union(
                       dense_steps(cell.stop, total, base_total, cell.eval.points)), derived)

    @property
    def m(self) -> int:
        return self.cell.batch_size

    @property
    def accumulation(self) -> int:
        return self.cell.accumulation

    def lr(self, step: int) -> float:
        """The learning rate of the update made after ``step`` updates."""
        return lr_at(self.cell, step, self.steps_per_epoch, self.derived)

    def banner(self, *, noise: str, device: torch.device, store: str) -> str:
        """The start-up lines: the cell, the batch arithmetic, the budget, the schedule, evaluations, where."""
        c = self.cell
        evals = sorted(self.eval_at)
        peak = peak_lr(c, self.derived)
        options = scaled_optimizer(c.optimizer, c.rules, self.m / c.base_batch, c.base_lr, peak)
        rules = f" after rules {', '.join(c.rules)}" if c.rules else ""
        seq = c.tokens_per_example()
        amount = f"{c.tokens:g} tokens" if c.tokens is not None else f"{c.epochs:g} epochs"
        budget = (f"{amount}{', x m/m0 (longer)' if c.strategy == 'longer' else ''}"
                  f"{f', capped at max_steps {c.max_steps}' if c.max_steps else ''}")
        return "\n".join([
            f"critbatch train: cell {c.id} (sweep {c.sweep}): {c.dataset.name}/{c.model}, strategy {c.strategy}, "
            f"seed {c.seed}",
            f"  global batch {self.m} = micro-batch {self.micro} x accumulation {self.accumulation} x world size "
            f"{self.world}  (base batch m0 = {c.base_batch})",
            f"  train examples {self.n_train} -> {self.steps_per_epoch} steps/epoch; total steps {self.total} "
            f"({budget}); base budget {self.base_total}"
            + (f"; {self.m * seq} tokens per step (m x seq_len {seq})" if seq else ""),
            f"  lr {self.lr(0):.6g} at step 0 -> peak {peak:.6g} (warm-up "
            f"{self.derived['warmup_steps']} steps) -> {self.lr(self.total - 1):.6g} at the last step; decay "
            f"{c.decay}; {options.describe()}{rules}",
            f"  evaluations at {len(evals)} iterations ({_abbreviate(evals)}); noise statistics {noise}",
            f"  device {device}, precision {c.precision}, store {store}",
        ])


def _abbreviate(values: list[int], head: int = 6) -> str:
    shown = ", ".join(map(str, values[:head]))
    return shown if len(values) <= head + 1 else f"{shown}, ..., {values[-1]}"
