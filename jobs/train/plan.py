"""A cell's batch arithmetic and step budget, derived once and printed at start-up.

    global batch m   = micro-batch x accumulation x world size   (divisibility checked by Cell.problems)
    rank's share     = m / world, split into ``accumulation`` micro-batches whose losses are scaled by
                       1 / accumulation, so one update applies the mean gradient over all m examples
    steps per epoch  = floor(n_train / m)                         (the last partial batch is dropped)
    total steps      = E epochs of them, or T tokens / (m x seq_len) (``longer``: x m / m0), capped at ``max_steps``

A ramp (``cell.ramp``, docs/ramp.md) changes the batch at epoch boundaries: the
epochs of a phase at batch k x m take floor(n_train / (k m)) steps each, its
micro-batch stays m's and its accumulation is k x the cell's; the LR of an
update is the cell's rate at the step m would have made at the same point of
the data (epoch x its steps per epoch + batch index x k), times the rule's factor.

In a batch-size study this is the number everything hangs on, so it is
printed before the first step and stored in ``cell.json`` (``derived``), with
the kept checkpoints' steps (``derived.keep``) and a branch's start
(``derived.branch``: its base's step, examples and rate at t, its own rate) and a ramp's phases
(``derived.ramp``: each one's epoch, batch, accumulation, first step and examples, LR factor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cell.optimizers import scaled_optimizer
from ..cell.spec import Cell, branch_start
from ..data.datasets import TaskData
from .stop import dense_steps
from .strategies import (
    base_rate_at_branch,
    base_total_steps,
    eval_steps,
    lr_at,
    peak_lr,
    ramp_stages,
    ramp_total_steps,
    total_steps,
    warmup_steps,
)


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
    keep_steps: frozenset[int] = frozenset()  # steps whose checkpoints outlive the run (cell.keep)
    branch_lr: float | None = None  # a branch's constant rate
    ramp: tuple[dict, ...] = ()  # a ramp's phases (derived["ramp"]); empty at one batch

    @classmethod
    def of(cls, cell: Cell, data: TaskData, world: int) -> "Plan":
        spe = data.steps_per_epoch(cell.batch_size)
        ramp = ramp_stages(cell, data.n_train, data.info) if cell.ramp is not None else []
        total = total_steps(cell, spe) if not ramp else ramp_total_steps(cell, ramp)
        base_total = base_total_steps(cell, data.steps_per_epoch(cell.base_batch))
        per_rank = cell.batch_size // world
        micro = per_rank // cell.accumulation
        derived = {
            **data.info, "n_train": data.n_train, "steps_per_epoch": spe, "total_steps": total,
            "base_total_steps": base_total, "warmup_steps": warmup_steps(cell, spe), "world_size": world,
            "micro_batch": micro,
        }
        seq = cell.tokens_per_example()
        keep = cell.keep_points(total)
        if keep:
            derived["keep"] = [{"at": f, "step": step, "examples": step * cell.batch_size,
                                "tokens": step * cell.batch_size * seq if seq else None} for f, step in keep]
        if ramp:
            ramp = [{**stage, "accumulation": stage["batch"] // (micro * world)} for stage in ramp
                    if stage["first_step"] < total]
            derived["ramp"] = [{k: stage[k] for k in ("epoch", "batch", "accumulation", "first_step",
                                                       "first_examples", "steps_per_epoch", "lr_factor")}
                               for stage in ramp]
            derived["ramp_rule"] = cell.ramp.rule
        rate = None
        if cell.branch is not None:
            b, base_batch = cell.branch, cell.batch_size // cell.branch.multiplier
            start = branch_start(cell, data.n_train)
            rate = peak_lr(cell, derived)
            derived["branch"] = {
                "base": b.base, "at": b.at, "start_step": start, "start_examples": start * base_batch,
                "start_tokens": start * base_batch * seq if seq else None, "base_batch": base_batch,
                "multiplier": b.multiplier, "rule": b.rule, "base_lr": base_rate_at_branch(cell, derived),
                "lr": rate, "examples": total * cell.batch_size}
        return cls(cell, data.n_train, world, per_rank, micro, spe, total, base_total,
                   frozenset(eval_steps(cell, total, base_total)).union(
                       dense_steps(cell.stop, total, base_total, cell.eval.points)), derived,
                   frozenset(step for _, step in keep), rate, tuple(ramp))

    @property
    def m(self) -> int:
        return self.cell.batch_size

    @property
    def accumulation(self) -> int:
        return self.cell.accumulation

    def lr(self, step: int) -> float:
        """The learning rate of the update made after ``step`` updates."""
        if self.branch_lr is not None:
            return self.branch_lr
        if self.ramp:
            stage, epoch, index = self.position(step)
            at_m = epoch * self.steps_per_epoch + index * (stage["batch"] // self.m)
            return lr_at(self.cell, at_m, self.steps_per_epoch, self.derived) * stage["lr_factor"]
        return lr_at(self.cell, step, self.steps_per_epoch, self.derived)

    # ---- the batch of each epoch (one batch, or a ramp's) --------------------------------
    def stage(self, epoch: int) -> dict:
        """The ramp's phase that ``epoch`` belongs to."""
        return next(s for s in reversed(self.ramp) if s["epoch"] <= epoch)

    def _stage_at(self, step: int) -> dict:
        return next(s for s in reversed(self.ramp) if s["first_step"] <= step)

    def position(self, step: int) -> tuple[dict, int, int]:
        """A ramp's (phase, epoch, batch index in it) of the update made after ``step`` updates."""
        stage = self._stage_at(step)
        epochs, index = divmod(step - stage["first_step"], stage["steps_per_epoch"])
        return stage, stage["epoch"] + epochs, index

    def batch(self, epoch: int) -> int:
        """The global batch of ``epoch``'s updates."""
        return self.stage(epoch)["batch"] if self.ramp else self.m

    def epoch_steps(self, epoch: int) -> int:
        """Full batches of ``epoch`` (the last partial batch is dropped)."""
        return self.stage(epoch)["steps_per_epoch"] if self.ramp else self.steps_per_epoch

    def accumulation_of(self, epoch: int) -> int:
        """Micro-batches per rank of ``epoch``'s updates: a ramp's k x B take k x the cell's."""
        return self.stage(epoch)["accumulation"] if self.ramp else self.accumulation

    def samples(self, step: int) -> int:
        """Training examples seen after ``step`` updates."""
        if not self.ramp:
            return step * self.m
        stage = self._stage_at(step)
        return stage["first_examples"] + (step - stage["first_step"]) * stage["batch"]

    def epoch_at(self, step: int) -> float:
        """Epochs done after ``step`` updates (fractional)."""
        if not self.ramp:
            return step / self.steps_per_epoch
        stage, epoch, index = self.position(step)
        return epoch + index / stage["steps_per_epoch"]

    def banner(self, *, noise: str, device: torch.device, store: str) -> str:
        """The start-up lines: the cell, the batch arithmetic, the budget, the schedule, evaluations, where."""
        c = self.cell
        evals = sorted(self.eval_at)
        peak = peak_lr(c, self.derived)
        options = scaled_optimizer(c.optimizer, c.rules, self.m / c.base_batch, c.base_lr, peak)
        rules = f" after rules {', '.join(c.rules)}" if c.rules else ""
        seq = c.tokens_per_example()
        amount = f"{c.tokens:g} tokens" if c.tokens is not None else f"{c.epochs:g} epochs"
        if c.branch is not None:
            length = c.branch.length
            amount = f"branch length {length.examples} examples" if length.examples is not None else \
                f"branch length {length.tokens:g} tokens"
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
            *([self._branch_line()] if c.branch is not None else []),
            *(self._ramp_lines() if self.ramp else []),
            *([f"  keeps the checkpoints at steps {', '.join(map(str, sorted(self.keep_steps)))} after the run "
               "(for branches)"] if self.keep_steps else []),
            f"  evaluations at {len(evals)} iterations ({_abbreviate(evals)}); noise statistics {noise}",
            f"  device {device}, precision {c.precision}, store {store}",
        ])

    def _branch_line(self) -> str:
        b = self.derived["branch"]
        return (f"  branch of cell {b['base']} from its checkpoint at step {b['start_step']} "
                f"({b['start_examples']} examples): batch {b['multiplier']} x {b['base_batch']}, rule "
                f"{b['rule']}: lr {b['base_lr']:.6g} -> {b['lr']:.6g}, for {b['examples']} examples")

    def _ramp_lines(self) -> list[str]:
        lines = [f"  batch ramp, rule {self.cell.ramp.rule} (micro-batch {self.micro} throughout):"]
        for s in self.ramp:
            lines.append(f"    from epoch {s['epoch']} (step {s['first_step']}, {s['first_examples']} examples): "
                         f"batch {s['batch']} = {self.micro} x accumulation {s['accumulation']} x world size "
                         f"{self.world}, {s['steps_per_epoch']} steps/epoch, lr x {s['lr_factor']:.6g}")
        return lines


def _abbreviate(values: list[int], head: int = 6) -> str:
    shown = ", ".join(map(str, values[:head]))
    return shown if len(values) <= head + 1 else f"{shown}, ..., {values[-1]}"
