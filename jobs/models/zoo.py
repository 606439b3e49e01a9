"""The models of the paper's grid, sized for the data they train on, and how any model is built.

CIFAR-sized (32x32) ResNet-34, VGG-16, AlexNet and MobileNetV2 built from
torchvision's models and blocks; word_language_model's 2-layer LSTM; DRN-D-22
for Cityscapes (:mod:`critbatch.jobs.models.drn`); a small CNN for ``digits``; a
linear model for ``linreg``; MNIST-1D's three (:mod:`critbatch.jobs.models.mnist1d`).
Each is a factory ``(shape, options) -> nn.Module`` declared in
:mod:`critbatch.jobs.models.catalog`, as a plug-in's model is:
``build_model(cell, data)`` finds the cell's model through the registry and
calls its factory with the data's shape facts (input shape, classes,
vocabulary) and the cell's ``model_options`` checked by the declared options
model. Outputs: classification (N, classes); language_model (N, T, vocab);
segmentation (N, 19, H, W) at the input's size; regression (N,).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..cell.errors import ConfigError
from ..cell.logschema import TASK_METRIC
from ..cell.options import model_options
from ..cell.plugins import DataShape, PluginError
from ..cell.registry import resolve
from ..cell.spec import Cell

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


def resnet34(shape: DataShape, options: Any) -> nn.Module:  # noqa: ARG001 - no options
    """torchvision's ResNet-34 (BasicBlock x [3, 4, 6, 3]) with a CIFAR stem: one 3x3 conv, no max-pool.

    At 32x32 the four stages then run at 32, 16, 8 and 4 pixels (the ImageNet
    stem would shrink the input to 8x8 before the first stage).
    """
    from torchvision.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [3, 4, 6, 3], num_classes=shape.num_classes)
    model.conv1 = nn.Conv2d(shape.input_shape[0], 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def vgg16(shape: DataShape, options: Any) -> nn.Module:
    """torchvision's VGG-16 feature stack (configuration D) and one linear classifier.

    Five max-pools take 32x32 to 1x1x512, so the 4096-wide ImageNet head
    (and its 7x7 average pool) gives way to Linear(512, classes).
    """
    from torchvision.models.vgg import VGG, cfgs, make_layers

    in_channels, num_classes = shape.input_shape[0], shape.num_classes
    model = VGG(make_layers(cfgs["D"], batch_norm=options.batch_norm), num_classes=num_classes, init_weights=True)
    if in_channels != 3:
        first = model.features[0]
        model.features[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
    model.avgpool = nn.Identity()
    model.classifier = nn.Linear(512, num_classes)
    return model


def alexnet(shape: DataShape, options: Any) -> nn.Module:
    """AlexNet's five convolutions and three fully connected layers, sized for 32x32.

    torchvision's ImageNet stem (11x11, stride 4) would leave a 32x32 image
    nothing to convolve; here the first two convolutions are 5x5 at stride 1,
    each followed by AlexNet's overlapping 3x3 max-pool at stride 2
    (32 -> 15 -> 7 -> 3), and the head is 2304 -> 1024 -> 1024 -> classes.
    """
    from torchvision.models.alexnet import AlexNet

    in_channels, num_classes, dropout = shape.input_shape[0], shape.num_classes, options.dropout
    model = AlexNet(num_classes=num_classes, dropout=dropout)
    model.features = nn.Sequential(
        nn.Conv2d(in_channels, 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
    )
    model.avgpool = nn.AdaptiveAvgPool2d(3)
    model.classifier = nn.Sequential(
        nn.Dropout(dropout), nn.Linear(256 * 9, 1024), nn.ReLU(inplace=True),
        nn.Dropout(dropout), nn.Linear(1024, 1024), nn.ReLU(inplace=True),
        nn.Linear(1024, num_classes),
    )
    return model


#: MobileNetV2's inverted-residual stages (expansion t, channels c, repeats n, stride s) with the
#: stem's and the second stage's stride set to 1 for 32x32 inputs (32 -> 32 -> 16 -> 8 -> 4 pixels).
MOBILENETV2_CIFAR = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                     [6, 160, 3, 2], [6, 320, 1, 1]]


def mobilenetv2(shape: DataShape, options: Any) -> nn.Module:
    """torchvision's MobileNetV2 with the CIFAR strides of :data:`MOBILENETV2_CIFAR` and a stride-1 stem."""
    from torchvision.models.mobilenetv2 import MobileNetV2
    from torchvision.ops.misc import Conv2dNormActivation

    model = MobileNetV2(num_classes=shape.num_classes, width_mult=options.width_mult,
                        inverted_residual_setting=MOBILENETV2_CIFAR, dropout=options.dropout)
    stem = model.features[0][0]
    model.features[0] = Conv2dNormActivation(shape.input_shape[0], stem.out_channels, stride=1,
                                             norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6)
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model


class LSTMLanguageModel(nn.Module):
    """word_language_model's RNN model: embedding, dropout, multi-layer LSTM, dropout, decoder.

    Input (N, T) token ids, output (N, T, vocab) logits. Every sample starts
    from a zero hidden state (the samples of a batch are independent bptt windows).
    With ``tied`` the decoder shares the embedding's weight (Press & Wolf 2017;
    Inan et al. 2017), which needs emsize == nhid.
    """

    def __init__(self, vocab: int, emsize: int = 200, nhid: int = 200, nlayers: int = 2, dropout: float = 0.2,
                 tied: bool = False):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, emsize)
        self.rnn = nn.LSTM(emsize, nhid, nlayers, dropout=dropout if nlayers > 1 else 0.0, batch_first=True)
        self.decoder = nn.Linear(nhid, vocab)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tied:
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(self.drop(self.encoder(x)))
        return self.decoder(self.drop(out))


def lstm(shape: DataShape, options: Any) -> nn.Module:
    return LSTMLanguageModel(shape.vocab_size, **options.model_dump())


def drn_d_22(shape: DataShape, options: Any) -> nn.Module:  # noqa: ARG001 - no options
    from .drn import DRND22

    return DRND22(shape.num_classes, shape.input_shape[0])


def digits_cnn(shape: DataShape, options: Any) -> nn.Module:
    return DigitsCNN(shape.input_shape[0], shape.num_classes, options.width)


def linear(shape: DataShape, options: Any) -> nn.Module:  # noqa: ARG001 - no options
    return Linear(shape.input_shape[0])


def build_model(cell: Cell, data: Any) -> nn.Module:
    """The cell's model, on the CPU, initialised from torch's current RNG state.

    ``data`` (a TaskData or StreamData) gives the shape facts. The CNNs accept
    channels-last inputs and weights (``model.to(memory_format=torch.channels_last)``).
    """
    try:
        factory = resolve("model", cell.model).factory()
    except PluginError as err:
        raise ConfigError(f"cell.model: {err}") from None
    model = factory(data.shape, model_options(cell.model, cell.model_options))
    if not isinstance(model, nn.Module):
        raise ConfigError(f"cell.model: the factory of {cell.model!r} returned {type(model).__name__}; "
                          f"expected a torch.nn.Module")
    return model


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


def loss_fn(task: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The mean loss of a batch for ``task``."""
    try:
        return _LOSSES[task]
    except KeyError:
        raise ValueError(f"task {task!r}; allowed: {', '.join(_LOSSES)}") from None


def metric_name(task: str) -> str:
    """The task's metric name, from the log contract (what the analysis reads back)."""
    try:
        return TASK_METRIC[task]
    except KeyError:
        raise ValueError(f"task {task!r}; allowed: {', '.join(TASK_METRIC)}") from None
