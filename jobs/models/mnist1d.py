"""The three model families of MNIST-1D (Greydanus 2020) at that scale, for (N, 1, 40) signals and 10 classes.

    mnist1d_mlp   40 -> 100 -> 100 -> 10, ReLU                                  (about 15 k parameters)
    mnist1d_cnn   three 1-D convolutions of 25 channels (kernel 5, 3, 3; stride 2; padding 1), ReLU,
                  the 25 x 5 features flattened into a linear classifier       (about 5 k parameters)
    mnist1d_gru   a bidirectional GRU of 6 units over the 40 steps, every step's output flattened
                  into a linear classifier                                     (about 5 k parameters)

Widths are options (critbatch.jobs.cell.options); the defaults are the sizes
the MNIST-1D paper reports its accuracies for (MLP 68 %, CNN 94 %, GRU 91 %).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..cell.plugins import DataShape


def mlp(shape: DataShape, options) -> nn.Module:
    """Flattens each signal; two hidden layers."""
    width = options.hidden
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(shape.input_shape), width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, shape.num_classes),
    )


def cnn(shape: DataShape, options) -> nn.Module:
    """Three strided convolutions (40 -> 19 -> 10 -> 5 steps) and a linear layer on the flattened features."""
    (in_channels, length), c = shape.input_shape, options.channels
    for kernel in (5, 3, 3):
        length = (length + 2 - kernel) // 2 + 1
    return nn.Sequential(
        nn.Conv1d(in_channels, c, 5, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(c * length, shape.num_classes),
    )


class GRUClassifier(nn.Module):
    """A bidirectional GRU over the signal's steps; the outputs of all steps, flattened, into a linear layer."""

    def __init__(self, channels: int, steps: int, hidden: int, num_classes: int):
        super().__init__()
        self.rnn = nn.GRU(channels, hidden, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(2 * hidden * steps, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.transpose(1, 2))  # (N, C, L) -> (N, L, C): one step per sample point
        return self.linear(out.flatten(1))


def gru(shape: DataShape, options) -> nn.Module:
    channels, steps = shape.input_shape
    return GRUClassifier(channels, steps, options.hidden, shape.num_classes)
