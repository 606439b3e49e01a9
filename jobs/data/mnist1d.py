"""MNIST-1D (Greydanus 2020, "Scaling down deep learning"), generated offline and cached under the data root.

Ten 1-D templates of the digits, each example padded, scaled, translated,
sheared, blurred with correlated and i.i.d. noise and resampled to 40 points,
made by the ``mnist1d`` package's own generator (``mnist1d.data.make_dataset``)
with its default arguments (``get_dataset_args()``: 5,000 examples, 80 % for
training, seed 42) but ``num_samples``; its download URL is never used. The
result is standardised as the generator leaves it and stored as one ``.npz``
per generator argument set under ``<data root>/mnist1d/``, written whole, so
later cells (and concurrent ones) read it instead of generating it again.

Inputs are (N, 1, 40) float32 signals, labels the ten digits. The published
test accuracies for the default set (4,000 / 1,000): logistic regression 32 %,
MLP 68 %, CNN 94 %, GRU 91 %.
"""

from __future__ import annotations

import json
import os
import random
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cell.errors import ConfigError
from ..cell.plugins import DataRequest
from .plugin import InMemory


def generator_args(num_samples: int) -> dict[str, Any]:
    """The generator's default arguments with ``num_samples`` set (its download URL dropped: never fetched)."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)
    return {**args, "num_samples": num_samples}


def generate(num_samples: int) -> dict[str, np.ndarray]:
    """MNIST-1D from its own generator: x (N, 40) float64, y (N,) int64 for the train and test splits.

    The generator seeds NumPy's and Python's global random state; both are restored afterwards.
    """
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(ObjectView(generator_args(num_samples)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {"x": data["x"], "y": data["y"], "x_test": data["x_test"], "y_test": data["y_test"]}


def cached(root: Path, num_samples: int) -> tuple[dict[str, np.ndarray], Path]:
    """The set for ``num_samples`` from ``root`` (generated and written there first if absent), and its file.

    The file is named after the generator's version, whose defaults it was made with, so reading it
    needs no import of the generator (nor of the matplotlib it loads).
    """
    path = root / f"mnist1d-{metadata.version('mnist1d')}-n{num_samples}.npz"
    if path.is_file():
        with np.load(path) as npz:
            return {k: npz[k] for k in ("x", "y", "x_test", "y_test")}, path
    data = generate(num_samples)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **data, args=np.array(json.dumps(generator_args(num_samples), sort_keys=True)))
        os.replace(tmp, path)
    except OSError as err:
        raise ConfigError(f"--data-root: cannot cache MNIST-1D at {path} ({err.strerror}); give a writable "
                          f"--data-root") from None
    return data, path


def load_mnist1d(request: DataRequest, options: Any) -> InMemory:
    """MNIST-1D with ``options.num_samples`` examples: (N, 1, 40) float32 signals and their digits."""
    data, path = cached(request.root, options.num_samples)

    def signals(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.float32)).unsqueeze(1)

    info = {"generator": "mnist1d.data.make_dataset", "mnist1d_version": metadata.version("mnist1d"),
            "num_samples": options.num_samples, "cache": str(path)}
    return InMemory(signals(data["x"]), torch.from_numpy(data["y"]).long(), signals(data["x_test"]),
                    torch.from_numpy(data["y_test"]).long(), num_classes=10, info=info)
