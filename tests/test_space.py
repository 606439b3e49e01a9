"""The store space a sweep needs (jobs/sweep/space.py), against what a cell really writes."""

from __future__ import annotations

import json

import pytest

from critbatch.jobs.cell.layout import cell_prefix
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.store import LocalStore
from critbatch.jobs.sweep.grid import load_grid
from critbatch.jobs.sweep.sizing import load_table
from critbatch.jobs.sweep.space import cell_space, sweep_space
from critbatch.jobs.train.main import train_cell


class MeteredStore(LocalStore):
    """A local store that remembers the most bytes it ever held at once."""

    def __init__(self, root):
        super().__init__(root)
        self.sizes: dict[str, int] = {}
        self.peak = 0

    def put_bytes(self, key: str, data: bytes) -> None:
        super().put_bytes(key, data)
        self.sizes[key] = len(data)
        self.peak = max(self.peak, sum(self.sizes.values()))

    def delete(self, key: str) -> None:
        super().delete(key)
        self.sizes.pop(key, None)

    def delete_prefix(self, prefix: str) -> None:
        super().delete_prefix(prefix)
        for key in [k for k in self.sizes if k.startswith(prefix)]:
            del self.sizes[key]


@pytest.mark.slow
def test_a_cell_writes_what_the_estimate_says(tmp_path, cpu_env):
    """A digits cell checkpointing every 20 steps: its peak and what it keeps, next to the estimate."""
    cell = Cell.from_json(json.dumps({"dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "blr",
                                      "batch_size": 16, "base_lr": 0.05, "base_batch": 16, "epochs": 1,
                                      "sweep": "space", "eval": {"points": 2}}))
    store = MeteredStore(tmp_path / "store")
    train_cell(cell, store, data_root=str(tmp_path / "data"), device="cpu", checkpoint_steps=20, progress="none")
    kept = sum(store.sizes.values())
    estimate = cell_space(cell)
    assert estimate.known and not store.list(f"{cell_prefix(cell.sweep, cell.id)}/checkpoint/")
    # Kept: model.pt dominates; the estimate's allowance for small files makes it an upper bound.
    assert kept <= estimate.kept <= kept + 128 * 1024
    # While running: two checkpoints of weights and momentum held, a third written before the oldest goes.
    assert store.peak - kept <= estimate.running <= 1.5 * (store.peak - kept)


def test_resnet34_cells_keep_their_weights_and_hold_three_checkpoints_while_running():
    grid = load_grid("table1-cifar10-resnet34")
    weights = load_table()["resnet34/3x32x32"]["param_bytes"]  # 21.3 M parameters in fp32
    space = cell_space(grid.cells()[0])
    assert weights < space.kept < weights + 50e6  # model.pt and some MB of step log
    assert space.running == 3 * 2 * weights  # weights and SGD momentum, three checkpoints at most


@pytest.mark.parametrize("max_active, running", [(0, 27), (8, 8), (100, 27)])
def test_sweep_line_counts_the_checkpoints_of_the_cells_that_run_at_once(max_active, running):
    cells = load_grid("table1-cifar10-resnet34").cells()
    assert len(cells) == 27
    line = sweep_space(cells, max_active)
    assert line.startswith("store: this sweep needs about ") and f"while {running} cells run" in line
    per_cell = cell_space(cells[0]).running
    assert f"up to {per_cell * running / 1e9:.1f} GB of checkpoints" in line


def test_render_prints_what_the_sweep_needs_before_anything_is_written(tmp_path, capsys):
    from critbatch.jobs.cli import main as cli

    assert cli(["render", "table1-cifar10-resnet34", "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert sweep_space(load_grid("table1-cifar10-resnet34").cells(), 0) in err.splitlines()
    assert err.index("store: this sweep needs about") < err.index("wrote ")
