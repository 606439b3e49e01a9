"""Datasets of a cell: loaded once into tensors, batched without per-sample Python.

    data = load_task_data(cell, "~/.cache/critbatch/data").to("cuda")
    for x, y in data.train_batches(epoch, cell.batch_size, seed=cell.seed, rank=r, world=w):
        ...

Every set lives in memory as one tensor (images as uint8, normalised per
batch). One epoch is one ``randperm`` seeded by (seed, epoch), identical on
every rank; global batch j is ``perm[j*B:(j+1)*B]`` and rank r takes rows
``[r*B/w, (r+1)*B/w)`` of it. Augmentation draws its random numbers for the
whole global batch from a generator seeded by (seed, epoch, j), so a resumed
run and a run on a different number of ranks see the same pixels.

Every dataset, critbatch's own and a plug-in's, is found through the
registry (critbatch.jobs.cell.registry) and loaded by its factory
``(request, options)``, which returns the splits in memory (:class:`InMemory`;
this module then takes the fixed subset and builds the :class:`TaskData`) or a
resumable stream (:class:`Streamed`, behind :class:`StreamData`).

The paper's sets are read in their standard on-disk formats through
torchvision's readers (MNIST idx files, CIFAR python pickles, SVHN .mat,
Cityscapes leftImg8bit/ + gtFine/) or, for WikiText-2, from its
``wiki.{train,valid,test}.tokens``. The data root is a directory
(``<root>/<name>/...``) or a store the set was staged to with
``critbatch data stage NAME --from DIR`` (``<store>/datasets/<name>/...``,
copied once to a local cache). Nothing is downloaded unless asked for.
Built in and offline: ``digits`` (scikit-learn's 8x8 handwritten digits),
``linreg`` (the known-answer least-squares problem of design section 7) and
``mnist1d`` (critbatch.jobs.data.mnist1d).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from ..cell.errors import ConfigError
from ..cell.options import dataset_options
from ..cell.plugins import DataRequest, DataShape, PluginError
from ..cell.registry import resolve
from ..cell.spec import DATASETS, Cell, DatasetSpec
from .plugin import BatchStream, InMemory, Streamed

#: Seed of the fixed subsets (fraction, max_train, the train-eval subset, the
#: digits split): the same examples for every cell, whatever its seed, so cells
#: of one grid differ only in what the grid varies.
SUBSET_SEED = 20180101


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


@dataclass
class TaskData:
    """A dataset resident on one device, with the batching rules of the cell.

    ``train_x``/``train_y`` hold the training examples after ``fraction`` and
    ``max_train`` (images as uint8 (N,C,H,W), normalised per batch with
    ``mean``/``std``); ``test_x``/``test_y`` the test split.
    """

    name: str
    task: str  # classification | language_model | segmentation | regression
    n_train: int
    num_classes: int | None
    vocab_size: int | None
    info: dict
    train_x: Tensor = field(repr=False, default=None)
    train_y: Tensor = field(repr=False, default=None)
    test_x: Tensor = field(repr=False, default=None)
    test_y: Tensor = field(repr=False, default=None)
    eval_train_subset: int | None = None
    augment: str = "none"  # none | crop_flip | crop | flip (flip also flips segmentation labels)
    mean: Tensor | None = field(repr=False, default=None)  # per channel, in uint8 units
    std: Tensor | None = field(repr=False, default=None)

    # ---- shapes ------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def shape(self) -> DataShape:
        """What a model factory is told about this data."""
        return DataShape(self.task, self.input_shape, self.num_classes, self.vocab_size)

    @property
    def in_channels(self) -> int | None:
        return int(self.train_x.shape[1]) if self.train_x.dim() == 4 else None

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches per epoch (the last partial batch is dropped), at least 1."""
        return max(1, self.n_train // batch_size)

    # ---- batches -------------------------------------------------------------
    def train_batches(self, epoch: int, batch_size: int, *, seed: int, rank: int = 0, world: int = 1,
                      start: int = 0, skip: int = 0, reshuffle: int | None = None
                      ) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of this rank's share of each global batch, from batch index ``start``.

        A branch (docs/branches.md) enters its base's epoch part-way: ``skip`` drops the permutation's first
        examples (those its base has seen), and ``reshuffle`` (a seed) reorders the rest; batch j is then
        ``rest[j*B:(j+1)*B]`` (:meth:`epoch_batches` of them), augmented as batch j + skip // B.
        """
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by world size {world}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, {world})")
        per = batch_size // world
        lo, hi = rank * per, (rank + 1) * per
        # The permutation is drawn on the CPU so every device and rank gets the same one.
        perm = torch.randperm(self.n_train, generator=_generator("epoch", seed, epoch))
        if skip or reshuffle is not None:
            perm = perm[skip:]
            if reshuffle is not None:
                perm = perm[torch.randperm(len(perm), generator=_generator("branch", reshuffle, epoch))]
        perm = perm.to(self.device)
        for j in range(start, self.epoch_batches(batch_size, skip)):
            idx = perm[j * batch_size + lo: j * batch_size + hi]
            x, y = self.train_x.index_select(0, idx), self.train_y.index_select(0, idx)
            if self.augment != "none":
                x, y = self._augment(x, y, _generator("augment", seed, epoch, j + skip // batch_size), batch_size,
                                     lo, hi)
            yield self._finish_x(x), self._finish_y(y)

    def epoch_batches(self, batch_size: int, skip: int = 0) -> int:
        """Full batches of an epoch whose first ``skip`` examples are dropped (0: :meth:`steps_per_epoch`)."""
        return self.steps_per_epoch(batch_size) if skip == 0 else (self.n_train - skip) // batch_size

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of a fixed evaluation set, in order, without augmentation.

        ``train``: a fixed seeded subset of up to ``eval_train_subset`` training
        examples (all of them when None); ``test``: the test split.
        """
        if split == "train":
            x, y = self.train_x, self.train_y
            if self.eval_train_subset is not None and self.eval_train_subset < self.n_train:
                keep = torch.randperm(self.n_train, generator=_generator("eval-subset", SUBSET_SEED))
                keep = keep[: self.eval_train_subset].sort().values.to(self.device)
                x, y = x.index_select(0, keep), y.index_select(0, keep)
        elif split == "test":
            x, y = self.test_x, self.test_y
        else:
            raise ValueError(f"split {split!r}; allowed: train, test")
        for i in range(0, len(x), batch_size):
            yield self._finish_x(x[i: i + batch_size]), self._finish_y(y[i: i + batch_size])

    def state_dict(self) -> dict[str, Any]:
        """The data's own position: none (the epoch and batch index the trainer keeps place every batch)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (see :meth:`state_dict`)."""

    def to(self, device: str | torch.device) -> "TaskData":
        """A copy whose tensors live on ``device`` (the data stays there for the whole run)."""
        moved = {
            name: getattr(self, name).to(device)
            for name in ("train_x", "train_y", "test_x", "test_y", "mean", "std")
            if getattr(self, name) is not None
        }
        return replace(self, **moved)

    # ---- per-batch work (whole batches, no Python per sample) -----------------
    def _finish_x(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float()
            if self.mean is not None:
                x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return x

    def _finish_y(self, y: Tensor) -> Tensor:
        return labels(self.task, y)

    def _augment(self, x: Tensor, y: Tensor, gen: torch.Generator, batch: int, lo: int, hi: int
                 ) -> tuple[Tensor, Tensor]:
        """Random crop with padding 4 and/or horizontal flip of this rank's rows [lo, hi).

        The random numbers are drawn for the whole global batch and then sliced,
        so they do not depend on the number of ranks.
        """
        pad = 4
        offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=gen)[:, lo:hi].to(x.device)
        flips = (torch.rand(batch, generator=gen) < 0.5)[lo:hi].to(x.device)
        if "crop" in self.augment:
            x = random_crop(x, offsets[0], offsets[1], pad, flips if "flip" in self.augment else None)
        elif "flip" in self.augment:
            x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
        if "flip" in self.augment and self.task == "segmentation":
            y = torch.where(flips.view(-1, 1, 1), y.flip(-1), y)
        return x, y


def labels(task: str, y: Tensor) -> Tensor:
    """Class indices and token ids as int64 (the losses' index type); regression targets as they are."""
    if task in ("classification", "segmentation", "language_model") and y.dtype != torch.int64:
        return y.long()
    return y


class StreamData:
    """A :class:`Streamed` dataset behind :class:`TaskData`'s interface, so the trainer treats both alike.

    The trainer keeps the epoch and the batch index; the stream keeps its own position, which the
    trainer checkpoints through :meth:`state_dict`. Batches arrive on the CPU and move to the device
    one at a time.
    """

    def __init__(self, name: str, task: str, streamed: Streamed, rows: int, eval_train_subset: int | None,
                 info: dict[str, Any], device: torch.device | str = "cpu"):
        self.name, self.task, self.streamed, self.rows = name, task, streamed, rows
        self.n_train, self.num_classes, self.vocab_size = streamed.n_train, streamed.num_classes, streamed.vocab_size
        self.input_shape = tuple(streamed.input_shape)
        self.eval_train_subset, self.info = eval_train_subset, info
        self._device = torch.device(device)
        self._batches: Iterator | None = None  # one iterator over the whole run, from the stream's position

    @property
    def shape(self) -> DataShape:
        return DataShape(self.task, self.input_shape, self.num_classes, self.vocab_size)

    @property
    def in_channels(self) -> int | None:
        return self.input_shape[0] if len(self.input_shape) == 3 else None

    @property
    def device(self) -> torch.device:
        return self._device

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.n_train // batch_size)

    def epoch_batches(self, batch_size: int, skip: int = 0) -> int:  # noqa: ARG002 - a stream has no epoch position
        return self.steps_per_epoch(batch_size)

    def train_batches(self, epoch: int, batch_size: int, *, seed: int, rank: int = 0, world: int = 1,  # noqa: ARG002
                      start: int = 0, skip: int = 0, reshuffle: int | None = None
                      ) -> Iterator[tuple[Tensor, Tensor]]:
        """The rest of the epoch (batches ``start`` onwards), read on from the stream's position.

        The stream was opened for this cell's seed, rank and world size; ``seed`` and ``epoch``
        are its business (they only count batches here). A branch continues the stream's position (its
        state), so ``skip`` and ``reshuffle`` do not apply.
        """
        if skip or reshuffle is not None:
            raise ValueError(f"dataset {self.name!r} is a stream: a branch carries its position, not an epoch's")
        if batch_size // world != self.rows:
            raise ValueError(f"dataset {self.name!r} streams {self.rows} rows per rank, not {batch_size // world}")
        for _ in range(start, self.steps_per_epoch(batch_size)):
            if self._batches is None:
                self._batches = iter(self.streamed.train)
            try:
                x, y = next(self._batches)
            except StopIteration:
                raise ValueError(f"dataset {self.name!r}: its stream ended; a BatchStream is endless") from None
            if len(x) != self.rows or len(y) != self.rows:
                raise ValueError(f"dataset {self.name!r}: its stream gave a batch of {len(x)} rows, "
                                 f"expected {self.rows} (batch size / world size)")
            yield x.to(self._device), labels(self.task, y).to(self._device)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        if split not in ("train", "test"):
            raise ValueError(f"split {split!r}; allowed: train, test")
        for x, y in self.streamed.eval_batches(split, batch_size):
            yield x.to(self._device), labels(self.task, y).to(self._device)

    def state_dict(self) -> dict[str, Any]:
        """The stream's position after the batches handed out so far."""
        return self.streamed.train.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Move the stream to ``state``; the next batch is the one after it."""
        if state:
            self.streamed.train.load_state_dict(state)
            self._batches = None

    def to(self, device: str | torch.device) -> "StreamData":
        moved = StreamData(self.name, self.task, self.streamed, self.rows, self.eval_train_subset, self.info, device)
        moved._batches = self._batches
        return moved


def random_crop(x: Tensor, dy: Tensor, dx: Tensor, pad: int, flip: Tensor | None = None) -> Tensor:
    """Crop each image of (N,C,H,W) ``x``, zero-padded by ``pad``, at offsets (dy[n], dx[n]); mirror where ``flip``.

    One padded tensor and one gather along its flattened pixels: pixel (i, j)
    of image n comes from padded row dy[n] + i and column dx[n] + j, or
    dx[n] + W - 1 - j when the image is mirrored (so the flip costs nothing).
    """
    n, c, h, w = x.shape
    ph, pw = h + 2 * pad, w + 2 * pad
    padded = x.new_zeros(n, c, ph, pw)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    cols = torch.arange(w, device=x.device).expand(n, w)
    if flip is not None:
        cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    rows = dy.view(n, 1, 1) + torch.arange(h, device=x.device).view(1, h, 1)  # (N,H,1)
    pixel = rows * pw + (dx.view(n, 1) + cols).view(n, 1, w)  # (N,H,W) flat index into the padded image
    return padded.view(n, c, ph * pw).gather(2, pixel.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)


# ---- subsets ------------------------------------------------------------------

def subset_size(total: int, fraction: float, max_train: int | None) -> int:
    """Training examples kept: the cap first (the paper's 50k), then the fraction (as Cell.train_size)."""
    size = min(total, max_train) if max_train is not None else total
    return max(1, int(size * fraction))


def subset_indices(total: int, keep: int, tag: str) -> Tensor:
    """A fixed seeded choice of ``keep`` of ``total`` indices, in ascending order."""
    if keep >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=_generator("subset", tag, SUBSET_SEED))[:keep].sort().values


# ---- built-in sets -------------------------------------------------------------

def load_digits(request: DataRequest, options: Any) -> InMemory:  # noqa: ARG001 - no options
    """scikit-learn's 1,797 8x8 digits as (N,1,8,8) in [0, 1]; a fixed 80/20 split (1,437 / 360)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    n = len(x)
    n_test = math.ceil(0.2 * n)
    order = torch.randperm(n, generator=_generator("digits-split", SUBSET_SEED))
    test_idx, train_idx = order[:n_test].sort().values, order[n_test:].sort().values
    # Normalise with the training split's mean and standard deviation.
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return InMemory(x[train_idx], y[train_idx], x[test_idx], y[test_idx], num_classes=10)


def linreg_sample(n: int, d: int, spikes: int, spike_var: float, gen: torch.Generator) -> Tensor:
    """n rows of N(0, diag(spike_var x spikes, 1 x (d - spikes)))."""
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[:, :spikes] *= math.sqrt(spike_var)
    return x


def load_linreg(request: DataRequest, options: Any) -> InMemory:
    """Over-parameterised least squares with a hidden linear teacher (design section 7).

    Features: ``spikes`` directions of variance ``spike_var``, the rest variance 1.
    Labels y = X w_teacher without noise, so the loss 0.5 * mean((Xw - y)^2) can
    reach zero. Recorded in ``info``, of the examples actually trained on: beta =
    max_i |x_i|^2, lambda_1 = the largest eigenvalue of X^T X / n, and Ma et
    al.'s m* = beta / lambda_1 + 1. The whole problem follows from the cell's seed.
    """
    n, d, k, var = options.n, options.d, options.spikes, options.spike_var
    gen = _generator("linreg", request.seed)
    teacher = torch.randn(d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    x = linreg_sample(n, d, k, var, gen).float()
    x_test = linreg_sample(n, d, k, var, gen).float()

    def info(kept: Tensor, _y: Tensor) -> dict[str, Any]:
        # beta and lambda_1 of the data trained on (float32 values, computed in float64).
        x64 = kept.double()
        beta = float((x64 * x64).sum(1).max())
        gram = x64 @ x64.T if len(x64) <= d else x64.T @ x64  # same non-zero spectrum, the smaller matrix
        lambda_1 = float(torch.linalg.eigvalsh(gram / len(x64))[-1])
        return {"d": d, "spikes": k, "spike_var": var, "beta": beta, "lambda_1": lambda_1,
                "m_star": beta / lambda_1 + 1.0}

    return InMemory(x, (x.double() @ teacher).float(), x_test, (x_test.double() @ teacher).float(), info=info)


# ---- datasets on disk: where their files sit --------------------------------------

@dataclass(frozen=True)
class Layout:
    """A dataset's files under the root directory torchvision's class is given.

    ``inner``: the folder holding them ('' = the root itself); ``required``:
    paths relative to ``inner`` (a trailing '/' marks a non-empty folder);
    ``members``: what belongs to the dataset under the root (what staging uploads).
    """

    inner: str
    required: tuple[str, ...]
    members: tuple[str, ...]
    holds: str  # what a directory of this dataset holds, for messages
    downloadable: bool = True


LAYOUTS: dict[str, Layout] = {
    "mnist": Layout(
        "MNIST/raw",
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        ("MNIST/raw",), "MNIST/raw/ with the four uncompressed idx files"),
    "cifar10": Layout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
        ("cifar-10-batches-py",), "cifar-10-batches-py/ (CIFAR-10 python version)"),
    "cifar100": Layout(
        "cifar-100-python", ("train", "test", "meta"), ("cifar-100-python",),
        "cifar-100-python/ (CIFAR-100 python version)"),
    "svhn": Layout(
        "", ("train_32x32.mat", "test_32x32.mat"), ("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"),
        "train_32x32.mat and test_32x32.mat (and extra_32x32.mat for the extra split)"),
    "wikitext2": Layout(
        "wikitext-2", ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"), ("wikitext-2",),
        "wikitext-2/ with wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens", downloadable=False),
    "cityscapes": Layout(
        "", ("leftImg8bit/train/", "leftImg8bit/val/", "gtFine/train/", "gtFine/val/"), ("leftImg8bit", "gtFine"),
        "leftImg8bit/ and gtFine/ with their train and val folders", downloadable=False),
    # Token files (critbatch.jobs.data.tokens): read where they are, by format; staging uploads every .bin.
    "tokens": Layout(
        "", (), ("*.bin",), "train.bin and val.bin (nanoGPT) or *_train_*.bin and *_val_*.bin shards (FineWeb)",
        downloadable=False),
}


def required_paths(name: str, extra: bool = False) -> list[str]:
    """Paths relative to the torchvision root that must exist for ``name``."""
    layout = LAYOUTS[name]
    required = list(layout.required) + (["extra_32x32.mat"] if name == "svhn" and extra else [])
    return [f"{layout.inner}/{r}" if layout.inner else r for r in required]


def _present(path: Path, rel: str) -> bool:
    target = path / rel
    if rel.endswith("/"):
        return target.is_dir() and any(target.iterdir())
    return target.is_file()


def missing_paths(root: Path, name: str, extra: bool = False) -> list[str]:
    return [rel for rel in required_paths(name, extra) if not _present(root, rel)]


def cache_dir() -> Path:
    """Where datasets staged in an object store are copied before reading."""
    return Path(os.environ.get("CRITBATCH_CACHE") or "~/.cache/critbatch/staged").expanduser()


def _is_store_url(data_root: str) -> bool:
    return data_root.startswith("s3://")


def locate_dataset(name: str, data_root: str, *, extra: bool = False, download: bool = False) -> Path:
    """The torchvision root of dataset ``name``: a local folder holding its files.

    A local ``data_root`` is searched at ``<root>/<name>``, ``<root>`` itself (a
    shared torchvision root) and ``<root>/datasets/<name>`` (a directory used
    as a store); an ``s3://`` root is a store the dataset was staged to, copied
    once into :func:`cache_dir`. With ``download``, a missing downloadable set
    goes to ``<root>/<name>``.
    """
    layout = LAYOUTS[name]
    if _is_store_url(data_root):
        root = fetch_staged(name, data_root)
        gaps = missing_paths(root, name, extra)
        if gaps:
            raise ConfigError(
                f"--data-root: dataset {name!r} staged in {data_root} lacks {', '.join(gaps)}; stage it again with "
                f"`critbatch data stage {name} --from DIR --store {data_root}` (DIR holding {layout.holds})")
        return root
    base = Path(data_root.removeprefix("file://")).expanduser()
    candidates = [base / name, base, base / "datasets" / name]
    for candidate in candidates:
        if not missing_paths(candidate, name, extra):
            return candidate
    if download and layout.downloadable:
        (base / name).mkdir(parents=True, exist_ok=True)
        return base / name
    looked = ", ".join(str(c) for c in candidates)
    fetch = ", or pass --download" if layout.downloadable else f" ({name} cannot be downloaded automatically)"
    raise ConfigError(
        f"--data-root: dataset {name!r} not found: looked for {', '.join(required_paths(name, extra))} "
        f"under {looked}. Put a directory holding {layout.holds} at {base / name}, or stage it with "
        f"`critbatch data stage {name} --from DIR --store STORE` and pass --data-root STORE{fetch}")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_")


def fetch_staged(name: str, store_url: str) -> Path:
    """Copy ``<store>/datasets/<name>/`` into the local cache once; the local folder.

    A marker listing the staged keys records a finished copy; a different
    listing (the dataset was staged again) copies everything afresh. Files are
    written whole (temporary name, then rename), so concurrent ranks on one
    node may copy at the same time.
    """
    from ..store import open_store

    store = open_store(store_url)
    store.check()
    prefix = f"datasets/{name}/"
    keys = store.list(prefix)
    if not keys:
        raise ConfigError(
            f"--data-root: dataset {name!r} is not staged in {store.join(prefix)}; stage it with "
            f"`critbatch data stage {name} --from DIR --store {store_url}` (DIR holding {LAYOUTS[name].holds})")
    local = cache_dir() / _slug(store.url) / name
    marker = local / ".staged"
    listing = "\n".join(keys)
    if marker.is_file() and marker.read_text() == listing:
        return local
    for key in keys:
        dest = local / key[len(prefix):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.write_bytes(store.get_bytes(key))
        os.replace(tmp, dest)
    marker.write_text(listing)
    return local


# ---- staging: `critbatch data stage NAME --from DIR` ---------------------------------

def _stage_files(name: str, source: Path) -> dict[str, Path]:
    """Files of dataset ``name`` found in ``source``, keyed by their path under the torchvision root.

    ``source`` may be the root (holding ``cifar-10-batches-py/``) or the inner
    folder itself (``cifar-10-batches-py``; for MNIST also ``MNIST`` or ``MNIST/raw``).
    """
    layout = LAYOUTS[name]
    if name == "tokens":  # no fixed file names: every .bin file of the directory
        found = {p.name: p for p in sorted(source.glob("*.bin")) if p.is_file()}
        if not found:
            raise ConfigError(f"--from: {source} holds no .bin token files; a tokens directory holds {layout.holds}")
        return found
    parts = layout.inner.split("/") if layout.inner else []
    for depth in range(len(parts) + 1):
        rest = "/".join(parts[depth:])
        if all(_present(source, f"{rest}/{r}" if rest else r) for r in layout.required):
            break
    else:
        problems = [f"--from: {source} does not hold {name}: missing {rel}"
                    for rel in missing_paths(source, name)]
        problems.append(f"--from: a {name} directory holds {layout.holds}")
        raise ConfigError(problems)
    files: dict[str, Path] = {}
    if depth == 0:
        roots = [(source / m, m) for m in layout.members if (source / m).exists()]
    else:
        roots = [(source, "/".join(parts[:depth]))]
    for path, key in roots:
        if path.is_file():
            files[key] = path
            continue
        for dirpath, _dirs, names in os.walk(path):
            for fname in names:
                full = Path(dirpath, fname)
                files[f"{key}/{full.relative_to(path).as_posix()}"] = full
    return dict(sorted(files.items()))


def stage_dataset(name: str, source: str | Path, store_url: str) -> list[str]:
    """Upload dataset ``name`` from ``source`` to ``<store>/datasets/<name>/``; the keys written.

    Checks first that ``source`` holds the dataset's files (ConfigError listing
    what is missing, nothing uploaded). Keys staged before but absent now are removed.
    """
    from ..store import open_store

    if name not in LAYOUTS:
        built_in = f" ({name} needs no files: nothing to stage)" if name in DATASETS else ""
        raise ConfigError(f"name: {name!r} cannot be staged{built_in}; allowed: {', '.join(LAYOUTS)}")
    src = Path(source).expanduser()
    if not src.is_dir():
        raise ConfigError(f"--from: {src} is not a directory")
    files = _stage_files(name, src)
    store = open_store(store_url)
    store.check()
    prefix = f"datasets/{name}/"
    before = set(store.list(prefix))
    keys = []
    for rel, path in files.items():
        key = prefix + rel
        store.put_bytes(key, path.read_bytes())
        keys.append(key)
    for stale in sorted(before - set(keys)):
        store.delete(stale)
    return keys


def cli_main(args) -> int:
    """`critbatch data stage NAME --from DIR [--store URL]`."""
    if args.data_command != "stage":
        raise ConfigError(f"data: unknown action {args.data_command!r}; allowed: stage")
    keys = stage_dataset(args.name, args.source, args.store)
    from ..store import open_store

    store = open_store(args.store)
    size = sum(p.stat().st_size for p in _stage_files(args.name, Path(args.source).expanduser()).values())
    print(f"staged {len(keys)} files ({size / 1e6:.1f} MB) of {args.name} to {store.join(f'datasets/{args.name}/')}")
    print(f"train with: critbatch train --data-root {store.url} ...")
    return 0


# ---- readers --------------------------------------------------------------------

BPTT = 35  # tokens per language-model sample, as word_language_model's default


def _torchvision_datasets():
    """torchvision's readers, checking that files exist rather than their md5.

    torchvision compares each file's md5 with the official release; a staged
    copy is read as it is (a damaged file still fails to parse), and the tiny
    files the tests write in the same formats are accepted. Downloads keep
    torchvision's archive checksums.
    """
    from torchvision import datasets as tvd

    class CIFAR10(tvd.CIFAR10):
        train_list = [[f, None] for f, _ in tvd.CIFAR10.train_list]
        test_list = [[f, None] for f, _ in tvd.CIFAR10.test_list]
        meta = {**tvd.CIFAR10.meta, "md5": None}

    class CIFAR100(tvd.CIFAR100):
        train_list = [[f, None] for f, _ in tvd.CIFAR100.train_list]
        test_list = [[f, None] for f, _ in tvd.CIFAR100.test_list]
        meta = {**tvd.CIFAR100.meta, "md5": None}

    class SVHN(tvd.SVHN):
        def _check_integrity(self) -> bool:
            return os.path.isfile(os.path.join(self.root, self.filename))

    return {"mnist": tvd.MNIST, "cifar10": CIFAR10, "cifar100": CIFAR100, "svhn": SVHN,
            "cityscapes": tvd.Cityscapes}


def read_image_split(name: str, root: Path, split: str, download: bool = False) -> tuple[Tensor, Tensor]:
    """One split of an image set as uint8 (N,C,H,W) and int64 (N,). MNIST is zero-padded 28 -> 32."""
    cls = _torchvision_datasets()[name]
    if name == "mnist":
        ds = cls(str(root), train=split == "train", download=download)
        x = torch.nn.functional.pad(ds.data.unsqueeze(1), (2, 2, 2, 2))
        return x.contiguous(), ds.targets.long()
    if name in ("cifar10", "cifar100"):
        ds = cls(str(root), train=split == "train", download=download)
        # torchvision holds (N,H,W,C); the models want (N,C,H,W).
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.int64)
    if name == "svhn":
        ds = cls(str(root), split=split, download=download)
        return torch.from_numpy(np.ascontiguousarray(ds.data)), torch.from_numpy(ds.labels).long()
    raise ValueError(f"{name!r} is not an image classification set")


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of uint8 (N,C,H,W), in uint8 units.

    Exact and cheap: from each channel's 256-bin histogram, in float64.
    """
    levels = torch.arange(256, dtype=torch.float64)
    mean, std = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        p = counts / counts.sum()
        m = float((p * levels).sum())
        mean.append(m)
        std.append(max(float((p * (levels - m) ** 2).sum()), 1e-12) ** 0.5)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def _take(x: Tensor, y: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    return (x, y) if len(keep) == len(x) else (x[keep], y[keep])


def load_images(request: DataRequest, options: Any) -> InMemory:
    """MNIST, CIFAR-10/100 or SVHN (train, or train + extra) through torchvision's readers."""
    name = request.name
    root = locate_dataset(name, request.data_root, extra=request.extra, download=request.download)
    x, y = read_image_split(name, root, "train", request.download)
    if name == "svhn" and request.extra:
        x_extra, y_extra = read_image_split(name, root, "extra", request.download)
        x, y = torch.cat([x, x_extra]), torch.cat([y, y_extra])
        del x_extra, y_extra
    x_test, y_test = read_image_split(name, root, "test", request.download)
    # Normalisation statistics of the whole training split (before any subset), so
    # every fraction sees the same input scale.
    mean, std = channel_stats(x)
    info = {"augment": options.augment, "mean": [round(float(v) / 255, 6) for v in mean],
            "std": [round(float(v) / 255, 6) for v in std], "source": str(root)}
    return InMemory(x, y, x_test, y_test, num_classes=resolve("dataset", name).plugin.classes,
                    augment=options.augment, mean=mean, std=std, info=info)


def read_wikitext2(folder: Path) -> tuple[dict[str, int], dict[str, Tensor]]:
    """Token ids of each split, word-level, '<eos>' after every line (blank lines too).

    The vocabulary is built over train, valid and test in that order, as
    word_language_model's ``Corpus`` does (WikiText-2 already maps rare words to '<unk>').
    """
    vocab: dict[str, int] = {}
    ids: dict[str, Tensor] = {}
    for split in ("train", "valid", "test"):
        out: list[int] = []
        with open(folder / f"wiki.{split}.tokens", encoding="utf-8") as fh:
            for line in fh:
                for word in line.split() + ["<eos>"]:
                    out.append(vocab.setdefault(word, len(vocab)))
        ids[split] = torch.tensor(out, dtype=torch.int64)
    return vocab, ids


def bptt_sequences(ids: Tensor, bptt: int = BPTT) -> tuple[Tensor, Tensor]:
    """Consecutive, non-overlapping samples: x[i] = ids[i*T:(i+1)*T], y[i] = ids[i*T+1:(i+1)*T+1]."""
    n = (len(ids) - 1) // bptt
    return ids[: n * bptt].view(n, bptt), ids[1: n * bptt + 1].view(n, bptt)


def load_wikitext2(request: DataRequest, options: Any) -> InMemory:  # noqa: ARG001 - no options
    root = locate_dataset("wikitext2", request.data_root, download=request.download)
    vocab, ids = read_wikitext2(root / LAYOUTS["wikitext2"].inner)
    x, y = bptt_sequences(ids["train"])
    x_test, y_test = bptt_sequences(ids["test"])
    info = {"bptt": BPTT, "vocab_size": len(vocab), "tokens": {split: len(t) for split, t in ids.items()},
            "source": str(root)}
    return InMemory(x, y, x_test, y_test, vocab_size=len(vocab), info=info)


def cityscapes_train_ids() -> np.ndarray:
    """Lookup table label id (0..255) -> train id (0..18), 255 for every other id."""
    from torchvision.datasets import Cityscapes

    table = np.full(256, 255, dtype=np.uint8)
    for c in Cityscapes.classes:
        if 0 <= c.id < 256 and 0 <= c.train_id < 255:
            table[c.id] = c.train_id
    return table


def read_cityscapes(root: Path, split: str, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Fine annotations of one split: uint8 images (N,3,H,W) (bilinear) and train ids (N,H,W) (nearest).

    Files are decoded by a few threads (PIL releases the GIL while decoding and
    resizing) into one preallocated tensor, in sorted file order.
    """
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    ds = _torchvision_datasets()["cityscapes"](str(root), split=split, mode="fine", target_type="semantic")
    pairs = sorted(zip(ds.images, ds.targets))
    h, w = size
    table = cityscapes_train_ids()
    x = torch.empty(len(pairs), 3, h, w, dtype=torch.uint8)
    y = torch.empty(len(pairs), h, w, dtype=torch.uint8)

    def decode(i: int) -> None:
        image_path, (label_path,) = pairs[i]
        with Image.open(image_path) as img:
            x[i] = torch.from_numpy(np.array(img.convert("RGB").resize((w, h), Image.BILINEAR))).permute(2, 0, 1)
        with Image.open(label_path) as lab:
            y[i] = torch.from_numpy(table[np.array(lab.resize((w, h), Image.NEAREST))])

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(decode, range(len(pairs))))
    return x, y


def load_cityscapes(request: DataRequest, options: Any) -> InMemory:
    root = locate_dataset("cityscapes", request.data_root, download=request.download)
    size = options.size
    x, y = read_cityscapes(root, "train", tuple(size))
    x_test, y_test = read_cityscapes(root, "val", tuple(size))
    mean, std = channel_stats(x)
    info = {"augment": options.augment, "train_split": "train", "test_split": "val",
            "mean": [round(float(v) / 255, 6) for v in mean], "std": [round(float(v) / 255, 6) for v in std],
            "source": str(root)}
    return InMemory(x, y, x_test, y_test, num_classes=19, augment=options.augment, mean=mean, std=std, info=info)


# ---- any dataset, through the registry --------------------------------------------

AUGMENTS = ("none", "crop", "flip", "crop_flip")


def load_task_data(cell: Cell, data_root: str, *, download: bool = False, rank: int = 0, world: int = 1
                   ) -> TaskData | StreamData:
    """The cell's dataset for rank ``rank`` of ``world``, on the CPU: its factory's splits in memory
    (with the cell's subset taken) or its stream.

    Raises ConfigError when the set is missing (saying where it looked and how to
    stage it), when its options are wrong, or when its factory cannot be used.
    """
    ds = cell.dataset
    try:
        found = resolve("dataset", ds.name)
        factory = found.factory()
    except PluginError as err:
        raise ConfigError(f"cell.dataset.name: {err}") from None
    options = dataset_options(ds)  # options the set does not take fail before any data is read
    request = DataRequest(
        name=ds.name, root=local_root(ds.name, str(data_root)), data_root=str(data_root), seed=cell.seed,
        fraction=ds.fraction, max_train=ds.max_train, extra=ds.extra, eval_train_subset=cell.eval.train_subset,
        batch_size=cell.batch_size, rank=rank, world=world, download=download)
    out = factory(request, options)
    task = found.plugin.task
    if isinstance(out, InMemory):
        return _in_memory(ds, task, out, cell.eval.train_subset)
    if isinstance(out, Streamed):
        return _streamed(ds.name, task, out, cell.batch_size // world, cell.eval.train_subset)
    raise ConfigError(f"cell.dataset.name: the factory of {ds.name!r} returned {type(out).__name__}; expected "
                      f"InMemory or Streamed (critbatch.jobs.data.plugin)")


def local_root(name: str, data_root: str) -> Path:
    """A local folder for dataset ``name``'s files: ``<data_root>/<name>``, or under the local cache of a store."""
    if _is_store_url(data_root):
        return cache_dir() / _slug(data_root) / _slug(name)
    return Path(data_root.removeprefix("file://")).expanduser() / _slug(name)


def _returned(name: str, problem: str) -> ConfigError:
    return ConfigError(f"cell.dataset.name: the factory of {name!r} returned {problem}")


def _check_facts(name: str, task: str, num_classes: int | None, vocab_size: int | None) -> None:
    if task in ("classification", "segmentation") and not num_classes:
        raise _returned(name, f"no num_classes; a {task} set needs it")
    if task == "language_model" and not vocab_size:
        raise _returned(name, "no vocab_size; a language_model set needs it")


def _in_memory(ds: DatasetSpec, task: str, out: InMemory, eval_train_subset: int | None) -> TaskData:
    """The factory's splits as TaskData: the fixed seeded subset of ``fraction`` and ``max_train`` taken."""
    name = ds.name
    _check_facts(name, task, out.num_classes, out.vocab_size)
    for split, (x, y) in {"train": (out.train_x, out.train_y), "test": (out.test_x, out.test_y)}.items():
        if len(x) != len(y) or not len(x):
            raise _returned(name, f"{len(x)} {split} inputs and {len(y)} {split} targets; expected as many, "
                                  f"at least one")
    if out.augment not in AUGMENTS:
        raise _returned(name, f"augment {out.augment!r}; allowed: {', '.join(AUGMENTS)}")
    if out.augment != "none" and out.train_x.dim() != 4:
        raise _returned(name, f"augment {out.augment!r} for inputs of shape {tuple(out.train_x.shape[1:])}; "
                              f"crops and flips need (N, C, H, W) images")
    total = len(out.train_x)
    tag = f"{name}+extra" if ds.extra else name
    x, y = _take(out.train_x, out.train_y, subset_indices(total, subset_size(total, ds.fraction, ds.max_train), tag))
    extra = out.info(x, y) if callable(out.info) else dict(out.info)
    info = {"n_train": len(x), "n_train_full": total, "n_test": len(out.test_x), "input_shape": list(x.shape[1:]),
            **extra}
    return TaskData(
        name=name, task=task, n_train=len(x), num_classes=out.num_classes, vocab_size=out.vocab_size, info=info,
        train_x=x, train_y=y, test_x=out.test_x, test_y=out.test_y, eval_train_subset=eval_train_subset,
        augment=out.augment, mean=out.mean, std=out.std,
    )


def _streamed(name: str, task: str, out: Streamed, rows: int, eval_train_subset: int | None) -> StreamData:
    _check_facts(name, task, out.num_classes, out.vocab_size)
    if not isinstance(out.train, BatchStream):
        raise _returned(name, f"a Streamed whose train is a {type(out.train).__name__}; expected a BatchStream "
                              f"(__iter__, state_dict and load_state_dict)")
    if out.n_train < 1:
        raise _returned(name, f"a Streamed of n_train {out.n_train}; expected at least 1")
    info = {"n_train": out.n_train, "input_shape": list(out.input_shape), "streamed": True, **out.info}
    return StreamData(name, task, out, rows, eval_train_subset, info)
