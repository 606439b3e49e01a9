"""Measuring the gradient noise does not change what is measured beyond round-off.

The MNIST-1D CNN (no BatchNorm, no dropout) takes the free ``split`` probe: a measured step's gradient is the
mean of two half-batch gradients instead of one full-batch gradient, the same number up to the order of the sum.
Training is chaotic, so over thousands of steps round-off grows into a visibly different trajectory (the same
happens with two threads instead of one); what must hold is that each measured step equals the plain one to
float precision, and that the probe consumes no random numbers and leaves the model as it was.
"""

from __future__ import annotations

import torch

from critbatch.jobs.cell.layout import cell_prefix
from critbatch.jobs.cell.logschema import ipc_to_table
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.cli import main as cli_main
from critbatch.jobs.data.datasets import load_task_data
from critbatch.jobs.models.zoo import build_model, loss_fn
from critbatch.jobs.store import LocalStore
from critbatch.jobs.train.distributed import Dist
from critbatch.jobs.train.noise import Halves

CNN = {
    "dataset": {"name": "mnist1d", "options": {"num_samples": 600}}, "model": "mnist1d_cnn", "strategy": "blr",
    "batch_size": 64, "base_lr": 0.03, "base_batch": 32, "epochs": 8, "sweep": "probe",
    "optimizer": {"name": "sgd", "momentum": 0.9, "weight_decay": 5.0e-4},
    "eval": {"points": 4, "train_subset": 256}, "max_steps": 30,
}


def _losses(tmp_path, every: int) -> list[float]:
    cell = Cell.model_validate({**CNN, "noise": {"every": every}})
    store = LocalStore(tmp_path / f"every{every}")
    assert cli_main(["train", "--cell", cell.model_dump_json(), "--store", str(store.root), "--progress", "none",
                     "--threads", "1", "--data-root", str(tmp_path / "data")]) == 0
    prefix = cell_prefix(cell.sweep, cell.id)
    rows = []
    for key in store.list(f"{prefix}/steps/"):
        rows.extend(ipc_to_table(store.get_bytes(key)).to_pylist())
    return [r["train_loss"] for r in sorted(rows, key=lambda r: r["step"])]


def test_a_measured_step_is_the_plain_step_to_float_precision(tmp_path):
    torch.manual_seed(0)
    cell = Cell.model_validate({**CNN, "noise": {"every": 1}})
    data = load_task_data(cell, str(tmp_path / "data"))
    model = build_model(cell, data)
    x, y = next(iter(data.train_batches(0, 64, seed=0)))
    params = [p for p in model.parameters() if p.requires_grad]
    loss_of = loss_fn(data.task)

    def backward(x, y, parts, *, reduce=True, after_first=None):
        total = 0.0
        for i, (xs, ys) in enumerate(zip(x.chunk(parts), y.chunk(parts))):
            loss = loss_of(model(xs), ys)
            (loss / parts).backward()
            total += loss.detach() / parts
            if i == 0 and after_first:
                after_first()
        return total

    backward(x, y, 1)
    plain = [p.grad.clone() for p in params]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.zero_grad()
    loss, sample = Halves(32, 64, 1, params, Dist()).measure(backward, x, y)
    probed = [p.grad for p in params]
    num = sum(float((a - b).double().pow(2).sum()) for a, b in zip(plain, probed)) ** 0.5
    den = sum(float(a.double().pow(2).sum()) for a in plain) ** 0.5
    assert num / den < 1e-6  # float32 round-off, not a different gradient
    assert num > 0 or den > 0
    assert torch.equal(torch.get_rng_state(), rng)  # no random number drawn
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert float(sample.g_small_sq) > float(sample.g_big_sq) > 0  # a half batch's gradient is noisier


def test_probe_on_and_off_train_the_same_trajectory_up_to_round_off(tmp_path):
    off, on = _losses(tmp_path, 0), _losses(tmp_path, 1)  # on: every step is measured (split)
    assert len(off) == len(on) == 30
    assert off[0] == on[0]  # the first step's loss is before any measured update
    worst = max(abs(a - b) / abs(a) for a, b in zip(off, on))
    assert worst < 1e-4, worst  # 30 steps of round-off; a different gradient would move the loss by percents
