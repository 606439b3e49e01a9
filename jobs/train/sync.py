"""When the host waits for the device: the steps' logged figures, and the training clock.

A step's loss (and, on the steps the noise probe measures, its two squared
gradient norms) are 0-dim tensors on the device. Reading one on the host waits
for every kernel queued before it, so :class:`StepSync` keeps them as they are
and copies them all in one go every ``every`` steps (GPU_SYNC_EVERY on a GPU;
every step on the CPU, where a sync costs nothing), and at evaluations,
checkpoints and the end. They travel packed in one float64 tensor together
with the ranks' flags, so one all-reduce also gives the mean over ranks:

    [loss_1 .. loss_n | g_small_1 .. g_small_k | g_big_1 .. g_big_k | flag_1 .. flag_f]
     n pending steps    k of them measured       (|G_B|^2 is the same on every rank)

Divergence (a non-finite loss) is therefore seen at the next sync, at the
step where it happened.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from .distributed import Dist, all_reduce_mean_
from .noise import NoiseSample

#: Steps between host syncs of the logged figures on a GPU (on the CPU: every step).
GPU_SYNC_EVERY = 25


@dataclass
class Pending:
    """A step whose figures are still on the device."""

    step: int
    epoch: float
    lr: float
    wall: float
    loss: Tensor
    noise: NoiseSample | None = None
    samples: int | None = None  # examples seen after it, where the batch changes over the run (a ramp)


class StepSync:
    """The pending steps of one rank, and their copy to the host as ``steps`` log rows."""

    def __init__(self, dist: Dist, device: torch.device, samples_per_step: int):
        self.dist, self.device = dist, device
        self.cuda = device.type == "cuda"
        self.every = GPU_SYNC_EVERY if self.cuda else 1
        self.samples_per_step = samples_per_step
        self.pending: list[Pending] = []

    def add(self, pending: Pending) -> None:
        self.pending.append(pending)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def sync(self, *flags: bool, now: Callable[[], float]) -> tuple[list[dict], list[bool]]:
        """The pending steps' rows (means over ranks) and each flag, true if it is true on any rank.

        Every rank must call it at the same step (it is a collective). ``now``
        gives the training clock: on a GPU the last row's wall time is read
        again after the copy, when the device has caught up.
        """
        pending, self.pending = self.pending, []
        measured = [p for p in pending if p.noise is not None]
        parts = [torch.stack([p.loss.double() for p in pending])] if pending else []
        if measured:
            parts.append(torch.stack([p.noise.g_small_sq.double() for p in measured]))
            parts.append(torch.stack([p.noise.g_big_sq.double() for p in measured]))
        parts.append(torch.tensor([float(f) for f in flags], dtype=torch.float64, device=self.device))
        values = all_reduce_mean_(torch.cat(parts), self.dist).tolist()  # the one host sync
        if pending and self.cuda:
            pending[-1].wall = now()
        n, k = len(pending), len(measured)
        losses, small, big = values[:n], values[n:n + k], values[n + k:n + 2 * k]
        noise = {p.step: (p.noise.b_small, p.noise.b_big, s, b) for p, s, b in zip(measured, small, big)}
        rows = []
        for p, loss in zip(pending, losses):
            samples = p.step * self.samples_per_step if p.samples is None else p.samples
            row = {"step": p.step, "epoch": p.epoch, "samples_seen": samples, "lr": p.lr, "train_loss": loss,
                   "wall_time_s": p.wall}
            if p.step in noise:
                row.update(zip(("noise_b_small", "noise_b_big", "noise_g_small_sq", "noise_g_big_sq"), noise[p.step]))
            rows.append(row)
        return rows, [v > 0 for v in values[n + 2 * k:]]


class Stopwatch:
    """Seconds of training so far, evaluations and checkpoints excluded (part of the resumable state)."""

    def __init__(self, device: torch.device, total: float = 0.0):
        self.device, self.total = device, total
        self._since: float | None = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        """Add the running segment, once the device has caught up with it."""
        if self._since is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.total += time.perf_counter() - self._since
            self._since = None

    def now(self) -> float:
        return self.total + (time.perf_counter() - self._since if self._since is not None else 0.0)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stopped inside the block, running after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()
