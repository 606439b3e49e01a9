"""`critbatch train` end to end on tiny digits and linreg cells (CPU, real store, real data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.cell.errors import StoreUnavailable
from critbatch.jobs.store import LocalStore, open_store
from critbatch.jobs.cell.layout import cell_prefix
from critbatch.jobs.train.strategies import base_total_steps, eval_steps, lr_at, total_steps
from factories import cell_json, final_weights, read_rows, read_success, train


@pytest.mark.slow
def test_digits_cell_writes_the_log_contract(tmp_path, cpu_env, capsys):
    url = str(tmp_path / "store")
    assert train(cell_json(), url) == 0
    out = capsys.readouterr().out
    assert "global batch 64 = micro-batch 64 x accumulation 1 x world size 1" in out
    assert "22 steps/epoch" in out and "total steps 30" in out

    store, cell = open_store(url), Cell.from_json(cell_json())
    prefix = cell_prefix("t", cell.id)
    record = json.loads(store.get_text(f"{prefix}/cell.json"))
    assert record["id"] == cell.id and record["batch_size"] == 64
    assert record["derived"]["steps_per_epoch"] == 22 and record["derived"]["total_steps"] == 30
    assert Cell.from_json(store.get_text(f"{prefix}/cell.json")).id == cell.id  # round-trips

    steps = read_rows(store, prefix, "steps")
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert all(r["cell_id"] == cell.id for r in steps)
    assert [r["samples_seen"] for r in steps] == [64 * s for s in range(1, 31)]
    assert [r["lr"] for r in steps] == pytest.approx([lr_at(cell, s - 1, 22, {}) for s in range(1, 31)])
    assert steps[0]["lr"] == pytest.approx(0.05) and steps[-1]["lr"] == pytest.approx(0.1)  # warm-up to 0.05*2
    assert steps[21]["epoch"] == pytest.approx(1.0)
    walls = [r["wall_time_s"] for r in steps]
    assert walls == sorted(walls) and walls[0] > 0
    assert steps[-1]["train_loss"] < steps[0]["train_loss"] - 0.5  # it learns
    # Noise statistics on every 4th step only: half-batch (32) against the batch (64), same weights.
    measured = [r for r in steps if r["noise_g_big_sq"] is not None]
    assert [r["step"] for r in measured] == list(range(4, 31, 4))
    assert all(r["noise_b_small"] == 32 and r["noise_b_big"] == 64 for r in measured)
    assert all(r["noise_g_small_sq"] > 0 and r["noise_g_big_sq"] > 0 for r in measured)

    evals = read_rows(store, prefix, "evals")
    expected = eval_steps(cell, 30, base_total_steps(cell, 1437 // 32))
    assert sorted({r["step"] for r in evals}) == expected and expected[0] == 0 and expected[-1] == 30
    assert len(evals) == 2 * len(expected)
    assert {r["split"] for r in evals} == {"train", "test"} and {r["metric"] for r in evals} == {"accuracy"}
    last = {r["split"]: r for r in evals if r["step"] == 30}

    done = read_success(store, prefix)
    assert done["status"] == "done" and done["steps"] == 30 and done["samples_seen"] == 30 * 64
    assert done["final"]["train_loss"] == pytest.approx(last["train"]["loss"])
    assert done["final"]["test_metric"] == pytest.approx(last["test"]["value"]) and done["final"]["test_metric"] > 0.5
    assert done["final"]["lin_approx_error"] >= 0
    assert done["wall_time_s"] == pytest.approx(steps[-1]["wall_time_s"], rel=0.5)
    assert set(final_weights(store, prefix)) == {k for k, _ in _digits_model_keys()}


def _digits_model_keys():
    from critbatch.jobs.data.datasets import load_task_data
    from critbatch.jobs.models.zoo import build_model

    cell = Cell.from_json(cell_json())
    return build_model(cell, load_task_data(cell, ".")).state_dict().items()


@pytest.mark.parametrize("accumulation, batch_norm, mode, b_small", [(1, False, "split", 32), (2, False, "micro", 32),
                                                                     (1, True, "pair", 16)])
def test_noise_statistics_are_the_gradients_at_the_same_weights(tmp_path, cpu_env, accumulation, batch_norm, mode,
                                                                 b_small):
    """|G_b|^2 is the first b rows' gradient, |G_B|^2 the batch's (64), both before the update.

    split: the measured step runs as two halves (no BatchNorm); micro: the first of two micro-batches;
    pair (BatchNorm): two extra passes on the first two quarters (16 rows each, each normalised over its own
    16), |G_b|^2 their mean squared norm and |G_B|^2 (B = 32) the squared norm of their mean, so both
    gradients are of the same function; afterwards BatchNorm's running statistics are as if they never ran.
    """
    from torch import nn

    from critbatch.jobs.data.datasets import load_task_data
    from critbatch.jobs.train.distributed import Dist
    from critbatch.jobs.models.zoo import build_model, loss_fn
    from critbatch.jobs.train.trainer import Trainer

    cell = Cell.from_json(cell_json(accumulation=accumulation))
    data = load_task_data(cell, ".")

    def make() -> nn.Module:
        torch.manual_seed(0)
        if batch_norm:
            return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * 64, 10))
        return build_model(cell, data)

    model, reference, once = make(), make(), make()
    trainer = Trainer(cell, LocalStore(tmp_path / "store"), data, model, torch.device("cpu"), Dist(),
                      flush_steps=10, flush_seconds=1.0, checkpoint_seconds=60.0, checkpoint_steps=0,
                      progress="none")
    assert trainer.noise.mode == mode
    x, y = next(data.train_batches(0, 64, seed=0))
    criterion = loss_fn("classification")

    def grad_sq(rows: slice) -> float:
        reference.zero_grad()
        criterion(reference(x[rows]), y[rows]).backward()
        return float(sum(p.grad.double().pow(2).sum() for p in reference.parameters()))

    def grads(rows: slice) -> list:
        reference.zero_grad()
        criterion(reference(x[rows]), y[rows]).backward()
        return [p.grad.double().clone() for p in reference.parameters()]

    if batch_norm:
        g1, g2 = grads(slice(0, 16)), grads(slice(16, 32))
        small = float(sum(a.pow(2).sum() + c.pow(2).sum() for a, c in zip(g1, g2))) / 2
        big = float(sum(((a + c) / 2).pow(2).sum() for a, c in zip(g1, g2)))
        b_big = 32
    else:
        small, big, b_big = grad_sq(slice(0, b_small)), grad_sq(slice(0, 64)), 64
    loss, noise = trainer._update(x, y, 0.1, measure=True)
    assert noise[:2] == (b_small, b_big)
    assert float(noise[2]) == pytest.approx(small, rel=1e-5)
    assert float(noise[3]) == pytest.approx(big, rel=1e-5)
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(criterion(once(x), y)), rel=1e-5)  # the batch's mean loss
    if batch_norm:  # one full-batch forward's worth of running statistics, not two
        assert torch.equal(model[1].running_mean, once[1].running_mean)
        assert int(model[1].num_batches_tracked) == 1


@pytest.mark.slow
def test_accumulation_gives_the_full_batch_update(tmp_path, cpu_env):
    """Two micro-batches of 32 with the loss scaled by 1/2 make the same steps as one batch of 64."""
    url = str(tmp_path / "store")
    plain, accum = cell_json(max_steps=12), cell_json(max_steps=12, accumulation=2)
    assert train(plain, url) == 0 and train(accum, url) == 0
    store = open_store(url)
    rows = {name: read_rows(store, cell_prefix("t", Cell.from_json(c).id), "steps")
            for name, c in (("plain", plain), ("accum", accum))}
    assert [r["train_loss"] for r in rows["accum"]] == pytest.approx([r["train_loss"] for r in rows["plain"]],
                                                                    rel=1e-5)
    # With accumulation the noise is measured on micro-batches (b = 32) against the step (B = 64).
    measured = [r for r in rows["accum"] if r["noise_b_small"] is not None]
    assert [r["step"] for r in measured] == [4, 8, 12]
    assert all(r["noise_b_small"] == 32 and r["noise_b_big"] == 64 for r in measured)


def test_diverging_cell_ends_cleanly(tmp_path, cpu_env):
    """linreg with a step far above 2 / lambda_1 blows up: status diverged, exit 0, no final weights."""
    cell = json.dumps({
        "dataset": {"name": "linreg", "options": {"n": 64, "d": 128}}, "model": "linear", "strategy": "blr",
        "batch_size": 16, "base_lr": 50.0, "base_batch": 16, "epochs": 100, "sweep": "t", "max_steps": 400,
        "eval": {"points": 5}, "noise": {"every": 0},
    })
    url = str(tmp_path / "store")
    assert train(cell, url) == 0
    store = open_store(url)
    prefix = cell_prefix("t", Cell.from_json(cell).id)
    done = read_success(store, prefix)
    assert done["status"] == "diverged" and "non-finite" in done["reason"]
    steps = read_rows(store, prefix, "steps")
    assert [r["step"] for r in steps] == list(range(1, done["steps"] + 1)) and done["steps"] < 400
    losses = [r["train_loss"] for r in steps]
    assert all(v == v and abs(v) != float("inf") for v in losses[:-1])  # finite up to the last one
    assert not (losses[-1] == losses[-1] and abs(losses[-1]) != float("inf"))
    assert done["final"]["lin_approx_error"] is None
    assert not store.exists(f"{prefix}/model.pt")


def _no_aws(monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.parametrize(
    "over, env, store_url, extra, message",
    [
        ({"dataset": {"name": "imagenet"}}, {}, None, [], r"cell\.dataset\.name: unknown dataset 'imagenet'"),
        ({"model": "resnet1000"}, {}, None, [], r"cell\.model: unknown model 'resnet1000'; allowed: "),
        ({"batch_size": 63}, {"WORLD_SIZE": "2", "RANK": "0"}, None, [],
         r"cell\.batch_size: 63 is not divisible by world size 2"),
        ({"accumulation": 5}, {}, None, [], r"cell\.batch_size: 64 is not divisible by world size 1 x accumulation 5"),
        ({"dataset": {"name": "digits", "fraction": 1.5}}, {}, None, [], r"cell\.dataset\.fraction: 1\.5 is outside"),
        ({"dataset": {"name": "digits", "fraction": 0.0}}, {}, None, [], r"cell\.dataset\.fraction: 0\.0 is outside"),
        ({"batch_size": 2048}, {}, None, [], r"cell\.batch_size: 2048 is larger than the training set"),
        ({"dataset": {"name": "cifar10"}, "model": "resnet34", "strategy": "blr"}, {}, None,
         ["--data-root", "/nonexistent/data"],
         r"dataset 'cifar10' not found: looked for .* under /nonexistent/data.*critbatch data stage cifar10"),
        ({"strategy": "fastest"}, {}, None, [], r"cell\.strategy: unknown strategy 'fastest'; allowed: blr"),
        ({}, {}, "s3://critbatch-test/runs", [], r"no S3 credentials"),
        ({}, {}, "ftp://host/x", [], r"unsupported scheme"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, cpu_env, monkeypatch, capsys, over, env, store_url,
                                              extra, message):
    import re

    _no_aws(monkeypatch, tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    url = store_url or str(tmp_path / "store")
    assert train(cell_json(**over), url, *extra) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "store").exists()


def test_bad_cell_text_exits_2(tmp_path, cpu_env, capsys):
    assert train("{not json", str(tmp_path / "store")) == 2
    assert "cell: not valid JSON" in capsys.readouterr().err
    assert train(str(tmp_path / "missing.json"), str(tmp_path / "store")) == 2
    assert "--cell: no such file" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_finished_cell_is_not_trained_again(tmp_path, cpu_env, capsys):
    url = str(tmp_path / "store")
    store = open_store(url)
    cell = Cell.from_json(cell_json(max_steps=6))
    prefix = cell_prefix("t", cell.id)
    store.put_text(f"{prefix}/cell.json", cell.to_json())  # a finished cell has its record beside _SUCCESS
    store.put_text(f"{prefix}/_SUCCESS", json.dumps({"status": "done", "steps": 6, "wall_time_s": 1.0}))
    assert train(cell_json(max_steps=6), url) == 0
    assert "already finished" in capsys.readouterr().out
    assert store.list(prefix + "/") == [f"{prefix}/_SUCCESS", f"{prefix}/cell.json"]  # nothing else was written
    # --force wipes the prefix and trains it for real.
    assert train(cell_json(max_steps=6), url, "--force") == 0
    assert read_success(store, prefix)["status"] == "done"
    assert [r["step"] for r in read_rows(store, prefix, "steps")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_cell_file_and_s3_store(tmp_path, cpu_env, s3_url):
    """The same contract on the S3 server; the cell read from a file, as a manifest mounts it."""
    path = Path(tmp_path / "cell.json")
    path.write_text(cell_json(max_steps=10))
    assert train(str(path), s3_url, "--flush-steps", "3") == 0
    store = open_store(s3_url)
    prefix = cell_prefix("t", Cell.from_json(path.read_text()).id)
    assert store.exists(f"{prefix}/cell.json") and store.exists(f"{prefix}/model.pt")
    parts = store.list(f"{prefix}/steps/")
    assert len(parts) >= 2  # flushed every 3 steps
    assert [r["step"] for r in read_rows(store, prefix, "steps")] == list(range(1, 11))
    assert read_success(store, prefix)["status"] == "done"


def test_linreg_oracle_cell(tmp_path, cpu_env):
    """The oracle step comes from the data's beta and lambda_1 (in cell.json) and drives the loss down."""
    cell = json.dumps({
        "dataset": {"name": "linreg", "options": {"n": 128, "d": 256}}, "model": "linear", "strategy": "oracle",
        "batch_size": 8, "base_lr": 1.0, "base_batch": 1, "epochs": 3, "sweep": "t",
        "optimizer": {"momentum": 0.0, "weight_decay": 0.0}, "eval": {"points": 6}, "noise": {"every": 5},
    })
    url = str(tmp_path / "store")
    assert train(cell, url) == 0
    store = open_store(url)
    prefix = cell_prefix("t", Cell.from_json(cell).id)
    derived = json.loads(store.get_text(f"{prefix}/cell.json"))["derived"]
    eta = 8 / (derived["beta"] + 7 * derived["lambda_1"])
    steps = read_rows(store, prefix, "steps")
    assert [r["lr"] for r in steps] == pytest.approx([eta] * len(steps), rel=1e-12)
    assert len(steps) == total_steps(Cell.from_json(cell), 128 // 8) == 48
    evals = [r for r in read_rows(store, prefix, "evals") if r["split"] == "train"]
    assert evals[-1]["loss"] < 0.5 * evals[0]["loss"]
    assert {r["metric"] for r in evals} == {"none"}



@pytest.mark.parametrize(
    "dataset, options, model, batch, metric, noise_sizes",
    [
        ("wikitext2", {}, "lstm", 8, "perplexity", (4, 8)),  # (N, 35) tokens, clipping 0.25; noise on halves
        # (N, 19, H, W) logits, 255 = ignore; BatchNorm: noise on two quarter passes (here halves of 2)
        pytest.param("cityscapes", {"size": [64, 128]}, "drn_d_22", 2, "miou", (1, 2), marks=pytest.mark.slow),
        # BatchNorm: two quarter passes, b = 2 vs B = 4 (MobileNetV2 at a quarter width: the image classifiers'
        # loop in seconds; ResNet-34's forward alone takes most of a second a batch here)
        ("cifar10", {}, "mobilenetv2", 8, "accuracy", (2, 4)),
    ],
    ids=["wikitext2-lstm", "cityscapes-drn", "cifar10-mobilenetv2"],
)
def test_every_task_runs_through_the_loop(tmp_path, cpu_env, dataset, options, model, batch, metric, noise_sizes):
    """A few steps of each task on tiny files in the dataset's real format: logs, evaluations, metric, _SUCCESS."""
    from datafiles import write_dataset

    root = tmp_path / "data" / dataset
    write_dataset(dataset, root)
    cell = json.dumps({
        "dataset": {"name": dataset, "options": options}, "model": model, "strategy": "blr", "batch_size": batch, "base_lr": 0.01,
        "base_batch": batch, "epochs": 1, "max_steps": 3, "sweep": "t", "eval": {"points": 2, "train_subset": 8},
        "noise": {"every": 2}, "clip_grad": 0.25 if model == "lstm" else None,
        **({"model_options": {"width_mult": 0.25}} if model == "mobilenetv2" else {}),
    })
    url = str(tmp_path / "store")
    assert train(cell, url, "--data-root", str(tmp_path / "data")) == 0
    store = open_store(url)
    prefix = cell_prefix("t", Cell.from_json(cell).id)
    steps = read_rows(store, prefix, "steps")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[1]["noise_g_small_sq"] > 0
    assert (steps[1]["noise_b_small"], steps[1]["noise_b_big"]) == noise_sizes
    evals = read_rows(store, prefix, "evals")
    assert {r["metric"] for r in evals} == {metric} and {r["step"] for r in evals} == {0, 1, 3}
    assert all(r["loss"] > 0 and r["value"] == r["value"] for r in evals)  # finite, not NaN
    done = read_success(store, prefix)
    assert done["status"] == "done" and done["final"]["metric"] == metric


class FlakyStore(LocalStore):
    """A local store whose first ``failures`` writes find the store unavailable."""

    def __init__(self, root, failures: float):
        super().__init__(root)
        self.failures, self.attempts = failures, []

    def put_bytes(self, key: str, data: bytes) -> None:
        self.attempts.append(key)
        if len(self.attempts) <= self.failures:
            raise StoreUnavailable(f"cannot put {key}: connection refused")
        super().put_bytes(key, data)


@pytest.mark.parametrize("failures, patience_s, written", [(2, 60.0, True), (float("inf"), 1.5, False)])
def test_final_writes_wait_out_an_outage_then_end_in_store_unavailable(tmp_path, failures, patience_s, written):
    """model.pt then _SUCCESS, each retried through the outage; past the patience StoreUnavailable (exit 202)."""
    from critbatch.jobs.train.finish import write_results

    cell = Cell.from_json(cell_json())
    prefix = cell_prefix("t", cell.id)
    store = FlakyStore(tmp_path / "store", failures)
    summary = {"status": "done", "steps": 30}
    weights = {"w": torch.arange(3.0)}
    if written:
        write_results(store, cell, summary, logs=None, weights=weights, patience_s=patience_s)
        assert store.attempts == [f"{prefix}/model.pt"] * 3 + [f"{prefix}/_SUCCESS"]  # _SUCCESS last
        assert read_success(store, prefix) == summary and torch.equal(final_weights(store, prefix)["w"], weights["w"])
    else:
        with pytest.raises(StoreUnavailable, match=r"cannot write .*/model\.pt: the store is still unavailable after"):
            write_results(store, cell, summary, logs=None, weights=weights, patience_s=patience_s)
        assert not store.exists(f"{prefix}/_SUCCESS") and not store.exists(f"{prefix}/model.pt")
