"""The gradient-noise probe (design section 6): |G_b|^2 and |G_B|^2 at the same weights.

Every ``noise.every``-th step the probe runs that step's backward pass itself,
so as to read a small-batch gradient (b examples) beside the step's full one
(B = m, the global batch), both before the update. How it gets the small one
depends on the batch layout, so :func:`noise_probe` picks the mode once:

    micro   MicroBatches  accumulation >= 2: the first micro-batch's gradient (b = micro-batch) against
                          the step's (all-reduced when there are several ranks). Free.
    rank    Ranks         several ranks, no accumulation: this rank's gradient (b = m / world) against the
                          all-reduced one; the step's backward skips DDP's all-reduce and averages by hand. Free.
    split   Halves        one process, no accumulation, even m, no BatchNorm, a per-example mean loss: the
                          step runs as two micro-batches of m / 2, which without BatchNorm is the same update
                          (up to the order of the sum). Free.
    extra   ExtraPass     one process otherwise, no BatchNorm: one more forward/backward on the batch's first
                          quarter (b = max(1, m // 4)), a quarter of a step per measurement (2.5 % at every = 10).
                          It runs with a forked RNG and restored buffers, so the trajectory is the same as without.
    pair    QuarterPair   one process with BatchNorm and no accumulation: BatchNorm makes a network's gradient
                          on b examples a different function from its gradient on B (each normalises over its
                          own batch), so the step's gradient cannot be the big one. Two extra passes on the
                          first two quarters (b = m // 4 each) give g_1 and g_2 under the same normalisation:
                          |G_b|^2 = (|g_1|^2 + |g_2|^2) / 2 and |G_B|^2 = |(g_1 + g_2) / 2|^2 with B = 2 b.
                          Half a step per measurement (5 % at every = 10); same RNG and buffer care as extra.
                          (micro and rank are already consistent: each part normalises over its own
                          micro-batch or rank and the step's gradient is their mean.)

The trainer's ``backward(x, y, parts, reduce=True, after_first=None)`` runs
forward and backward over ``parts`` micro-batches with each loss scaled by
1 / parts (so ``.grad`` holds the gradient of the mean loss), calls
``after_first()`` after the first one, all-reduces over ranks in the last one
unless ``reduce`` is false, and returns the mean loss on the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, NamedTuple, Protocol, Sequence

import torch
from torch import Tensor, nn

from .distributed import Dist, average_gradients_
from .evaluate import gradient_sq_norm


class NoiseSample(NamedTuple):
    """One measurement: the two batch sizes and the squared gradient norms (0-dim device tensors)."""

    b_small: int
    b_big: int
    g_small_sq: Tensor
    g_big_sq: Tensor


class Backward(Protocol):
    def __call__(self, x: Tensor, y: Tensor, parts: int, *, reduce: bool = True,
                 after_first: Callable[[], None] | None = None) -> Tensor: ...


class NoiseProbe(ABC):
    """Measures on steps ``every``, 2 ``every``, ...; ``measure`` runs the step's backward in its mode."""

    mode: str

    def __init__(self, b_small: int, b_big: int, every: int, params: Sequence[nn.Parameter], dist: Dist):
        self.b_small, self.b_big, self.every = b_small, b_big, every
        self.params, self.dist = params, dist

    def due(self, step: int) -> bool:
        """Whether the step numbered ``step`` (1-based, as logged) is measured."""
        return step % self.every == 0

    def describe(self) -> str:
        return f"every {self.every} steps, b={self.b_small} vs B={self.b_big} ({self.mode})"

    @abstractmethod
    def measure(self, backward: Backward, x: Tensor, y: Tensor) -> tuple[Tensor, NoiseSample]:
        """The step's backward on this rank's share (x, y), leaving the step's gradient in ``.grad``."""

    def _sample(self, g_small_sq: Tensor) -> NoiseSample:
        return NoiseSample(self.b_small, self.b_big, g_small_sq, gradient_sq_norm(self.params))


class MicroBatches(NoiseProbe):
    mode = "micro"

    def __init__(self, b_small: int, b_big: int, every: int, params: Sequence[nn.Parameter], dist: Dist,
                 parts: int):
        super().__init__(b_small, b_big, every, params, dist)
        self.parts = parts

    def measure(self, backward: Backward, x: Tensor, y: Tensor) -> tuple[Tensor, NoiseSample]:
        first: list[Tensor] = []

        def read_first() -> None:
            # .grad holds g_1 / parts after the first micro-batch: |G_b|^2 = parts^2 |grad|^2.
            first.append(gradient_sq_norm(self.params) * self.parts**2)

        loss = backward(x, y, self.parts, after_first=read_first)
        return loss, self._sample(first[0])


class Halves(MicroBatches):
    mode = "split"

    def __init__(self, b_small: int, b_big: int, every: int, params: Sequence[nn.Parameter], dist: Dist):
        super().__init__(b_small, b_big, every, params, dist, parts=2)


class Ranks(NoiseProbe):
    mode = "rank"

    def measure(self, backward: Backward, x: Tensor, y: Tensor) -> tuple[Tensor, NoiseSample]:
        loss = backward(x, y, 1, reduce=False)
        local = gradient_sq_norm(self.params)  # this rank's gradient, before the all-reduce
        average_gradients_(self.params, self.dist)
        return loss, self._sample(local)


class ExtraPass(NoiseProbe):
    mode = "extra"

    def __init__(self, b_small: int, b_big: int, every: int, params: Sequence[nn.Parameter], dist: Dist, *,
                 model: nn.Module, loss_of: Callable[[Tensor, Tensor], Tensor], device: torch.device):
        super().__init__(b_small, b_big, every, params, dist)
        self.model, self.loss_of, self.device = model, loss_of, device

    def measure(self, backward: Backward, x: Tensor, y: Tensor) -> tuple[Tensor, NoiseSample]:
        loss = backward(x, y, 1)
        return loss, self._sample(_sq_norm(self._grads(x[:self.b_small], y[:self.b_small])))

    def _grads(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """The gradient of the mean loss on (x, y) at the step's weights, leaving ``.grad``, the RNGs and the
        buffers (BatchNorm's running statistics) as they were."""
        buffers = [b.detach().clone() for b in self.model.buffers()]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            grads = torch.autograd.grad(self.loss_of(x, y), self.params, allow_unused=True)
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]


class QuarterPair(ExtraPass):
    mode = "pair"

    def measure(self, backward: Backward, x: Tensor, y: Tensor) -> tuple[Tensor, NoiseSample]:
        loss = backward(x, y, 1)
        b = self.b_small
        g1, g2 = self._grads(x[:b], y[:b]), self._grads(x[b:2 * b], y[b:2 * b])
        small = (_sq_norm(g1) + _sq_norm(g2)) / 2
        big = _sq_norm([(a + c) / 2 for a, c in zip(g1, g2)])
        return loss, NoiseSample(b, 2 * b, small, big)


def _sq_norm(grads: Sequence[Tensor]) -> Tensor:
    """|g|^2 summed in fp32 at least (gradients of bf16 parameters would overflow or round in their own type)."""
    return torch.nn.utils.get_total_norm([g.float() for g in grads]).double().pow(2)


def noise_probe(every: int, *, m: int, accumulation: int, dist: Dist, model: nn.Module,
                params: Sequence[nn.Parameter], task: str, loss_of: Callable[[Tensor, Tensor], Tensor],
                device: torch.device) -> NoiseProbe | None:
    """The probe for this batch layout (None: ``every`` <= 0, or a batch of one, which has no smaller batch).

    ``loss_of(x, y)`` is the mean loss of ``model`` (not a DDP wrapper) on (x, y), for the extra pass.
    """
    if every <= 0:
        return None
    per_rank = m // dist.world
    if accumulation >= 2:
        return MicroBatches(per_rank // accumulation, m, every, params, dist, parts=accumulation)
    if dist.active:
        return Ranks(per_rank, m, every, params, dist)
    if m < 2:
        return None
    batch_norm = any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules())
    if m % 2 == 0 and not batch_norm and task != "segmentation":
        return Halves(m // 2, m, every, params, dist)
    if batch_norm:
        b = m // 4 if m >= 8 else m // 2
        return QuarterPair(b, 2 * b, every, params, dist, model=model, loss_of=loss_of, device=device)
    return ExtraPass(max(1, m // 4), m, every, params, dist, model=model, loss_of=loss_of, device=device)
