"""critbatch's own datasets, declared as any plug-in declares one; pyproject.toml registers each under its name.

Torch-free: a grid is validated from these declarations, and a loader is
imported only when a cell is built. Sizes are the standard train splits
(SVHN's extra split adds 531,131 to the 73,257; WikiText-2's figure counts
bptt-35 sequences of its 2,088,628 training tokens; ``digits`` keeps 80 % of
scikit-learn's 1,797).
"""

from __future__ import annotations

from ..cell.options import (
    CifarOptions,
    CityscapesOptions,
    LinregOptions,
    Mnist1dOptions,
    PycorpusOptions,
    TokensOptions,
    MnistOptions,
    SvhnOptions,
)
from ..cell.plugins import DatasetPlugin

_LOADERS = "critbatch.jobs.data.datasets"

MNIST = DatasetPlugin(f"{_LOADERS}:load_images", "classification", MnistOptions, 60000, classes=10,
                      description="MNIST's idx files, zero-padded to 32x32")
CIFAR10 = DatasetPlugin(f"{_LOADERS}:load_images", "classification", CifarOptions, 50000, classes=10,
                        description="CIFAR-10, python version")
CIFAR100 = DatasetPlugin(f"{_LOADERS}:load_images", "classification", CifarOptions, 50000, classes=100,
                         description="CIFAR-100, python version")
SVHN = DatasetPlugin(f"{_LOADERS}:load_images", "classification", SvhnOptions, 73257, classes=10, extra_size=531131,
                     description="SVHN's .mat files (extra: true adds the extra split)")
WIKITEXT2 = DatasetPlugin(f"{_LOADERS}:load_wikitext2", "language_model", train_size=59675,
                          description="WikiText-2's tokens, word level, bptt 35")
CITYSCAPES = DatasetPlugin(f"{_LOADERS}:load_cityscapes", "segmentation", CityscapesOptions, 2975, classes=19,
                           description="Cityscapes fine annotations, 19 classes, resized")
DIGITS = DatasetPlugin(f"{_LOADERS}:load_digits", "classification", train_size=1437, classes=10,
                       description="scikit-learn's 8x8 handwritten digits, built in")
LINREG = DatasetPlugin(f"{_LOADERS}:load_linreg", "regression", LinregOptions, lambda o: o.n,
                       description="over-parameterised least squares with a known critical batch size")
MNIST1D = DatasetPlugin("critbatch.jobs.data.mnist1d:load_mnist1d", "classification", Mnist1dOptions,
                        lambda o: int(o.num_samples // 10 * 10 * 0.8), classes=10,
                        description="MNIST-1D (Greydanus 2020), generated offline by its own generator")
TOKENS = DatasetPlugin("critbatch.jobs.data.tokens:load_tokens", "language_model", TokensOptions,
                       description="token ids: nanoGPT's train.bin/val.bin or modded-nanogpt's FineWeb shards")
PYCORPUS = DatasetPlugin("critbatch.jobs.data.tokens:load_pycorpus", "language_model", PycorpusOptions,
                         lambda o: _pycorpus_windows(o.seq_len),
                         description="the offline corpus: pydoc_data.topics as UTF-8 bytes, built in")


def _pycorpus_windows(seq_len: int) -> int:
    from .corpus import pycorpus_windows

    return pycorpus_windows(seq_len)
