"""Models: every one trains a couple of steps on its dataset; losses and metric names."""

from __future__ import annotations

import pytest
import torch

from critbatch.jobs.config import Cell
from critbatch.jobs.data import load_task_data
from critbatch.jobs.errors import ConfigError
from critbatch.jobs.models import build_model, loss_fn, metric_name


def make_cell(dataset: str, model: str, batch_size: int = 16, model_options=None, lr: float = 0.05, **ds) -> Cell:
    return Cell.from_dict({
        "dataset": {"name": dataset, **ds}, "model": model, "strategy": "blr", "batch_size": batch_size,
        "base_lr": lr, "base_batch": batch_size, "epochs": 1, "model_options": model_options or {},
    })


def train_steps(cell: Cell, root: str, steps: int = 2) -> list[float]:
    torch.manual_seed(0)
    data = load_task_data(cell, root)
    model = build_model(cell, data)
    opt = torch.optim.SGD(model.parameters(), lr=cell.base_lr, momentum=0.9)
    loss_of = loss_fn(data.task)
    losses = []
    for _, (x, y) in zip(range(steps), data.train_batches(0, cell.batch_size, seed=0)):
        loss = loss_of(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_digits_cnn_learns():
    cell = make_cell("digits", "digits_cnn", 32)
    losses = train_steps(cell, "/x", steps=30)
    assert losses[0] == pytest.approx(2.30, abs=0.1)  # ln 10 at the start
    assert sum(losses[-5:]) / 5 < 1.0


def test_linear_is_zero_init_and_decreases_half_mse():
    cell = make_cell("linreg", "linear", 16, lr=0.002, options={"n": 64, "d": 128})
    data = load_task_data(cell, "/x")
    model = build_model(cell, data)
    assert float(model.weight.detach().abs().sum()) == 0.0
    x, y = data.train_x, data.train_y
    assert float(loss_fn("regression")(model(x), y)) == pytest.approx(0.5 * float((y ** 2).mean()), rel=1e-6)
    losses = train_steps(cell, "/x", steps=4)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("task,name", [
    ("classification", "accuracy"), ("language_model", "perplexity"), ("segmentation", "miou"), ("regression", "none"),
])
def test_metric_names(task, name):
    assert metric_name(task) == name


def test_losses():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1])
    expected = torch.nn.functional.cross_entropy(logits, y)
    assert torch.allclose(loss_fn("classification")(logits, y), expected)
    # LM: (N, T, V) logits against (N, T) targets.
    assert torch.allclose(loss_fn("language_model")(logits.view(1, 2, 2), y.view(1, 2)), expected)
    # Segmentation ignores 255.
    seg_logits = logits.T.reshape(1, 2, 1, 2)
    seg_y = torch.tensor([[[0, 255]]])
    assert torch.allclose(loss_fn("segmentation")(seg_logits, seg_y),
                          torch.nn.functional.cross_entropy(logits[:1], y[:1]))
    assert float(loss_fn("regression")(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]))) == 2.5
    with pytest.raises(ValueError, match="allowed: classification"):
        loss_fn("ranking")


def test_unknown_model_option():
    cell = make_cell("digits", "digits_cnn", model_options={"depth": 3})
    with pytest.raises(ConfigError, match=r"model_options: unknown \['depth'\].*allowed: width"):
        build_model(cell, load_task_data(cell, "/x"))
