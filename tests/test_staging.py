"""Staged datasets are found where a grid's pods look for them, for every dataset format a preset uses.

The README's way: ``critbatch data stage NAME --from DIR --store STORE`` once, then cells read
``--data-root`` as rendered (the grid's ``data_root``, by default its store) through the loopback S3
server. What arrives must be what the files on disk hold.
"""

from __future__ import annotations

import pytest
import torch
from datafiles import write_dataset

from critbatch.jobs.cli import main as cli
from critbatch.jobs.data.datasets import LAYOUTS, load_task_data
from critbatch.jobs.store import open_store
from critbatch.jobs.sweep.grid import load_grid, preset_names

pytestmark = pytest.mark.s3

#: One preset per staged dataset format, and what its first cell of that dataset asks for.
PRESET_OF = {
    "mnist": "table1-mnist-resnet34",
    "cifar10": "table1-cifar10-resnet34",
    "cifar100": "table1-cifar100-resnet34",
    "svhn": "fig4-fractions-svhn",  # train + extra
    "wikitext2": "table1-wikitext2-lstm",
    "cityscapes": "table1-cityscapes-drn-d-22",
    "tokens": "gpt124m-fineweb",  # FineWeb shards, streamed
}


def test_every_staged_format_a_preset_uses_is_covered():
    used = {cell.dataset.name for name in preset_names() for cell in load_grid(name).cells()}
    assert used & set(LAYOUTS) == set(PRESET_OF)


@pytest.mark.parametrize("name", sorted(PRESET_OF))
def test_staged_dataset_is_read_where_the_grid_looks(name, s3_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CRITBATCH_CACHE", str(tmp_path / "cache"))
    grid = load_grid(PRESET_OF[name]).with_overrides(store=s3_url)
    cell = next(c for c in grid.cells() if c.dataset.name == name)
    source = tmp_path / "disk" / name
    write_dataset(name, source, **({"n_extra": 24} if cell.dataset.extra else {}))

    assert cli(["data", "stage", name, "--from", str(source), "--store", grid.store]) == 0
    assert f"--data-root {s3_url}" in capsys.readouterr().out
    assert grid.data_root == s3_url  # what render passes as --data-root
    assert open_store(s3_url).list(f"datasets/{name}/"), "staged under <store>/datasets/<name>/"

    staged = load_task_data(cell, grid.data_root)
    on_disk = load_task_data(cell, str(tmp_path / "disk"))
    assert staged.n_train == on_disk.n_train > 0
    if not hasattr(staged, "train_x"):  # a stream (token files): the same batches and evaluation windows
        m = cell.batch_size
        for a, b in zip(staged.train_batches(0, m, seed=cell.seed), on_disk.train_batches(0, m, seed=cell.seed)):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(staged.eval_batches("test", 4), on_disk.eval_batches("test", 4)):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        return
    assert torch.equal(staged.train_x, on_disk.train_x) and torch.equal(staged.train_y, on_disk.train_y)
    assert torch.equal(staged.test_x, on_disk.test_x) and torch.equal(staged.test_y, on_disk.test_y)
