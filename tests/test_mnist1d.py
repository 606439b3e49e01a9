"""MNIST-1D: made by its own generator with its default arguments, cached under the data root, sized by num_samples."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.data import mnist1d
from critbatch.jobs.data.datasets import load_task_data


def mnist1d_cell(num_samples: int = 200, **dataset) -> Cell:
    return Cell.from_dict({
        "dataset": {"name": "mnist1d", "options": {"num_samples": num_samples}, **dataset}, "model": "mnist1d_cnn",
        "strategy": "blr", "batch_size": 16, "base_lr": 0.03, "base_batch": 16, "epochs": 1,
    })


def test_the_generators_own_data_with_its_defaults_and_no_global_rng_disturbed(tmp_path):
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(123)
    random.seed(123)
    before = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    data = load_task_data(mnist1d_cell(200), str(tmp_path))
    assert (np.random.random(), random.random()) == before

    args = get_dataset_args()
    args.num_samples = 200
    expected = make_dataset(args)
    assert data.n_train == 160 and data.info["n_test"] == 40 and data.input_shape == (1, 40)
    assert torch.equal(data.train_x, torch.from_numpy(expected["x"].astype(np.float32)).unsqueeze(1))
    assert torch.equal(data.test_y, torch.from_numpy(expected["y_test"]))
    assert data.num_classes == 10 and data.info["generator"] == "mnist1d.data.make_dataset"


def test_the_set_is_cached_under_the_data_root_and_read_back_without_generating(tmp_path, monkeypatch):
    first = load_task_data(mnist1d_cell(300), str(tmp_path))
    files = list((tmp_path / "mnist1d").glob("mnist1d-*-n300.npz"))
    assert len(files) == 1 and first.info["cache"] == str(files[0])

    def no_generation(num_samples):
        raise AssertionError("generated again")

    monkeypatch.setattr(mnist1d, "generate", no_generation)
    again = load_task_data(mnist1d_cell(300), str(tmp_path))
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.test_y, first.test_y)


@pytest.mark.parametrize("num_samples,fraction,n_train", [(200, 1.0, 160), (200, 0.5, 80), (1000, 0.25, 200),
                                                          (1005, 1.0, 800)])
def test_num_samples_and_fraction_set_the_training_set_as_the_cell_expects(tmp_path, num_samples, fraction, n_train):
    cell = mnist1d_cell(num_samples, fraction=fraction)
    assert cell.train_size() == n_train  # known before loading: the batch-size checks use it
    assert load_task_data(cell, str(tmp_path)).n_train == n_train


def test_a_batch_larger_than_the_generated_set_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match=r"batch_size: 256 is larger than the training set \(160 examples\)"):
        Cell.from_dict({**mnist1d_cell(200).to_dict(), "batch_size": 256})


def test_an_unwritable_data_root_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"--data-root: cannot cache MNIST-1D at .*; give a writable --data-root"):
        load_task_data(mnist1d_cell(200), str(blocker))
