"""Small inputs the tests write themselves in the real formats, and the helpers that run and read them.

    SMALL_GRID, write_grid     a grid of two linreg cells, about a second each
    BRANCH_GRID                a base keeping two checkpoints and its branches, about a second a cell
    TINY, steps_of             the executor's three-cell linreg grid; the steps a cell logged
    DIGITS, cell_json, train   a digits cell, trained through ``critbatch train``
    read_rows, read_success, final_weights    what a trained cell left in the store
    KUBE_VERSION               the oldest Kubernetes the rendered objects are validated against
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import yaml

from critbatch.jobs.cell.logschema import ipc_to_table
from critbatch.jobs.cli import main as cli_main
from critbatch.jobs.store import Store

if TYPE_CHECKING:
    import torch

#: The Kubernetes version rendered objects are validated against with kubernetes-validate's strict schemas.
KUBE_VERSION = "1.31"

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


#: SMALL_GRID as a base that keeps its checkpoints at 30 % and 50 % of its 64 steps (steps 19 and 32; batch 4 of 64 examples,
#: momentum, so the optimizer's state matters) and branches from both at 1 and 4 times its batch, 128 examples
#: each (docs/branches.md). Each cell trains in about a second.
BRANCH_GRID = {
    **SMALL_GRID,
    "sweep": "branches",
    "strategy": "blr",
    "base_lr": 0.002,
    "batch_size": 4,
    "optimizer": {"momentum": 0.9, "weight_decay": 0.0},
    "keep": {"at": [0.3, 0.5]},
    "branch": {"multipliers": [1, 4], "length": {"examples": 128}, "rule": "linear"},
}


def write_grid(path: Path, **changes) -> Path:
    """SMALL_GRID with ``changes`` (a value None drops the field), as a YAML file at ``path``."""
    spec = {k: v for k, v in {**SMALL_GRID, **changes}.items() if v is not None}
    path.write_text(yaml.safe_dump(spec))
    return path


#: The executor's grid: three linreg cells (batch 4, 8, 16) of a few seconds each: SMALL_GRID for longer, with
#: more evaluations and the noise probe at its default.
TINY = {
    **{k: v for k, v in SMALL_GRID.items() if k != "noise"},
    "sweep": "tiny", "epochs": 20, "batch_size": [4, 8, 16], "eval": {"points": 10},
}

#: A digits cell of 30 steps (LSR with a warm-up, noise statistics every 4th step).
DIGITS = {
    "dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "lsr", "batch_size": 64,
    "base_lr": 0.05, "base_batch": 32, "epochs": 2, "warmup_epochs": 0.25, "sweep": "t",
    "eval": {"points": 8, "train_subset": 300}, "noise": {"every": 4}, "max_steps": 30,
}


def cell_json(**over) -> str:
    """DIGITS with the top-level fields ``over`` replaced, as the JSON ``critbatch train --cell`` takes."""
    data = json.loads(json.dumps(DIGITS))
    for key, value in over.items():
        data[key] = value
    return json.dumps(data)


def train(cell: str, store: str, *extra: str) -> int:
    """``critbatch train`` in this process, one thread, no progress output; its exit code."""
    return cli_main(["train", "--cell", cell, "--store", store, "--progress", "none", "--threads", "1", *extra])


def read_rows(store: Store, prefix: str, kind: str) -> list[dict]:
    """Every row of a cell's ``steps`` or ``evals`` log parts, part after part."""
    rows: list[dict] = []
    for key in store.list(f"{prefix}/{kind}/"):
        rows.extend(ipc_to_table(store.get_bytes(key)).to_pylist())
    return rows


def steps_of(store: Store, prefix: str) -> list[int]:
    """The ``step`` column of a cell's step log, part after part."""
    tables = [ipc_to_table(store.get_bytes(k)) for k in store.list(f"{prefix}/steps/")]
    return pa.concat_tables(tables).column("step").to_pylist()


def read_success(store: Store, prefix: str) -> dict:
    return json.loads(store.get_text(f"{prefix}/_SUCCESS"))


def final_weights(store: Store, prefix: str) -> dict[str, "torch.Tensor"]:
    import torch

    return torch.load(io.BytesIO(store.get_bytes(f"{prefix}/model.pt")), weights_only=True)
