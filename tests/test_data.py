"""Datasets: sizes, deterministic batching across calls/ranks/resumes, augmentation, linreg's figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from critbatch.jobs.config import Cell
from critbatch.jobs.data import TaskData, load_task_data, random_crop


def make_cell(dataset: str, model: str, batch_size: int = 32, **ds) -> Cell:
    return Cell.from_dict({
        "dataset": {"name": dataset, **ds}, "model": model, "strategy": "blr",
        "batch_size": batch_size, "base_lr": 0.1, "base_batch": batch_size, "epochs": 1,
    })


def linreg_cell(batch_size: int = 8, **opts) -> Cell:
    return make_cell("linreg", "linear", batch_size, options={"n": 64, "d": 128, "spikes": 2, "spike_var": 20.0, **opts})


def test_digits_split_and_shapes():
    data = load_task_data(make_cell("digits", "digits_cnn"), "/nonexistent")
    assert (data.n_train, len(data.test_x)) == (1437, 360)
    assert data.train_x.shape == (1437, 1, 8, 8) and data.train_x.dtype == torch.float32
    assert data.train_y.dtype == torch.int64 and set(data.train_y.tolist()) == set(range(10))
    assert data.in_channels == 1 and data.num_classes == 10
    assert abs(float(data.train_x.mean())) < 0.05 and abs(float(data.train_x.std()) - 1) < 0.05
    assert data.n_train == make_cell("digits", "digits_cnn").train_size()


@pytest.mark.parametrize("fraction,max_train,expected", [
    (1.0, None, 1437), (0.5, None, 718), (0.25, None, 359), (1.0, 1000, 1000), (0.5, 1000, 500),
])
def test_digits_fraction_and_max_train(fraction, max_train, expected):
    cell = make_cell("digits", "digits_cnn", 16, fraction=fraction, max_train=max_train)
    data = load_task_data(cell, "/nonexistent")
    assert data.n_train == expected == cell.train_size() == len(data.train_x)
    # The subset is fixed: the same rows whatever the cell's seed.
    again = load_task_data(Cell.from_dict({**cell.to_dict(), "seed": 7}), "/nonexistent")
    assert torch.equal(data.train_x, again.train_x)


def test_steps_per_epoch_drops_last():
    data = load_task_data(make_cell("digits", "digits_cnn"), "/x")
    assert data.steps_per_epoch(64) == 1437 // 64 == 22
    assert data.steps_per_epoch(5000) == 1


def test_train_batches_deterministic_and_epoch_dependent():
    data = load_task_data(make_cell("digits", "digits_cnn"), "/x")
    a = [y for _, y in data.train_batches(0, 64, seed=1)]
    b = [y for _, y in data.train_batches(0, 64, seed=1)]
    c = [y for _, y in data.train_batches(1, 64, seed=1)]
    d = [y for _, y in data.train_batches(0, 64, seed=2)]
    assert len(a) == 22 and all(len(y) == 64 for y in a)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(c)) and not torch.equal(torch.cat(a), torch.cat(d))


def test_epoch_is_a_permutation():
    data = load_task_data(make_cell("linreg", "linear", 8), "/x")
    xs = torch.cat([x for x, _ in data.train_batches(3, 8, seed=0)])
    assert xs.shape == data.train_x.shape
    # Every training row appears exactly once (up to the dropped remainder; 512 % 8 == 0).
    assert torch.equal(xs[torch.argsort(xs[:, 0])], data.train_x[torch.argsort(data.train_x[:, 0])])


@pytest.mark.parametrize("dataset,model", [("digits", "digits_cnn"), ("linreg", "linear")])
def test_rank_slices_concatenate_to_world_one(dataset, model):
    data = load_task_data(make_cell(dataset, model, 8), "/x")
    whole = list(data.train_batches(0, 32, seed=5))
    r0 = list(data.train_batches(0, 32, seed=5, rank=0, world=2))
    r1 = list(data.train_batches(0, 32, seed=5, rank=1, world=2))
    assert len(whole) == len(r0) == len(r1)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, r0, r1):
        assert len(x0) == len(x1) == 16
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))


def test_resume_from_start_gives_the_same_batches():
    data = load_task_data(make_cell("digits", "digits_cnn"), "/x")
    full = list(data.train_batches(2, 50, seed=3))
    resumed = list(data.train_batches(2, 50, seed=3, start=9))
    assert len(resumed) == len(full) - 9
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[9:], resumed))


def test_train_batches_rejects_bad_world():
    data = load_task_data(make_cell("digits", "digits_cnn"), "/x")
    with pytest.raises(ValueError, match="not divisible by world size 3"):
        next(data.train_batches(0, 32, seed=0, world=3))


def test_eval_batches():
    cell = Cell.from_dict({**make_cell("digits", "digits_cnn").to_dict(), "eval": {"train_subset": 100}})
    data = load_task_data(cell, "/x")
    train = list(data.eval_batches("train", 30))
    assert [len(y) for _, y in train] == [30, 30, 30, 10]
    assert torch.equal(torch.cat([y for _, y in train]), torch.cat([y for _, y in data.eval_batches("train", 30)]))
    test_x = torch.cat([x for x, _ in data.eval_batches("test", 128)])
    assert torch.equal(test_x, data.test_x)
    with pytest.raises(ValueError, match="allowed: train, test"):
        next(data.eval_batches("valid", 8))


def test_linreg_beta_lambda_against_numpy():
    data = load_task_data(linreg_cell(), "/x")
    x = data.train_x.numpy().astype(np.float64)
    beta = (x ** 2).sum(1).max()
    lam = np.linalg.eigvalsh(x.T @ x / len(x))[-1]
    assert data.info["beta"] == pytest.approx(beta, rel=1e-9)
    assert data.info["lambda_1"] == pytest.approx(lam, rel=1e-7)
    assert data.info["m_star"] == pytest.approx(beta / lam + 1, rel=1e-7)
    # The spiked directions carry the variance they were given; labels are noiseless.
    assert x[:, :2].var(0).mean() == pytest.approx(20.0, rel=0.35)
    assert x[:, 2:].var() == pytest.approx(1.0, rel=0.1)
    w, *_ = np.linalg.lstsq(x, data.train_y.numpy().astype(np.float64), rcond=None)
    assert np.abs(x @ w - data.train_y.numpy()).max() < 1e-3


def test_linreg_default_calibration():
    """The design's setting (512 x 1024, four spikes of 60): m* near 33.7."""
    data = load_task_data(make_cell("linreg", "linear", 8), "/x")
    assert data.train_x.shape == (512, 1024) and data.test_x.shape == (512, 1024)
    assert 25 < data.info["m_star"] < 45


def test_linreg_depends_on_seed_only():
    a, b = load_task_data(linreg_cell(), "/x"), load_task_data(linreg_cell(), "/x")
    c = load_task_data(Cell.from_dict({**linreg_cell().to_dict(), "seed": 1}), "/x")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert not torch.equal(a.train_x, a.test_x)


@pytest.mark.parametrize("options,match", [
    ({"n": 0}, r"options.n: must be a positive integer"),
    ({"spike_var": -1.0}, r"options.spike_var: must be a positive number"),
    ({"spikes": 500}, r"options.spikes: 500 exceeds d = 128"),
])
def test_linreg_bad_options(options, match):
    from critbatch.jobs.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_task_data(linreg_cell(1, **options), "/x")


def test_to_device_keeps_values():
    data = load_task_data(make_cell("digits", "digits_cnn"), "/x")
    moved = data.to("cpu")
    assert isinstance(moved, TaskData) and moved.n_train == data.n_train
    assert torch.equal(next(moved.train_batches(0, 8, seed=0))[0], next(data.train_batches(0, 8, seed=0))[0])


def test_random_crop_gathers_shifted_windows():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.uint8).view(2, 1, 5, 5)
    out = random_crop(x, torch.tensor([4, 0]), torch.tensor([4, 8]), 4)
    assert torch.equal(out[0], x[0])  # offset == pad: the original image
    # Image 1 shifted by 4 rows down and 4 columns left in the padded frame.
    expected = torch.zeros(5, 5, dtype=torch.uint8)
    expected[4:, :1] = x[1, 0, :1, 4:]
    assert torch.equal(out[1, 0], expected)
