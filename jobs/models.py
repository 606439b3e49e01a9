"""The models of the paper's grid, sized for the data they train on.

``build_model(cell, data)`` takes input channels, classes and vocabulary from
the data, and extra knobs from ``cell.model_options``. Outputs:
classification (N, classes); language_model (N, T, vocab); segmentation
(N, 19, H, W) at the input's size; regression (N,).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from critbatch.jobs.config import Cell
from critbatch.jobs.data import TaskData
from critbatch.jobs.errors import ConfigError

IGNORE_INDEX = 255  # segmentation pixels outside the 19 train ids


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and two linear layers for 8x8 inputs (about 0.14 M parameters)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class Linear(nn.Module):
    """f(x) = x . w, no bias, w = 0 at the start (the setting of Ma et al.'s analysis)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight


def _options(cell: Cell, defaults: dict) -> dict:
    unknown = set(cell.model_options) - set(defaults)
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise ConfigError(f"cell.model_options: unknown {sorted(unknown)} for model {cell.model!r}; allowed: {allowed}")
    return {**defaults, **cell.model_options}


def build_model(cell: Cell, data: TaskData) -> nn.Module:
    """The cell's model, on the CPU, initialised from torch's current RNG state."""
    name = cell.model
    if name == "digits_cnn":
        opts = _options(cell, {"width": 32})
        return DigitsCNN(data.in_channels, data.num_classes, int(opts["width"]))
    if name == "linear":
        _options(cell, {})
        return Linear(int(data.train_x.shape[1]))
    raise ConfigError(f"cell.model: {name!r} is not built yet")


def _lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _seg_loss(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)


def _half_mse(pred: Tensor, y: Tensor) -> Tensor:
    """0.5 * mean((f(x) - y)^2): the loss of Ma et al.'s oracle step eta*(m) = m / (beta + (m - 1) lambda_1)."""
    return 0.5 * (pred - y).pow(2).mean()


_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "classification": nn.functional.cross_entropy,
    "language_model": _lm_loss,
    "segmentation": _seg_loss,
    "regression": _half_mse,
}
_METRICS = {"classification": "accuracy", "language_model": "perplexity", "segmentation": "miou", "regression": "none"}


def loss_fn(task: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The mean loss of a batch for ``task``."""
    try:
        return _LOSSES[task]
    except KeyError:
        raise ValueError(f"task {task!r}; allowed: {', '.join(_LOSSES)}") from None


def metric_name(task: str) -> str:
    try:
        return _METRICS[task]
    except KeyError:
        raise ValueError(f"task {task!r}; allowed: {', '.join(_METRICS)}") from None
