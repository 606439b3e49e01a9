"""sync_bn: the trainer's model normalises over every rank's micro-batch (torch.nn.SyncBatchNorm), and
keeps the state dict of the plain model, so its checkpoints and model.pt read the same.

SyncBatchNorm synchronises only on GPUs, which these machines lack: the conversion is checked on the CPU,
and a CPU cell of several ranks that asks for it is refused before anything is written.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.data.datasets import TaskData
from critbatch.jobs.store import open_store
from critbatch.jobs.train import main

CELL = {"dataset": {"name": "cifar10"}, "model": "resnet34", "strategy": "blr", "batch_size": 64, "base_lr": 0.1,
        "base_batch": 64, "epochs": 1.0}


def data() -> TaskData:
    return TaskData("cifar10", "classification", 2, 10, None, {}, train_x=torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("world, sync_bn, synced", [pytest.param("2", True, True, marks=pytest.mark.slow), ("1", True, False), ("2", False, False)])
def test_sync_bn_converts_every_batchnorm_under_several_ranks(monkeypatch, world, sync_bn, synced):
    monkeypatch.setenv("WORLD_SIZE", world)
    model = main._initial_model(Cell.from_dict({**CELL, "sync_bn": sync_bn}), data())
    plain = main._initial_model(Cell.from_dict(CELL), data())
    assert count(model, nn.SyncBatchNorm) == (36 if synced else 0)  # ResNet-34's BatchNorm layers
    assert count(plain, nn.BatchNorm2d) == 36
    state, reference = model.state_dict(), plain.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)  # the same initial weights


def test_sync_bn_on_cpu_ranks_is_refused_before_anything_is_read_or_written(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    store = open_store(str(tmp_path / "store"))
    cell = Cell.from_dict({**CELL, "batch_size": 2, "base_batch": 2, "sync_bn": True})
    with pytest.raises(ConfigError, match=r"^cell.sync_bn: torch's SyncBatchNorm runs on GPUs only, and this cell's "
                                          r"ranks train on cpu"):
        main.train_cell(cell, store, data_root=str(tmp_path), device="cpu")
    assert store.list("") == []
