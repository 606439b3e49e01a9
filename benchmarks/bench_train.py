"""Train-loop overhead: steps per second of `critbatch train`'s loop against a bare PyTorch loop.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_train.py                 # both workloads, CPU
    .venv/bin/python benchmarks/bench_train.py --only digits --repeats 5
    .venv/bin/python benchmarks/bench_train.py --device cuda                     # where a GPU exists

Workloads: the digits CNN at batch 64 on the built-in digits set, and the
CIFAR-format ResNet-34 of critbatch.jobs.models at batch 128 on synthetic
CIFAR-shaped data (uint8 32x32x3, crop-and-flip augmentation, as CIFAR-10 is
loaded). Both loops use the same model initialisation, the same data resident
on the device and the same batches (``TaskData.train_batches``), so the ratio
is the cost of everything the trainer adds: the LR schedule, logging every
step to a LogStream on a local store, divergence checks, checkpoint timers,
and (when on) the gradient-noise measurements.

Timing: the bare loop with perf_counter between step ``warm`` and the last
step (after a device synchronise); the trainer from its own step log
(``wall_time_s``, which excludes evaluations and checkpoints) between the same
steps. Each side runs ``--repeats`` times, alternating, and the best run counts
(the machine may be shared). Goal: trainer >= 0.97 x bare.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from critbatch.jobs.config import Cell
from critbatch.jobs.data import TaskData, load_task_data
from critbatch.jobs.distributed import Dist
from critbatch.jobs.logschema import ipc_to_table
from critbatch.jobs.models import build_model, loss_fn
from critbatch.jobs.store import LocalStore, cell_prefix
from critbatch.jobs.train import Trainer


def synthetic_cifar(n: int, seed: int = 0) -> TaskData:
    """CIFAR-10-shaped data held as CIFAR is: uint8 images, per-channel mean/std, crop and flip."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=gen)
    mean = x.float().mean((0, 2, 3))
    std = x.float().std((0, 2, 3))
    return TaskData(name="cifar10", task="classification", n_train=n, num_classes=10, vocab_size=None,
                    info={"synthetic": True}, train_x=x, train_y=y, test_x=x[:256], test_y=y[:256],
                    eval_train_subset=256, augment="crop_flip", mean=mean, std=std)


def workloads(steps_digits: int, steps_resnet: int) -> dict[str, dict]:
    common = {"strategy": "blr", "base_lr": 0.01, "epochs": 1000, "eval": {"points": 2, "train_subset": 256},
              "sweep": "bench"}
    return {
        "digits": {"cell": {**common, "dataset": {"name": "digits"}, "model": "digits_cnn", "batch_size": 64,
                            "base_batch": 64, "max_steps": steps_digits}, "warm": 20},
        "resnet34": {"cell": {**common, "dataset": {"name": "cifar10"}, "model": "resnet34", "batch_size": 128,
                              "base_batch": 128, "max_steps": steps_resnet}, "warm": 2},
    }


def task_data(cell: Cell) -> TaskData:
    if cell.dataset.name == "digits":
        return load_task_data(cell, ".")
    return synthetic_cifar(cell.batch_size * 20)


def fresh_model(cell: Cell, data: TaskData) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(cell, data)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(cell: Cell, data: TaskData, device: torch.device, warm: int) -> float:
    """The 20-line loop: forward, loss, backward, SGD step. Steps per second after ``warm`` steps."""
    model = fresh_model(cell, data).to(device)
    if device.type == "cuda" and data.train_x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cell.base_lr, momentum=cell.optimizer.momentum,
                          weight_decay=cell.optimizer.weight_decay)
    criterion = loss_fn(data.task)
    model.train()
    step, epoch, total = 0, 0, cell.max_steps
    while step < total:
        for x, y in data.train_batches(epoch, cell.batch_size, seed=cell.seed):
            loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == warm:
                sync(device)
                t0 = time.perf_counter()
            if step == total:
                break
        epoch += 1
    sync(device)
    return (total - warm) / (time.perf_counter() - t0)


def trainer_loop(cell: Cell, data: TaskData, device: torch.device, warm: int) -> float:
    """`critbatch train`'s Trainer.run() with logging to a local store; steps/s from its step log."""
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "store")
        trainer = Trainer(cell, store, data, fresh_model(cell, data), device, Dist(), flush_steps=500,
                          flush_seconds=15.0, checkpoint_seconds=300.0, checkpoint_steps=0, progress="none")
        trainer.run()
        prefix = cell_prefix(cell.sweep, cell.id)
        rows = []
        for key in store.list(f"{prefix}/steps/"):
            rows.extend(ipc_to_table(store.get_bytes(key)).to_pylist())
        wall = {r["step"]: r["wall_time_s"] for r in rows}
        return (cell.max_steps - warm) / (wall[cell.max_steps] - wall[warm])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["digits", "resnet34"], action="append", help="run only these workloads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps-digits", type=int, default=400)
    parser.add_argument("--steps-resnet", type=int, default=10)
    parser.add_argument("--noise-every", type=int, default=10, help="noise statistics in the 'noise on' runs")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    import io
    import contextlib

    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(f"{'workload':<10} {'batch':>5} {'steps':>5} {'bare steps/s':>13} {'critbatch (noise off)':>22} "
          f"{'ratio':>6} {'critbatch (noise on)':>21} {'ratio':>6}")
    for name, spec in workloads(args.steps_digits, args.steps_resnet).items():
        if args.only and name not in args.only:
            continue
        base = Cell.from_dict({**spec["cell"], "noise": {"every": 0}})
        noisy = Cell.from_dict({**spec["cell"], "noise": {"every": args.noise_every}})
        data = task_data(base).to(device)
        best = {"bare": 0.0, "off": 0.0, "on": 0.0}
        for _ in range(args.repeats):
            best["bare"] = max(best["bare"], bare_loop(base, data, device, spec["warm"]))
            with contextlib.redirect_stdout(io.StringIO()):  # the trainer's start-up banner
                best["off"] = max(best["off"], trainer_loop(base, data, device, spec["warm"]))
                best["on"] = max(best["on"], trainer_loop(noisy, data, device, spec["warm"]))
        row = {"workload": name, "batch": base.batch_size, "steps": base.max_steps, "bare": best["bare"],
               "noise_off": best["off"], "ratio_off": best["off"] / best["bare"], "noise_on": best["on"],
               "ratio_on": best["on"] / best["bare"], "noise_every": args.noise_every}
        results.append(row)
        print(f"{name:<10} {row['batch']:>5} {row['steps']:>5} {row['bare']:>13.2f} {row['noise_off']:>22.2f} "
              f"{row['ratio_off']:>6.3f} {row['noise_on']:>21.2f} {row['ratio_on']:>6.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
