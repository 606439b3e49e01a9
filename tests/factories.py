"""Small inputs the tests write themselves in the real formats."""

from __future__ import annotations

from pathlib import Path

import yaml

#: A grid whose cells train in about a second each on one CPU thread (the known-answer problem, small).
SMALL_GRID = {
    "sweep": "small",
    "dataset": {"name": "linreg", "options": {"n": 64, "d": 128, "spikes": 2, "spike_var": 20.0}},
    "model": "linear",
    "strategy": "oracle",
    "base_lr": 1.0,
    "base_batch": 4,
    "epochs": 4,
    "batch_size": [4, 8],
    "seed": 0,
    "optimizer": {"momentum": 0.0, "weight_decay": 0.0},
    "eval": {"points": 5},
    "noise": {"every": 0},
    "resources": {"gpus": 0, "cpu": 1, "memory": "1Gi"},
}


def write_grid(path: Path, **changes) -> Path:
    """SMALL_GRID with ``changes`` (a value None drops the field), as a YAML file at ``path``."""
    spec = {k: v for k, v in {**SMALL_GRID, **changes}.items() if v is not None}
    path.write_text(yaml.safe_dump(spec))
    return path
