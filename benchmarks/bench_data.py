"""Data path: the in-memory batched pipeline against torchvision's DataLoader with per-sample transforms.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_data.py            # 50k CIFAR-format images, batch 128
    .venv/bin/python benchmarks/bench_data.py --n 10000 --batch 512

Both sides read the same synthetic CIFAR-10 written in its real pickle format
and produce the same thing: normalised float batches after a random crop with
padding 4 and a horizontal flip. The DataLoader applies RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor and Normalize to each sample in ``--workers``
worker processes; the in-memory pipeline (critbatch.jobs.data.datasets) does it on whole
batches of one uint8 tensor. Samples per second are measured over one epoch
after a few warm-up batches. Goal: >= 5x.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from datafiles import write_cifar10  # noqa: E402

from critbatch.jobs.cell.spec import Cell  # noqa: E402
from critbatch.jobs.data.datasets import _torchvision_datasets, load_task_data  # noqa: E402

WARMUP = 5  # batches before the clock starts (worker start-up, first allocations)


def rate(batches, batch_size: int) -> tuple[float, int]:
    """Samples per second over ``batches`` after the warm-up batches."""
    it = iter(batches)
    for _ in range(WARMUP):
        next(it)
    seen = 0
    start = time.perf_counter()
    for x, _y in it:
        seen += len(x)
    return seen / (time.perf_counter() - start), seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50000, help="training images (split into five batch files)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the in-memory pipeline")
    parser.add_argument("--device", default="cpu", help="device of the in-memory pipeline (cuda where present)")
    args = parser.parse_args()

    from torch.utils.data import DataLoader
    from torchvision import transforms as T

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cifar10"
        t0 = time.perf_counter()
        write_cifar10(root, per_batch=args.n // 5, n_test=1000)
        print(f"wrote {args.n} CIFAR-format images in {time.perf_counter() - t0:.1f} s")

        cell = Cell.from_dict({"dataset": {"name": "cifar10"}, "model": "resnet34", "strategy": "blr",
                               "batch_size": args.batch, "base_lr": 0.1, "base_batch": args.batch, "epochs": 1})
        t0 = time.perf_counter()
        data = load_task_data(cell, tmp).to(args.device)
        load_s = time.perf_counter() - t0
        sync = torch.cuda.synchronize if data.device.type == "cuda" else (lambda: None)

        def ours():
            for x, y in data.train_batches(0, args.batch, seed=0):
                yield x, y
            sync()

        ours_rate, ours_n = rate(ours(), args.batch)

        tfm = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                         T.Normalize(data.info["mean"], data.info["std"])])
        dataset = _torchvision_datasets()["cifar10"](tmp + "/cifar10", train=True, transform=tfm)
        loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True)
        dl_rate, dl_n = rate(loader, args.batch)

    print(f"in-memory batched ({args.device}, {args.threads} threads): {ours_rate:12,.0f} samples/s "
          f"({ours_n} samples; one-off load {load_s:.1f} s)")
    print(f"DataLoader, per-sample transforms ({args.workers} workers): {dl_rate:12,.0f} samples/s ({dl_n} samples)")
    print(f"speed-up: {ours_rate / dl_rate:.1f}x (goal >= 5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
