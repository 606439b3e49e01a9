"""Once ``_SUCCESS`` is written the cell's checkpoints go (a finished cell is never resumed); model.pt stays."""

from __future__ import annotations

import json

import torch

from critbatch.jobs.cell.errors import StoreUnavailable
from critbatch.jobs.cell.layout import cell_prefix, success_key
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.store import LocalStore
from critbatch.jobs.train.checkpoint import Checkpointer
from critbatch.jobs.train.finish import write_results

CELL = Cell.from_json(json.dumps({"dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "blr",
                                  "batch_size": 16, "base_lr": 0.05, "base_batch": 16, "epochs": 1, "sweep": "t"}))
PREFIX = cell_prefix(CELL.sweep, CELL.id)
SUMMARY = {"cell_id": CELL.id, "status": "done", "steps": 3}


class DownForDeletes(LocalStore):
    """A store that fails every delete as an outage would."""

    def delete_prefix(self, prefix: str) -> None:
        raise StoreUnavailable(f"cannot delete {prefix}: connection refused")


def _with_checkpoints(store: LocalStore) -> None:
    for step in (2, 3):
        Checkpointer(store, PREFIX).save(step, {"step": step})
    assert Checkpointer(store, PREFIX).complete_steps() == [2, 3]


def test_success_prunes_the_checkpoints_and_keeps_the_weights(tmp_path):
    store = LocalStore(tmp_path / "store")
    _with_checkpoints(store)
    write_results(store, CELL, SUMMARY, logs=None, weights={"w": torch.arange(3.0)})
    assert store.list(f"{PREFIX}/checkpoint/") == []
    assert json.loads(store.get_text(success_key(CELL.sweep, CELL.id)))["status"] == "done"
    assert torch.equal(torch.load(tmp_path / "store" / PREFIX / "model.pt")["w"], torch.arange(3.0))


def test_a_store_failing_after_success_leaves_the_checkpoints_and_the_cell_done(tmp_path, capsys):
    store = DownForDeletes(tmp_path / "store")
    _with_checkpoints(store)
    write_results(store, CELL, SUMMARY, logs=None, weights=None)
    assert store.exists(success_key(CELL.sweep, CELL.id))
    assert Checkpointer(store, PREFIX).complete_steps() == [2, 3]
    assert f"cell {CELL.id} is done, but its checkpoints stay in" in capsys.readouterr().err
