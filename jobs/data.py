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

Built in and offline: ``digits`` (scikit-learn's 8x8 handwritten digits) and
``linreg`` (the known-answer least-squares problem of design section 7).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
from torch import Tensor

from critbatch.jobs.config import DATASETS, LINREG_DEFAULTS, Cell
from critbatch.jobs.errors import ConfigError

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
                      start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of this rank's share of each global batch, from batch index ``start``."""
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by world size {world}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, {world})")
        per = batch_size // world
        lo, hi = rank * per, (rank + 1) * per
        # The permutation is drawn on the CPU so every device and rank gets the same one.
        perm = torch.randperm(self.n_train, generator=_generator("epoch", seed, epoch)).to(self.device)
        for j in range(start, self.steps_per_epoch(batch_size)):
            idx = perm[j * batch_size + lo: j * batch_size + hi]
            x, y = self.train_x[idx], self.train_y[idx]
            if self.augment != "none":
                x, y = self._augment(x, y, _generator("augment", seed, epoch, j), batch_size, lo, hi)
            yield self._finish_x(x), self._finish_y(y)

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
                x, y = x[keep], y[keep]
        elif split == "test":
            x, y = self.test_x, self.test_y
        else:
            raise ValueError(f"split {split!r}; allowed: train, test")
        for i in range(0, len(x), batch_size):
            yield self._finish_x(x[i: i + batch_size]), self._finish_y(y[i: i + batch_size])

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
        if self.task in ("classification", "segmentation", "language_model") and y.dtype != torch.int64:
            return y.long()
        return y

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
            x = random_crop(x, offsets[0], offsets[1], pad)
        if "flip" in self.augment:
            x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
            if self.task == "segmentation":
                y = torch.where(flips.view(-1, 1, 1), y.flip(-1), y)
        return x, y


def random_crop(x: Tensor, dy: Tensor, dx: Tensor, pad: int) -> Tensor:
    """Crop each image of (N,C,H,W) ``x``, zero-padded by ``pad``, at offsets (dy[n], dx[n]).

    One padded tensor and one gather: rows (N,H) and columns (N,W) index it.
    """
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = dy.view(n, 1) + torch.arange(h, device=x.device)  # (N,H)
    cols = dx.view(n, 1) + torch.arange(w, device=x.device)  # (N,W)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, chan, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


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

def load_digits(cell: Cell) -> TaskData:
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
    ds = cell.dataset
    keep = subset_indices(len(train_idx), subset_size(len(train_idx), ds.fraction, ds.max_train), "digits")
    train_idx = train_idx[keep]
    return TaskData(
        name="digits", task="classification", n_train=len(train_idx), num_classes=10, vocab_size=None,
        info={"n_train": len(train_idx), "n_test": n_test, "input_shape": [1, 8, 8]},
        train_x=x[train_idx], train_y=y[train_idx], test_x=x[test_idx], test_y=y[test_idx],
        eval_train_subset=cell.eval.train_subset,
    )


def linreg_options(cell: Cell) -> dict[str, Any]:
    opts = {**LINREG_DEFAULTS, **cell.dataset.options}
    problems = []
    for key in ("n", "d", "spikes"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < (0 if key == "spikes" else 1):
            problems.append(f"cell.dataset.options.{key}: must be a {'non-negative' if key == 'spikes' else 'positive'}"
                            f" integer, got {opts[key]!r}")
    if not isinstance(opts["spike_var"], (int, float)) or not opts["spike_var"] > 0:
        problems.append(f"cell.dataset.options.spike_var: must be a positive number, got {opts['spike_var']!r}")
    if not problems and opts["spikes"] > opts["d"]:
        problems.append(f"cell.dataset.options.spikes: {opts['spikes']} exceeds d = {opts['d']}")
    if problems:
        raise ConfigError(problems)
    return opts


def linreg_sample(n: int, d: int, spikes: int, spike_var: float, gen: torch.Generator) -> Tensor:
    """n rows of N(0, diag(spike_var x spikes, 1 x (d - spikes)))."""
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[:, :spikes] *= math.sqrt(spike_var)
    return x


def load_linreg(cell: Cell) -> TaskData:
    """Over-parameterised least squares with a hidden linear teacher (design section 7).

    Features: ``spikes`` directions of variance ``spike_var``, the rest variance 1.
    Labels y = X w_teacher without noise, so the loss 0.5 * mean((Xw - y)^2) can
    reach zero. Recorded in ``info``: beta = max_i |x_i|^2, lambda_1 = the
    largest eigenvalue of X^T X / n, and Ma et al.'s m* = beta / lambda_1 + 1.
    The whole problem follows from the cell's seed.
    """
    opts = linreg_options(cell)
    n, d, k, var = int(opts["n"]), int(opts["d"]), int(opts["spikes"]), float(opts["spike_var"])
    gen = _generator("linreg", cell.seed)
    teacher = torch.randn(d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    x = linreg_sample(n, d, k, var, gen).float()
    x_test = linreg_sample(n, d, k, var, gen).float()
    ds = cell.dataset
    keep = subset_indices(n, subset_size(n, ds.fraction, ds.max_train), "linreg")
    x = x[keep]
    # beta and lambda_1 of the data actually trained on (float32 values, computed in float64).
    x64 = x.double()
    beta = float((x64 * x64).sum(1).max())
    gram = x64 @ x64.T if len(x64) <= d else x64.T @ x64  # same non-zero spectrum, the smaller matrix
    lambda_1 = float(torch.linalg.eigvalsh(gram / len(x64))[-1])
    info = {
        "n_train": len(x), "n_test": n, "d": d, "spikes": k, "spike_var": var,
        "beta": beta, "lambda_1": lambda_1, "m_star": beta / lambda_1 + 1.0,
    }
    return TaskData(
        name="linreg", task="regression", n_train=len(x), num_classes=None, vocab_size=None, info=info,
        train_x=x, train_y=(x64 @ teacher).float(), test_x=x_test, test_y=(x_test.double() @ teacher).float(),
        eval_train_subset=cell.eval.train_subset,
    )


_LOADERS = {"digits": load_digits, "linreg": load_linreg}


def load_task_data(cell: Cell, data_root: str, *, download: bool = False) -> TaskData:
    """The cell's dataset, on the CPU. Raises ConfigError when it is missing or misconfigured."""
    name = cell.dataset.name
    if name not in DATASETS:
        raise ConfigError(f"cell.dataset.name: unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if name in ("digits", "linreg"):
        return _LOADERS[name](cell)
    raise ConfigError(f"cell.dataset.name: {name!r} has no loader yet")
