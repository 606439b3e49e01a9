"""Models: every one trains a couple of steps on its dataset; losses and metric names."""

from __future__ import annotations

import pytest
import torch

from critbatch.jobs.cell.registry import resolve
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.data.datasets import load_task_data
from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.models.zoo import build_model, loss_fn, metric_name


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
    assert float(loss_fn("regression")(model(x).detach(), y)) == pytest.approx(0.5 * float((y ** 2).mean()), rel=1e-6)
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
    with pytest.raises(ConfigError, match=r"model_options.depth: unknown option.*allowed: width"):
        make_cell("digits", "digits_cnn", model_options={"depth": 3})


# ---- every model on its dataset, read from tiny files in the real formats ----------------

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from datafiles import write_dataset  # noqa: E402

from critbatch.jobs.models.drn import DRND22  # noqa: E402


@pytest.fixture(scope="module")
def disk_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name in ("mnist", "cifar10", "cifar100", "svhn", "wikitext2", "cityscapes"):
        write_dataset(name, root / name)
    return str(root)


SMOKE = [  # model, dataset, batch, dataset options, expected output shape after the batch dimension
    ("resnet34", "cifar10", 8, {}, (10,)),
    ("vgg16", "cifar100", 8, {}, (100,)),
    ("alexnet", "svhn", 8, {}, (10,)),
    ("mobilenetv2", "mnist", 8, {}, (10,)),
    ("lstm", "wikitext2", 4, {}, (35, None)),
    ("drn_d_22", "cityscapes", 2, {"size": [64, 96]}, (19, 64, 96)),
    ("digits_cnn", "digits", 16, {}, (10,)),
    ("linear", "linreg", 16, {"n": 64, "d": 32}, ()),
    ("mnist1d_mlp", "mnist1d", 16, {"num_samples": 200}, (10,)),
    ("mnist1d_cnn", "mnist1d", 16, {"num_samples": 200}, (10,)),
    ("mnist1d_gru", "mnist1d", 16, {"num_samples": 200}, (10,)),
]


@pytest.mark.parametrize("model,dataset,batch,options,out_shape", [
    pytest.param(*s, id=s[0], marks=pytest.mark.slow if s[0] in ("resnet34", "vgg16") else ()) for s in SMOKE])
def test_every_model_trains_on_its_dataset(disk_root, model, dataset, batch, options, out_shape):
    cell = make_cell(dataset, model, batch, lr=0.01 if model != "linear" else 0.001, options=options)
    torch.manual_seed(0)
    data = load_task_data(cell, disk_root)
    net = build_model(cell, data)
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=cell.base_lr, momentum=0.9)
    loss_of = loss_fn(data.task)
    for _, (x, y) in zip(range(2), data.train_batches(0, batch, seed=0)):
        out = net(x)
        expected = tuple(data.vocab_size if s is None else s for s in out_shape)
        assert out.shape == (batch, *expected)
        loss = loss_of(out, y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()) if b.requires_grad)
    net.eval()
    with torch.no_grad():
        x, y = next(data.eval_batches("test", batch))
        assert torch.isfinite(loss_of(net(x), y))


@pytest.mark.parametrize("model", ["resnet34", pytest.param("vgg16", marks=pytest.mark.slow), "alexnet", "mobilenetv2"])
@pytest.mark.parametrize("dataset,channels", [("mnist", 1), ("cifar10", 3)])
def test_image_models_take_channels_from_data(disk_root, model, dataset, channels):
    cell = make_cell(dataset, model, 4)
    data = load_task_data(cell, disk_root)
    net = build_model(cell, data).eval()
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == channels == data.in_channels
    x, _ = next(data.eval_batches("test", 2))
    assert net(x).shape == (2, 10)


@pytest.mark.parametrize("model,dataset,shape", [
    ("resnet34", "cifar10", (2, 3, 32, 32)), pytest.param("vgg16", "cifar10", (2, 3, 32, 32), marks=pytest.mark.slow),
    ("alexnet", "cifar10", (2, 3, 32, 32)), ("mobilenetv2", "cifar10", (2, 3, 32, 32)),
    ("drn_d_22", "cityscapes", (1, 3, 48, 64)), ("digits_cnn", "digits", (2, 1, 8, 8)),
])
def test_channels_last_gives_the_same_outputs(disk_root, model, dataset, shape):
    cell = make_cell(dataset, model, 2, options={"size": [48, 64]} if dataset == "cityscapes" else {})
    torch.manual_seed(0)
    data = load_task_data(cell, disk_root)
    net = build_model(cell, data).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = net(x)
        net = net.to(memory_format=torch.channels_last)
        out = net(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_resnet34_is_cifar_sized():
    from critbatch.jobs.cell.plugins import DataShape, NoOptions
    from critbatch.jobs.models.zoo import resnet34

    net = resnet34(DataShape("classification", (3, 32, 32), 10), NoOptions())
    assert sum(p.numel() for p in net.parameters()) == 21_282_122
    assert [len(layer) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)] == [3, 4, 6, 3]
    assert isinstance(net.maxpool, torch.nn.Identity) and net.conv1.kernel_size == (3, 3)


def test_drn_d_22_structure():
    net = DRND22(19)
    # The paper's DRN-D-22 has 16.4 M parameters with its 1000-way ImageNet classifier;
    # here the classifier is a 1x1 convolution to 19 classes.
    backbone = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("classifier"))
    assert backbone + 512 * 1000 + 1000 == pytest.approx(16.4e6, rel=0.01)
    dilations = [m.dilation[0] for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert dilations == [1, 1] + [1] * 8 + [2] * 4 + [4] * 4 + [2, 1]
    # No shortcut in the degridding levels 7 and 8.
    assert not any(hasattr(m, "shortcut") for m in list(net.level7.modules()) + list(net.level8.modules()))
    x = torch.randn(1, 3, 60, 100)
    with torch.no_grad():
        assert net.features(x).shape == (1, 512, 8, 13)  # output stride 8
        assert net(x).shape == (1, 19, 60, 100)  # upsampled back to the input


def test_lstm_options_and_tied_weights():
    from critbatch.jobs.models.zoo import LSTMLanguageModel

    net = LSTMLanguageModel(50, emsize=16, nhid=16, nlayers=2, dropout=0.0, tied=True)
    assert net.decoder.weight is net.encoder.weight
    assert net.rnn.num_layers == 2 and net.rnn.hidden_size == 16
    x = torch.randint(0, 50, (3, 35))
    assert net(x).shape == (3, 35, 50)
    # Each sample is independent: a sample's output does not depend on its batch neighbours.
    with torch.no_grad():
        assert torch.allclose(net(x[:1]), net(x)[:1], atol=1e-6)


@pytest.mark.parametrize("model,dataset,options,match", [
    ("lstm", "wikitext2", {"tied": True, "nhid": 100}, r"tied: tied weights need emsize == nhid, got 200 and 100"),
    ("lstm", "wikitext2", {"dropout": 1.5}, r"model_options.dropout: 1.5 is outside \[0, 1\)"),
    ("lstm", "wikitext2", {"nlayers": 0}, r"model_options.nlayers: must be a positive integer, got 0"),
    ("vgg16", "cifar10", {"batch_norm": "yes"}, r"model_options.batch_norm: must be true or false"),
    ("resnet34", "cifar10", {"depth": 50}, r"depth: unknown option for model 'resnet34'; allowed: none"),
])
def test_bad_model_options(model, dataset, options, match):
    with pytest.raises(ConfigError, match=match):
        make_cell(dataset, model, 4, model_options=options)


@pytest.mark.parametrize("model,parameters", [("mnist1d_mlp", 15_210), ("mnist1d_cnn", 5_210), ("mnist1d_gru", 5_134)])
def test_mnist1d_models_are_the_papers_sizes(model, parameters):
    """MLP 40-100-100-10; CNN of three 25-channel convolutions into 25 x 5 features; bidirectional GRU of 6
    units read out at all 40 steps (2 x 6 x 40 = 480 features)."""
    from critbatch.jobs.cell.plugins import DataShape

    net = resolve("model", model).plugin(DataShape("classification", (1, 40), 10), resolve("model", model).options())
    assert sum(p.numel() for p in net.parameters()) == parameters
    assert net(torch.randn(3, 1, 40)).shape == (3, 10)
