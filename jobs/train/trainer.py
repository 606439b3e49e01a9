"""The trainer of one cell: the parts it assembles, its resumable state, and the loop.

    Plan        the batch arithmetic and step budget (printed at start)       plan.py
    optimizer   built by name from the cell's options and rules               optimizers.py
    NoiseProbe  the gradient-noise measurement, its mode fixed at start        noise.py
    StepSync    the steps' figures, copied to the host every few steps         sync.py
    Stopwatch   training time, evaluations and checkpoints excluded            sync.py
    Evaluator   loss and metric over the train subset and the test split       evaluate.py
    LogStream   step and eval rows to the store, in the background             critbatch.jobs.store.logstream
    Checkpointer  the resumable state in the store                             checkpoint.py
    CellGuard   rank 0's lease on the cell, the fence before deletions         guard.py
    Progress    the bar, lines or JSON lines on rank 0                         progress.py
    ThresholdStop  the end once the loss has crossed the cell's stop threshold stop.py
    finish      paper 4.2's error, model.pt and _SUCCESS                       finish.py

Resume: the trainer's state (step, data position, last evaluation, training
time, model, optimizer, every rank's RNG states, the log part indices) is one
state dict, checkpointed every ``checkpoint_seconds`` / ``checkpoint_steps``
and on SIGTERM (then :class:`Preempted` is raised). On the CPU a resumed run
ends with weights bit-identical to an uninterrupted one (deterministic
algorithms, same thread count). Rank 0 alone writes.

A resume starts from the newest checkpoint whose log parts are all whole in
the store (rank 0 reads them back first): a part lost or cut sends it back to
an older checkpoint, or to the start, and the parts past that point are
deleted behind the fence. A lease lost to another trainer stops the loop like
a SIGTERM, but the checkpoint is refused and LeaseHeld raised.

Kept checkpoints (``cell.keep``) are saved at their steps and never pruned;
``_SUCCESS`` lists them as ``kept``. A branch (``cell.branch``) without a
checkpoint of its own starts from its base's kept checkpoint at t: the weights,
the optimizer's state (its hyperparameters the branch's own), the RNG states
(its seed the base's) and the data position, whose epoch it finishes at its own
batch (``offset``: the examples of that epoch the base had seen), from step 0.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..cell.errors import BasePending, ConfigError, StoreUnavailable
from ..cell.layout import cell_prefix, checkpoint_dir
from ..cell.spec import Cell
from ..cell.version import code_version
from ..data.datasets import StreamData, TaskData
from ..models.zoo import loss_fn, metric_name
from ..store import Store
from ..store.cellstate import KINDS, RECORD, read_record, readable_parts
from ..store.logstream import LogStream, spool_dir
from . import distributed
from .checkpoint import Checkpointer
from .distributed import Dist, all_gather_object
from .evaluate import Evaluator
from .finish import final_linear_approx_error, summarize, write_results
from .guard import CellGuard
from .noise import NoiseSample, noise_probe
from .optimizers import build_optimizer, probe_step, set_lr
from .plan import Plan
from .progress import Progress
from .rng import rng_state, seed_rngs, set_rng_state
from .stop import ThresholdStop
from .sync import Pending, StepSync, Stopwatch

#: Seconds to wait for log parts to reach the store before a periodic checkpoint is skipped (the
#: store is down: training goes on, the parts wait in the spool, the next checkpoint tries again),
#: the same while the store is known to be down (the previous checkpoint was skipped), and before
#: the SIGTERM checkpoint gives up (torchrun kills its workers 30 s after forwarding it).
CHECKPOINT_LOG_TIMEOUT_S = 5.0
CHECKPOINT_LOG_TIMEOUT_DOWN_S = 0.5
SIGTERM_LOG_TIMEOUT_S = 20.0


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was written (if the store allowed) and the process should exit."""

    def __init__(self, step: int, checkpointed: bool):
        super().__init__(f"stopped at step {step} on SIGTERM ({'checkpointed' if checkpointed else 'no checkpoint'})")
        self.step = step
        self.checkpointed = checkpointed


class Paused(Exception):
    """The step asked for (``critbatch train --pause-at``) was reached: a checkpoint was written and the cell
    waits, without ``_SUCCESS``, for a run that asks for more (a batch-size search's learning-rate race)."""

    def __init__(self, step: int, checkpointed: bool):
        super().__init__(f"paused at step {step} ({'checkpointed' if checkpointed else 'no checkpoint'})")
        self.step = step
        self.checkpointed = checkpointed


class Trainer:
    """One cell's training. ``run()`` resumes, trains, evaluates and writes ``_SUCCESS``; set ``stop_requested``
    (the SIGTERM handler does) to checkpoint at the next sync and raise :class:`Preempted`."""

    def __init__(self, cell: Cell, store: Store, data: TaskData, model: nn.Module, device: torch.device,
                 dist: Dist, *, flush_steps: int, flush_seconds: float, checkpoint_seconds: float,
                 checkpoint_steps: int, progress: str, guard: CellGuard | None = None, pause_at: int | None = None):
        self.cell, self.store, self.data, self.device, self.dist = cell, store, data, device, dist
        self.guard = guard  # rank 0 in a run that holds the cell's lease
        self.prefix = cell_prefix(cell.sweep, cell.id)
        self.flush_steps, self.flush_seconds, self.progress_mode = flush_steps, flush_seconds, progress
        self.checkpoint_seconds, self.checkpoint_steps = checkpoint_seconds, checkpoint_steps
        self.plan = Plan.of(cell, data, dist.world)
        if cell.ramp is not None and isinstance(data, StreamData):
            raise ConfigError(f"cell.ramp: {cell.dataset.name!r} is a stream, which has no epochs to change the batch "
                              "at; allowed: datasets held in memory")
        self.cuda = device.type == "cuda"
        self.channels_last = self.cuda and len(data.input_shape) == 3
        _configure_backends(self.cuda)
        self.raw_model = model.to(device)
        if self.channels_last:
            self.raw_model = self.raw_model.to(memory_format=torch.channels_last)
        self.model: nn.Module = self.raw_model  # wrapped in DDP by run() when there are several ranks
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.loss_fn, self.metric = loss_fn(data.task), metric_name(data.task)
        self.optimizer = build_optimizer(cell, self.raw_model, self.plan.derived)
        if hasattr(self.optimizer, "split"):  # Muon: which parameters each part updates, for cell.json
            self.plan.derived["optimizer_split"] = self.optimizer.split
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cell.precision == "bf16"
                         else nullcontext())

        self.noise = noise_probe(cell.noise.every, m=self.plan.m, accumulation=self.plan.accumulation, dist=dist,
                                 model=self.raw_model, params=self.params, task=data.task, device=device,
                                 loss_of=lambda x, y: self._loss(self.raw_model, x, y))
        self.evaluator = Evaluator(self.raw_model, data, self.loss_fn, dist=dist, micro_batch=self.plan.micro,
                                   prepare=self._prepare, autocast=self.autocast)
        self.step_sync = StepSync(dist, device, self.plan.m)
        self.stopwatch = Stopwatch(device)
        self.checkpointer = Checkpointer(store, self.prefix, pinned=self.plan.keep_steps)
        self.logs: LogStream | None = None  # rank 0
        self.progress: Progress | None = None  # rank 0

        # The resumable state besides the stopwatch, model, optimizer and RNGs (see state_dict()).
        self.step = 0
        self.epoch = 0
        self.batch_index = 0  # batches of `epoch` already consumed
        self.offset = 0  # examples of `epoch` consumed before its first batch here (a branch's first epoch)
        self.last_eval: dict[str, Any] = {}
        self.skipped_steps = 0  # bf16: steps whose gradient was not finite, not applied

        self.stop_requested = False
        self.pause_at = pause_at
        self.threshold = ThresholdStop(cell.stop) if cell.stop is not None else None
        self.at_threshold = False  # the last evaluation confirmed the threshold's crossing
        self.diverged: tuple[int, str] | None = None  # (step, reason)
        self._batches: Iterator[tuple[Tensor, Tensor]] | None = None
        self._last_checkpoint = time.monotonic()
        self._store_down = False  # the last checkpoint was skipped for an unreachable store
        self._last_loss = math.nan

    # ---- state -----------------------------------------------------------------------

    def state_dict(self, rngs: list[dict[str, Any]], log_parts: dict[str, int]) -> dict[str, Any]:
        """Everything a resume needs; ``rngs`` are every rank's RNG states, ``log_parts`` the next part indices."""
        return {
            "cell_id": self.cell.id, "step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
            "samples_seen": self.plan.samples(self.step), "wall_time_s": self.stopwatch.total,
            "last_eval": self.last_eval, "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "rng": rngs, "world_size": self.dist.world, "logs": log_parts,
            "data": self.data.state_dict(),  # a stream's position (rank 0's; the same on every rank), else {}
            "threshold": self.threshold.state_dict() if self.threshold is not None else None,
            "skipped_steps": self.skipped_steps, "offset": self.offset,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
        self.stopwatch.total, self.last_eval = state["wall_time_s"], state.get("last_eval", {})
        self.skipped_steps, self.offset = state.get("skipped_steps", 0), state.get("offset", 0)
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.data.load_state_dict(state.get("data") or {})
        if self.threshold is not None and state.get("threshold"):
            self.threshold.load_state_dict(state["threshold"])
        rngs = state["rng"]
        if len(rngs) == self.dist.world:
            set_rng_state(rngs[self.dist.rank], self.device)
        else:
            # A different world size: data order and augmentation do not depend on it, dropout does.
            if self.dist.is_main:
                print(f"critbatch train: checkpoint from {len(rngs)} ranks, now {self.dist.world}; "
                      f"reseeding the per-rank RNGs", flush=True)
            seed_rngs(self.cell.seed, self.dist.rank, self.step)

    # ---- run ---------------------------------------------------------------------------

    def run(self) -> dict:
        if self.dist.is_main:
            noise = self.noise.describe() if self.noise is not None else "off"
            print(self.plan.banner(noise=noise, device=self.device, store=self.store.join(self.prefix)), flush=True)
        seed_rngs(self.cell.seed, self.dist.rank)
        checkpoint = self._resume_point()
        if checkpoint is not None:
            self.load_state_dict(checkpoint)
        elif self.cell.branch is not None:
            self._start_branch()
        if self.dist.active:
            ids = [self.device.index] if self.cuda else None
            self.model = nn.parallel.DistributedDataParallel(self.raw_model, device_ids=ids)
        if self.dist.is_main:
            self._open_logs(checkpoint)
        try:
            if checkpoint is None:
                self._evaluate()  # step 0: before training
            self._train()
            return self._finish()
        except BaseException:
            self._abandon_logs()
            raise
        finally:
            if self.progress is not None:
                self.progress.close()

    def _resume_point(self) -> dict | None:
        """The newest checkpoint whose log parts are all whole in the store (rank 0 reads them back and
        chooses; every rank loads that one), or None: start from step 0."""
        state = None
        if self.dist.is_main:
            scans = {kind: readable_parts(self.store, self.prefix, kind) for kind in KINDS}
            damage = "; ".join(scan.problem for scan in scans.values() if scan.problem)

            def whole_below(state: dict) -> str | None:
                logs = state.get("logs") or {}
                return None if all(int(logs.get(k, 0)) <= scans[k].readable for k in KINDS) else \
                    f"its log parts are not all whole ({damage})"

            state = self.checkpointer.load_latest(accept=whole_below)
            if damage:
                start = f"the checkpoint at step {state['step']}" if state is not None else "step 0"
                print(f"critbatch train: cell {self.cell.id}: {damage}; training again from {start}", flush=True)
        if self.dist.active:
            step = all_gather_object(None if state is None else state["step"], self.dist)[0]
            if not self.dist.is_main and step is not None:
                state = self.checkpointer.load(step)
        return state

    def _start_branch(self) -> None:
        """A branch's first start: its base's kept checkpoint at t (every rank reads it), as step 0 of its own."""
        b, t = self.cell.branch, self.plan.derived["branch"]["start_step"]
        base_batch = self.cell.batch_size // b.multiplier
        state = Checkpointer(self.store, cell_prefix(self.cell.sweep, b.base)).load(t)
        if state is None:
            raise BasePending(f"the checkpoint of base cell {b.base} at step {t} is gone from the store")
        streamed = isinstance(self.data, StreamData)
        if streamed and b.seed != self.cell.seed:
            raise ConfigError(f"cell.branch.seed: {self.cell.dataset.name!r} is a stream, which a branch continues "
                              f"from its base's position; allowed: the base's seed {self.cell.seed}")
        self.raw_model.load_state_dict(state["model"])
        # The moments carry over; the hyperparameters are the branch's own (its rules at k x B).
        mine = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, mine):
            group.update(settings)
        rngs = state["rng"]
        if b.seed == self.cell.seed and len(rngs) == self.dist.world:
            set_rng_state(rngs[self.dist.rank], self.device)
        else:
            seed_rngs(b.seed, self.dist.rank, t)
        if streamed:
            self.data.load_state_dict(state.get("data") or {})
            self.epoch = state["epoch"]
        else:
            # The base's position: batch_index x B examples into its epoch `epoch`; this branch finishes that
            # epoch at its own batch (the rest reshuffled by another seed), then goes on from the next.
            self.epoch, self.offset = state["epoch"], state["batch_index"] * base_batch
            if self.data.epoch_batches(self.plan.m, self.offset) == 0:
                self.epoch, self.offset = self.epoch + 1, 0
        if self.dist.is_main:
            print(f"critbatch train: branch {self.cell.id} starts from base cell {b.base} at step {t} (epoch "
                  f"{state['epoch']}, {state['batch_index'] * base_batch} examples into it)", flush=True)

    def _open_logs(self, checkpoint: dict | None) -> None:
        """Rank 0: cell.json (on the first start), the log stream from the checkpoint's part indices, progress."""
        write_cell_record(self.store, self.prefix, self.cell, self.plan.derived)
        guard = self.guard
        self.logs = LogStream(
            self.store, self.prefix, spool_dir=guard.spool if guard else spool_dir(self.store),
            flush_steps=self.flush_steps, flush_seconds=self.flush_seconds, cell_id=self.cell.id,
            fence=(lambda: guard.fence("deleting the log parts past the checkpoint")) if guard else None,
            may_write=guard.may_write if guard else None)
        self.logs.resume(checkpoint["logs"] if checkpoint is not None else None)
        if checkpoint is not None:
            print(f"critbatch train: resumed from the checkpoint at step {self.step} "
                  f"(epoch {self.epoch}, batch {self.batch_index})", flush=True)
        self.progress = Progress(self.progress_mode, self.plan.total, self.step)

    def _abandon_logs(self) -> None:
        """On an exception: stop the log threads; rows past the last checkpoint are redone on resume."""
        if self.logs is not None:
            try:
                # With the lease lost, nothing more may reach the store: do not wait for the parts.
                self.logs.close(timeout=0.0 if self.guard is not None and self.guard.lost else 10.0)
            except (StoreUnavailable, RuntimeError) as err:
                print(f"critbatch train: log parts not all uploaded on exit ({err})", file=sys.stderr)
            self.logs = None

    # ---- the loop ----------------------------------------------------------------------

    def _train(self) -> None:
        plan = self.plan
        self.model.train()
        if self.pause_at is not None and self.step >= self.pause_at:
            raise Paused(self.step, True)  # resumed at its pause point: nothing to do until asked for more
        self.stopwatch.start()
        while self.step < plan.total:
            parts = plan.accumulation_of(self.epoch)  # a ramp's epoch at k x B: k x the micro-batches
            x, y = self._next_batch()
            lr = plan.lr(self.step)
            measure = self.noise is not None and self.noise.due(self.step + 1)
            loss, noise = self._update(x, y, lr, measure, parts)
            self.step += 1
            epoch = (self.epoch + self.batch_index / plan.epoch_steps(self.epoch) if not self.offset else
                     self.epoch + (self.offset + self.batch_index * plan.m) / self.data.n_train)
            self.step_sync.add(Pending(self.step, epoch, lr, self.stopwatch.now(), loss, noise,
                                       samples=plan.samples(self.step)))

            at_pause = self.step == self.pause_at
            at_eval = self.step in plan.eval_at or at_pause or (
                self.threshold is not None and self.threshold.wants_eval(self.step))
            at_checkpoint = (self.checkpoint_steps > 0 and self.step % self.checkpoint_steps == 0) or \
                self.step in plan.keep_steps
            if not (at_eval or at_checkpoint or self.step_sync.due(self.step) or self.step == plan.total):
                continue
            stop, due = self._sync()
            if self.diverged:
                break
            if at_eval:
                self._evaluate()
            if self.step == plan.total or self.at_threshold:
                break
            if at_checkpoint or due or stop or at_pause:
                saved = self._checkpoint(stopping=stop, kept=self.step in plan.keep_steps)
                if stop or at_pause:
                    self.stopwatch.stop()
                    self._abandon_logs()  # synced by the checkpoint; only stops the threads
                    raise Preempted(self.step, saved) if stop else Paused(self.step, saved)
        self.stopwatch.stop()

    def _next_batch(self) -> tuple[Tensor, Tensor]:
        if self._batches is None:
            # A branch's data seed orders its epochs; the epoch it enters part-way is its base's (seed), the
            # rest of it reordered when the branch's seed is another.
            seed = self.cell.branch.seed if self.cell.branch is not None else self.cell.seed
            partial = {} if not self.offset else {
                "skip": self.offset, "reshuffle": None if seed == self.cell.seed else seed}
            self._batches = self.data.train_batches(self.epoch, self.plan.batch(self.epoch),
                                                    seed=self.cell.seed if partial else seed, rank=self.dist.rank,
                                                    world=self.dist.world, start=self.batch_index, **partial)
        x, y = next(self._batches)
        self.batch_index += 1
        if self.batch_index >= (self.plan.epoch_steps(self.epoch) if not self.offset else
                                self.data.epoch_batches(self.plan.m, self.offset)):
            self.epoch, self.batch_index, self.offset, self._batches = self.epoch + 1, 0, 0, None
        return x, y

    def _update(self, x: Tensor, y: Tensor, lr: float, measure: bool, parts: int | None = None
                ) -> tuple[Tensor, NoiseSample | None]:
        """One optimizer step on this rank's share (x, y) of the global batch, in ``parts`` micro-batches (default:
        the cell's accumulation); (mean loss, noise sample) on the device.

        The loss is this rank's (the mean over ranks is taken at the next sync).
        """
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        if measure:
            loss, noise = self.noise.measure(self._backward, x, y)
        else:
            loss, noise = self._backward(x, y, parts or self.plan.accumulation), None
        if self.cell.precision == "bf16":
            # Mixed precision (gpt-neox's habit): a step whose gradient is not finite is skipped and counted,
            # not applied; the check costs a host sync per step, so fp32 cells do without it.
            norm = nn.utils.get_total_norm([p.grad.float() for p in self.params if p.grad is not None])
            if not torch.isfinite(norm):
                self.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
                return loss, noise
            if self.cell.clip_grad is not None:
                nn.utils.clip_grads_with_norm_(self.params, self.cell.clip_grad, norm)
        elif self.cell.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.params, self.cell.clip_grad)
        self.optimizer.step()
        return loss, noise

    def _backward(self, x: Tensor, y: Tensor, parts: int, *, reduce: bool = True,
                  after_first: Callable[[], None] | None = None) -> Tensor:
        """Forward and backward of (x, y) in ``parts`` micro-batches, losses scaled by 1 / parts; the mean loss.

        With several ranks DDP all-reduces in the last micro-batch's backward
        only (the earlier ones accumulate locally); ``reduce=False`` skips that
        too, for a caller that reduces by hand. ``after_first`` runs after the
        first micro-batch (the noise probe reads its gradient there).
        """
        xs, ys = (x.chunk(parts), y.chunk(parts)) if parts > 1 else ((x,), (y,))
        total: Tensor | None = None
        for i, (xm, ym) in enumerate(zip(xs, ys)):
            sync = self.dist.active and reduce and i == parts - 1
            with (self.model.no_sync() if self.dist.active and not sync else nullcontext()):
                loss = self._loss(self.model, xm, ym)
                (loss / parts if parts > 1 else loss).backward()
            loss = loss.detach().float()
            total = loss if total is None else total + loss
            if i == 0 and after_first is not None:
                after_first()
        return total / parts if parts > 1 else total

    def _loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with self.autocast:
            return self.loss_fn(model(self._prepare(x)), y)

    def _prepare(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _sync(self) -> tuple[bool, bool]:
        """Log the pending steps (at the host sync); agree over ranks on (stop, checkpoint due).

        A SIGTERM seen by any rank stops every rank; a time-based checkpoint is
        due by rank 0's clock. Rows after a non-finite loss are not logged.
        """
        due = self.dist.is_main and time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds
        stop = self.stop_requested or (self.guard is not None and self.guard.lost is not None)
        rows, (stop, due) = self.step_sync.sync(stop, due, now=self.stopwatch.now)
        for row in rows:
            if self.logs is not None:
                self.logs.log_step(row)
            loss = row["train_loss"]
            if not math.isfinite(loss):
                self.diverged = (row["step"], f"non-finite training loss ({loss}) at step {row['step']}")
                break
            self._last_loss = loss
        if self.progress is not None and rows:
            last = rows[-1]
            self.progress.update(last["step"], self._last_loss, last["lr"], force=last["step"] == self.plan.total)
        return stop, due

    def _evaluate(self) -> None:
        """Both splits at the current step, logged as eval rows (their time not counted as training)."""
        with self.stopwatch.paused():
            self.last_eval, rows = self.evaluator.at(self.step, self.plan.epoch_at(self.step))
        if self.logs is not None:
            for row in rows:
                self.logs.log_eval(row)
        if self.threshold is not None:
            self.at_threshold = self.threshold.observe(self.step, self.last_eval["train_loss"])

    def _checkpoint(self, stopping: bool = False, kept: bool = False) -> bool:
        """Save the state; the logs are synced first so that its part indices cover every step so far.

        A store that stays down skips a periodic checkpoint, but not a kept one (``kept``): its
        StoreUnavailable ends the run (exit 202), and the retry reaches the step again."""
        with self.stopwatch.paused():
            rngs = all_gather_object(rng_state(self.device), self.dist)
            saved = False
            if self.dist.is_main:
                try:
                    timeout = (SIGTERM_LOG_TIMEOUT_S if stopping else
                               CHECKPOINT_LOG_TIMEOUT_DOWN_S if self._store_down else CHECKPOINT_LOG_TIMEOUT_S)
                    if self.guard is not None:
                        self.guard.fence("checkpoint")  # LeaseHeld: the lease was lost; nothing more is written
                    parts = self.logs.sync(timeout=timeout)
                    self.checkpointer.save(self.step, self.state_dict(rngs, parts))
                    saved, self._store_down = True, False
                except StoreUnavailable as err:
                    if kept:
                        raise
                    self._store_down = True
                    print(f"critbatch train: checkpoint at step {self.step} skipped, store unavailable ({err})",
                          file=sys.stderr, flush=True)
            self._last_checkpoint = time.monotonic()
        return saved

    def _finish(self) -> dict:
        """Paper 4.2's error at the final weights (all ranks), then rank 0's last writes (finish.py)."""
        lin_approx = None
        if not self.diverged:
            # The first batch of the epoch after training (this rank's share).
            batch = next(self.data.train_batches(self.epoch + 1, self.plan.m, seed=self.cell.seed,
                                                 rank=self.dist.rank, world=self.dist.world))
            lin_approx = final_linear_approx_error(
                self.raw_model, batch, parts=self.plan.accumulation, dist=self.dist,
                loss_of=lambda x, y: self._loss(self.raw_model, x, y),
                loss_at=lambda: self.evaluator.split("train")[0],
                step_size=probe_step(self.cell, self.plan.derived))
        step, reason = self.diverged or (self.step, None)
        summary = summarize(self.cell, steps=step, wall_time_s=self.stopwatch.total, metric=self.metric,
                            last_eval=self.last_eval, diverged=reason, lin_approx=lin_approx,
                            stop=self.threshold.summary() if self.threshold is not None else None)
        if self.cell.precision == "bf16":
            summary["skipped_nonfinite_steps"] = self.skipped_steps
        if self.plan.keep_steps:  # the kept checkpoints the run reached, for its branches
            there = set(self.checkpointer.complete_steps()) if self.dist.is_main else set()
            summary["kept"] = [{**point, "checkpoint": checkpoint_dir("", point["step"]).lstrip("/")}
                               for point in self.plan.derived["keep"] if point["step"] in there]
        if self.dist.is_main:
            if reason is not None:
                print(f"critbatch train: cell {self.cell.id} diverged: {reason}", flush=True)
            logs, self.logs = self.logs, None
            weights = None if reason is not None else self.raw_model.state_dict()
            summary = write_results(self.store, self.cell, summary, logs=logs, weights=weights, guard=self.guard,
                                    kept=self.plan.keep_steps)
        distributed.barrier(self.dist)
        return summary


def _configure_backends(cuda: bool) -> None:
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the paper's numerics
        torch.backends.cudnn.allow_tf32 = False
    else:
        # Bit-identical resume on the CPU; ops without a deterministic kernel only warn.
        # torch.use_deterministic_algorithms() also imports the compiler stack to set its flag
        # (about 2 s per start-up); nothing here compiles, so set the eager flag alone when possible.
        setter = getattr(torch._C, "_set_deterministic_algorithms", None)
        if setter is not None:
            setter(True, warn_only=True)
        else:  # pragma: no cover - other torch versions
            torch.use_deterministic_algorithms(True, warn_only=True)


def write_cell_record(store: Store, prefix: str, cell: Cell, derived: dict) -> bool:
    """``cell.json``: the cell, its id, the code version (and the versions of the plug-ins it uses) and the derived
    figures. A resumed run keeps the first; one that is not this cell's record (damaged, missing) is written
    anew. True when written."""
    key = f"{prefix}/{RECORD}"
    try:
        read_record(store.get_bytes(key), cell.id)
        return False
    except (KeyError, ValueError):
        pass
    body = {
        **cell.to_dict(), "id": cell.id, "code_version": code_version(), "derived": derived,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    plugins = cell.plugins()
    if plugins:  # models and datasets of other packages, with their versions (critbatch's are code_version's)
        body["plugins"] = plugins
    store.put_text(key, json.dumps(body, indent=2, sort_keys=True) + "\n")
    return True
