"""critbatch's own models, declared as any plug-in declares one; pyproject.toml registers each under its name.

Torch-free: a grid is validated from these declarations (which tasks and
datasets a model serves, its options), and a model's module is imported only
when a cell is built.
"""

from __future__ import annotations

from ..cell.options import (
    AlexNetOptions,
    DigitsCNNOptions,
    GPTOptions,
    LSTMOptions,
    MobileNetV2Options,
    Mnist1dCNNOptions,
    Mnist1dGRUOptions,
    Mnist1dMLPOptions,
    VGGOptions,
)
from ..cell.plugins import ModelPlugin

_ZOO = "critbatch.jobs.models.zoo"
_MNIST1D = "critbatch.jobs.models.mnist1d"
#: The 32x32 image sets the CIFAR-sized CNNs are built for.
IMAGE_SETS = ("mnist", "cifar10", "cifar100", "svhn")
_CLASSIFY = ("classification",)

RESNET34 = ModelPlugin(f"{_ZOO}:resnet34", _CLASSIFY, datasets=IMAGE_SETS,
                       description="ResNet-34 with a CIFAR stem")
VGG16 = ModelPlugin(f"{_ZOO}:vgg16", _CLASSIFY, VGGOptions, IMAGE_SETS, "VGG-16 (configuration D), one linear head")
ALEXNET = ModelPlugin(f"{_ZOO}:alexnet", _CLASSIFY, AlexNetOptions, IMAGE_SETS, "AlexNet sized for 32x32")
MOBILENETV2 = ModelPlugin(f"{_ZOO}:mobilenetv2", _CLASSIFY, MobileNetV2Options, IMAGE_SETS,
                          "MobileNetV2 with CIFAR strides")
LSTM = ModelPlugin(f"{_ZOO}:lstm", ("language_model",), LSTMOptions, ("wikitext2",),
                   "word_language_model's 2-layer LSTM")
DRN_D_22 = ModelPlugin(f"{_ZOO}:drn_d_22", ("segmentation",), datasets=("cityscapes",),
                       description="DRN-D-22, output stride 8")
DIGITS_CNN = ModelPlugin(f"{_ZOO}:digits_cnn", _CLASSIFY, DigitsCNNOptions, ("digits",),
                         "two convolutions and two linear layers for 8x8 digits")
LINEAR = ModelPlugin(f"{_ZOO}:linear", ("regression",), datasets=("linreg",),
                     description="f(x) = x . w from w = 0 (Ma et al.'s setting)")
MNIST1D_MLP = ModelPlugin(f"{_MNIST1D}:mlp", _CLASSIFY, Mnist1dMLPOptions, ("mnist1d",),
                          "MNIST-1D's MLP: 40 -> 100 -> 100 -> 10")
MNIST1D_CNN = ModelPlugin(f"{_MNIST1D}:cnn", _CLASSIFY, Mnist1dCNNOptions, ("mnist1d",),
                          "MNIST-1D's CNN: three strided 1-D convolutions of 25 channels")
MNIST1D_GRU = ModelPlugin(f"{_MNIST1D}:gru", _CLASSIFY, Mnist1dGRUOptions, ("mnist1d",),
                          "MNIST-1D's GRU: bidirectional, 6 units, read out at all 40 steps")
GPT = ModelPlugin("critbatch.jobs.models.gpt:gpt", ("language_model",), GPTOptions,
                  description="a decoder-only transformer (GPT-2 shape: pre-norm, GELU MLP, tied embeddings)")
