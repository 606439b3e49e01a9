"""What a dataset factory returns (docs/plugins.md): tensors in memory, or a resumable stream of batches.

:class:`InMemory` is the fast path, for data that fits in memory: the whole
training and test splits as tensors. critbatch keeps them on the device,
takes the fixed seeded subset of ``fraction`` and ``max_train``, and draws each
epoch's batches with one ``randperm`` and batched augmentation, as for its own
sets (critbatch.jobs.data.datasets.TaskData).

:class:`Streamed` is for data that does not fit: an endless iterator of this
rank's share of each global batch that can say where it is
(``state_dict``) and go back there (``load_state_dict``), so a resumed run
continues exactly where the checkpoint was taken, plus fixed evaluation
batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

from torch import Tensor

Batch = tuple[Tensor, Tensor]


@dataclass
class InMemory:
    """Both splits of a dataset as tensors, examples along the first dimension (on the CPU).

    Images may be uint8 (N, C, H, W), normalised per batch by ``mean``/``std`` (per channel, in uint8
    units) on the device; labels are class indices (int64), token ids, or targets (regression).
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int | None = None
    vocab_size: int | None = None
    augment: str = "none"  # none | crop | flip | crop_flip: of whole (N, C, H, W) image batches, on the device
    mean: Tensor | None = None
    std: Tensor | None = None
    #: Figures recorded in cell.json (``derived``): a mapping, or a function of the training examples kept
    #: (train_x, train_y) after the subset, for figures of the data actually trained on.
    info: dict[str, Any] | Callable[[Tensor, Tensor], dict[str, Any]] = field(default_factory=dict)


@runtime_checkable
class BatchStream(Protocol):
    """An endless, resumable iterator of training batches.

    ``iter(stream)`` yields, from the current position, this rank's rows of each global batch in
    training order: ``request.batch_size // request.world`` rows, the global batch's rows
    ``[rank * rows, (rank + 1) * rows)``, so that the sequence of global batches does not depend on
    the number of ranks. ``state_dict()`` is the position after the batches yielded so far, the same
    on every rank (rank 0's is checkpointed and every rank loads it); ``load_state_dict(state)``
    moves there, and the next ``iter(stream)`` continues from it.
    """

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Streamed:
    """A dataset read as a stream: the training batches, the size of an epoch, fixed evaluation batches."""

    train: BatchStream
    n_train: int  # examples in one epoch (the unit of the step budget and of the learning-rate schedule)
    input_shape: tuple[int, ...]  # one example's input, without the batch dimension
    #: ``eval_batches(split, batch_size)``: batches of ``"train"`` (``request.eval_train_subset`` fixed
    #: training examples, all when None) or ``"test"``, the same every time, each split whole on every rank.
    eval_batches: Callable[[str, int], Iterable[Batch]]
    num_classes: int | None = None
    vocab_size: int | None = None
    info: dict[str, Any] = field(default_factory=dict)  # figures recorded in cell.json (``derived``)
