"""A plug-in for the tests, named by import path: a dataset of the iterable kind, read from shard files, and a
tiny model for it.

``plugin_shards:shards`` writes its examples once as .npz shards under the request's folder and streams them:
each epoch visits the shards in a seeded order and each shard's rows in a seeded order; global batch j is
positions [j*m, (j+1)*m) of that sequence, of which rank r takes its rows. The position is (epoch, batch),
the same on every rank, and a resumed stream jumps there without reading what came before.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from critbatch.jobs.cell.plugins import DataRequest, DataShape, dataset_plugin, model_plugin
from critbatch.jobs.data.plugin import Streamed

FEATURES, CLASSES, N_TEST = 16, 4, 256


class ShardOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    n_train: int = Field(1024, ge=1)
    shard_rows: int = Field(128, ge=1)


def write_shards(folder, n_train: int, shard_rows: int) -> list:
    """The training shards (and test.npz) under ``folder``, written once: a linear teacher's classes of
    Gaussian inputs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    teacher = rng.standard_normal((FEATURES, CLASSES))
    x = rng.standard_normal((n_train + N_TEST, 1, FEATURES)).astype(np.float32)
    y = (x[:, 0] @ teacher).argmax(1)
    files = []
    for i, start in enumerate(range(0, n_train, shard_rows)):
        path = folder / f"train-{i:04d}.npz"
        if not path.exists():
            np.savez(path, x=x[start:start + shard_rows], y=y[start:start + shard_rows])
        files.append(path)
    if not (folder / "test.npz").exists():
        np.savez(folder / "test.npz", x=x[n_train:], y=y[n_train:])
    return files


class ShardStream:
    """Endless global batches over the shards; this rank's rows of each."""

    def __init__(self, files: list, sizes: list[int], request: DataRequest):
        self.files, self.sizes = files, sizes
        self.batch_size, self.seed = request.batch_size, request.seed
        self.rows = request.batch_size // request.world
        self.lo = request.rank * self.rows
        self.epoch, self.batch = 0, 0  # the position: the next global batch
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of every position of ``epoch``'s sequence."""
        rng = np.random.default_rng([self.seed, epoch])
        shards, rows = [], []
        for s in rng.permutation(len(self.files)):
            shards.append(np.full(self.sizes[s], s))
            rows.append(rng.permutation(self.sizes[s]))
        return np.concatenate(shards), np.concatenate(rows)

    def _shard(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        if s not in self._cache:
            with np.load(self.files[s]) as npz:
                self._cache = {s: (npz["x"], npz["y"])}  # one shard in memory at a time
        return self._cache[s]

    def __iter__(self):
        while True:
            shard_of, row_of = self._order(self.epoch)
            per_epoch = len(shard_of) // self.batch_size
            while self.batch < per_epoch:
                at = slice(self.batch * self.batch_size + self.lo, self.batch * self.batch_size + self.lo + self.rows)
                self.batch += 1
                parts = [(self._shard(s), row_of[at][shard_of[at] == s]) for s in dict.fromkeys(shard_of[at])]
                x = np.concatenate([data[0][rows] for data, rows in parts])
                y = np.concatenate([data[1][rows] for data, rows in parts])
                yield torch.from_numpy(x), torch.from_numpy(y)
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]


@dataset_plugin(task="classification", options=ShardOptions, train_size=lambda o: o.n_train, classes=CLASSES)
def shards(request: DataRequest, options: ShardOptions) -> Streamed:
    """Shards of a linear teacher's classes, streamed."""
    files = write_shards(request.root, options.n_train, options.shard_rows)
    sizes = [min(options.shard_rows, options.n_train - i * options.shard_rows) for i in range(len(files))]

    def eval_batches(split: str, batch_size: int):
        with np.load(files[0] if split == "train" else request.root / "test.npz") as npz:
            x, y = npz["x"], npz["y"]
        for i in range(0, len(x), batch_size):
            yield torch.from_numpy(x[i:i + batch_size]), torch.from_numpy(y[i:i + batch_size])

    return Streamed(ShardStream(files, sizes, request), options.n_train, (1, FEATURES), eval_batches,
                    num_classes=CLASSES, info={"shards": len(files)})


@model_plugin(tasks=["classification"])
def tiny(shape: DataShape, options) -> nn.Module:
    """One hidden layer of 32 units."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape.input_shape)), 32), nn.ReLU(),
                         nn.Linear(32, shape.num_classes))
