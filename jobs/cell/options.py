"""What each dataset takes in ``dataset.options`` and each model in ``model_options``: one model each.

A cell keeps its options as written (its id hashes exactly what the grid
said). These models check them when the cell is validated, before anything is
rendered or run, and give the data loaders and the model zoo the effective
values, defaults filled in::

    dataset_options(cell.dataset).augment      # "crop_flip" for CIFAR unless the grid said otherwise
    model_options("lstm", {"nhid": 100}).emsize

Torch-free, like the rest of the cell contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator

from .errors import ConfigError
from .validation import NonNegativeInt, PositiveFloat, PositiveInt, Range, Strict, error_lines, invalid

if TYPE_CHECKING:
    from .spec import DatasetSpec

Augment = Literal["none", "crop", "flip", "crop_flip"]
Dropout = Annotated[float, Range(0, 1, high_open=True)]


class NoOptions(Strict):
    """A dataset or model without options."""


# ---- datasets ----------------------------------------------------------------------------------------


class MnistOptions(Strict):
    """MNIST: no augmentation by default."""

    augment: Augment = Field("none", description="augmentation of each training batch")


class CifarOptions(Strict):
    """CIFAR-10/100: random 32x32 crops of the 4-pixel-padded image and horizontal flips."""

    augment: Augment = Field("crop_flip", description="augmentation of each training batch")


class SvhnOptions(Strict):
    """SVHN crops but does not flip: a mirrored digit is another glyph."""

    augment: Augment = Field("crop", description="augmentation of each training batch")


class CityscapesOptions(Strict):
    """Cityscapes, downscaled (the full 1024 x 2048 does not fit in memory as one tensor)."""

    size: Annotated[list[Annotated[int, Range(8)]], Field(min_length=2, max_length=2)] = Field(
        [256, 512], description="[height, width] the images and labels are resized to")
    augment: Literal["none", "flip"] = Field("flip", description="horizontal flips of image and labels")


class LinregOptions(Strict):
    """The known-answer problem (design section 7): 512 samples, 1024 features, four directions of variance 60."""

    n: PositiveInt = Field(512, description="training samples")
    d: PositiveInt = Field(1024, description="features")
    spikes: NonNegativeInt = Field(4, description="directions of variance spike_var (the rest have variance 1)")
    spike_var: PositiveFloat = Field(60.0, description="variance of the spiked directions")

    @field_validator("spikes")
    @classmethod
    def _at_most_d(cls, spikes: int, info: ValidationInfo) -> int:
        if "d" in info.data and spikes > info.data["d"]:
            raise invalid(f"{spikes} exceeds d = {info.data['d']}")
        return spikes


DATASET_OPTIONS: dict[str, type[Strict]] = {
    "mnist": MnistOptions, "cifar10": CifarOptions, "cifar100": CifarOptions, "svhn": SvhnOptions,
    "wikitext2": NoOptions, "cityscapes": CityscapesOptions, "digits": NoOptions, "linreg": LinregOptions,
}


# ---- models ------------------------------------------------------------------------------------------


class VGGOptions(Strict):
    batch_norm: bool = Field(True, description="VGG-16 with batch normalisation after each convolution")


class AlexNetOptions(Strict):
    dropout: Dropout = Field(0.5, description="dropout before the fully connected layers")


class MobileNetV2Options(Strict):
    width_mult: PositiveFloat = Field(1.0, description="channel multiplier")
    dropout: Dropout = Field(0.2, description="dropout before the classifier")


class LSTMOptions(Strict):
    """word_language_model's LSTM."""

    emsize: PositiveInt = Field(200, description="embedding size")
    nhid: PositiveInt = Field(200, description="hidden units per layer")
    nlayers: PositiveInt = Field(2, description="LSTM layers")
    dropout: Dropout = Field(0.2, description="dropout on the embedding and the LSTM output")
    tied: bool = Field(False, description="share the decoder's weights with the embedding (needs emsize == nhid)")

    @field_validator("tied")
    @classmethod
    def _sizes_match(cls, tied: bool, info: ValidationInfo) -> bool:
        if tied and {"emsize", "nhid"} <= set(info.data) and info.data["emsize"] != info.data["nhid"]:
            raise invalid(f"tied weights need emsize == nhid, got {info.data['emsize']} and {info.data['nhid']}")
        return tied


class DigitsCNNOptions(Strict):
    width: PositiveInt = Field(32, description="channels of the first convolution")


MODEL_OPTIONS: dict[str, type[Strict]] = {
    "resnet34": NoOptions, "vgg16": VGGOptions, "alexnet": AlexNetOptions, "mobilenetv2": MobileNetV2Options,
    "lstm": LSTMOptions, "drn_d_22": NoOptions, "digits_cnn": DigitsCNNOptions, "linear": NoOptions,
}


# ---- checking and reading ------------------------------------------------------------------------------


def option_problems(kind: str, name: str, options: dict[str, Any], path: str) -> list[str]:
    """Every problem of ``options`` for dataset or model ``name`` (``kind``), each line under ``path``."""
    try:
        read_options(kind, name, options, path)
    except ConfigError as err:
        return err.problems
    return []


def read_options(kind: str, name: str, options: dict[str, Any], path: str) -> Strict:
    """The effective options of dataset or model ``name`` (``kind``); ConfigError naming each bad one."""
    model = (DATASET_OPTIONS if kind == "dataset" else MODEL_OPTIONS)[name]
    try:
        return model.model_validate(options)
    except ValidationError as err:
        raise ConfigError(error_lines(err, path, model, unknown=f"unknown option for {kind} {name!r}")) from None


def dataset_options(dataset: DatasetSpec, path: str = "cell.dataset.options") -> Any:
    """The effective options of a cell's dataset; ConfigError naming each bad one."""
    return read_options("dataset", dataset.name, dataset.options, path)


def model_options(model: str, options: dict[str, Any], path: str = "cell.model_options") -> Any:
    """The effective options of ``model``; ConfigError naming each bad one."""
    return read_options("model", model, options, path)
