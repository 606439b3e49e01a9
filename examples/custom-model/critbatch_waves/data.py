"""``waves``: noisy 1-D waveforms to classify, generated offline from a fixed seed.

Four classes (sine, square, triangle, sawtooth), each example a random number of
cycles (1 to 4 over the window), phase and amplitude, plus Gaussian noise: hard
enough that batch size matters, small enough to train in seconds on a CPU.
The whole set follows from ``options.seed``, never from the cell's seed, so
every cell of a sweep sees the same examples (the cell's seed orders them).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from critbatch.jobs.cell.plugins import DataRequest, dataset_plugin
from critbatch.jobs.data.plugin import InMemory

CLASSES = ("sine", "square", "triangle", "sawtooth")


class WavesOptions(BaseModel):
    """What a grid may set under ``dataset.options``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    n_train: int = Field(4096, ge=64, description="training examples")
    n_test: int = Field(1024, ge=64, description="test examples")
    length: int = Field(64, ge=16, description="samples per signal")
    noise: float = Field(0.5, ge=0.0, description="standard deviation of the added Gaussian noise")
    seed: int = Field(0, description="the seed the whole set is drawn from")


def make_waves(n: int, length: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` signals (n, length) and their classes, all drawn at once."""
    y = rng.integers(0, len(CLASSES), n)
    cycles = rng.uniform(1.0, 4.0, (n, 1))
    phase = rng.uniform(0.0, 1.0, (n, 1))
    amplitude = rng.uniform(0.5, 1.5, (n, 1))
    t = (np.arange(length) / length * cycles + phase) % 1.0  # position within the cycle, in [0, 1)
    shapes = np.stack([
        np.sin(2 * np.pi * t),  # sine
        np.where(t < 0.5, 1.0, -1.0),  # square
        4 * np.abs(t - 0.5) - 1,  # triangle
        2 * t - 1,  # sawtooth
    ])
    x = amplitude * shapes[y, np.arange(n)] + noise * rng.standard_normal((n, length))
    return x.astype(np.float32), y


@dataset_plugin(task="classification", options=WavesOptions, train_size=lambda o: o.n_train,
                classes=len(CLASSES))
def waves(request: DataRequest, options: WavesOptions) -> InMemory:
    """Noisy sine, square, triangle and sawtooth waves, generated offline."""
    rng = np.random.default_rng(options.seed)
    x, y = make_waves(options.n_train + options.n_test, options.length, options.noise, rng)
    x = torch.from_numpy(x).unsqueeze(1)  # (N, 1, length): one channel
    y = torch.from_numpy(y).long()
    n = options.n_train
    return InMemory(x[:n], y[:n], x[n:], y[n:], num_classes=len(CLASSES),
                    info={"classes": list(CLASSES), "length": options.length, "noise": options.noise})
