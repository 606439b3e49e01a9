"""``critbatch train``: train one cell and stream its logs to the object store.

The same entrypoint everywhere; the cell is a JSON file (a ``cell.json`` from
the store works too) or inline JSON (``critbatch cells GRID`` prints them):

    # one process on this machine, local directory store
    critbatch train --cell cell.json --store ./critbatch-out --data-root ~/.cache/critbatch/data

    # two data-parallel processes on one machine (gloo on the CPU, nccl on GPUs), S3 store
    AWS_ENDPOINT_URL=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=k AWS_SECRET_ACCESS_KEY=s \\
        torchrun --standalone --nproc-per-node=2 -m critbatch.jobs.cli train --cell cell.json \\
            --store s3://critbatch/runs

    # on a cluster: one Job (or PyTorchJob / TrainJob) per cell, each pod running the launcher, which runs
    # this command directly for one process and through torch.distributed.run for several (launch.py)
    critbatch render grid.yaml | kubectl apply -f -
    kubectl -n critbatch logs -f job/critbatch-<sweep>-<cell-id>

Exit codes (one table for every backend; jobs/cell/errors.py):

    0    done, diverged (a result, not a crash) or already finished (its ``_SUCCESS`` exists)
    1    a crash: a bug, with its traceback (the Job retries the pod, which resumes)
    2    bad input: the cell, the data, the options or the store settings (nothing written; the
         manifests' podFailurePolicy fails the Job at once, since retrying cannot help)
    4    --device cuda (what a GPU pod renders) and torch sees no CUDA device (permanent: an old driver)
    202  the store stayed unreachable past the retries (retryable: the next attempt resumes)
    130  interrupted (Ctrl-C)
    143  stopped by SIGTERM after a checkpoint (preemption: the next attempt resumes)

What is written, in order (rank 0 alone writes): ``cell.json`` (the cell,
its id, code version and derived figures), step and eval log parts, checkpoints,
``model.pt`` (final weights) and ``_SUCCESS`` last. ``--force`` wipes the
cell's prefix and trains it again. The batch arithmetic is printed at start
(plan.py); the trainer and its parts are described in trainer.py.
"""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path
from typing import Any

import torch

from critbatch.jobs.cell.errors import EXIT_PREEMPTED, ConfigError, DeviceMissing
from critbatch.jobs.cell.layout import cell_prefix, success_key
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.data.datasets import load_task_data, mix_seed
from critbatch.jobs.models.zoo import build_model
from critbatch.jobs.store import Store, open_store

from . import distributed
from .distributed import Dist, dist_from_env
from .launch import record_cause
from .trainer import Preempted, Trainer


@record_cause
def main(args: argparse.Namespace) -> int:
    """Validate the cell, the store and the data, then train; the exit code (see the module docstring)."""
    cell = read_cell(args.cell)
    dist = dist_from_env()
    problems = cell.problems(world_size=dist.world)
    if problems:
        raise ConfigError(problems)
    store = open_store(args.store)
    store.check()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        summary = train_cell(
            cell, store, data_root=args.data_root, device=args.device, flush_steps=args.flush_steps,
            flush_seconds=args.flush_seconds, checkpoint_seconds=args.checkpoint_seconds,
            checkpoint_steps=args.checkpoint_steps, download=args.download, force=args.force,
            progress=args.progress,
        )
    except Preempted as stop:
        if dist.is_main:
            print(f"critbatch train: cell {cell.id}: {stop}; exit {EXIT_PREEMPTED}", flush=True)
        return EXIT_PREEMPTED
    if dist.is_main:
        final = summary.get("final") or {}
        print(f"critbatch train: cell {cell.id} {summary['status']} after {summary['steps']} steps "
              f"(train loss {_fmt(final.get('train_loss'))}, test loss {_fmt(final.get('test_loss'))}, "
              f"test {final.get('metric')} {_fmt(final.get('test_metric'))}, "
              f"wall {summary['wall_time_s']:.1f} s)", flush=True)
    return 0


def read_cell(text: str) -> Cell:
    """The cell from inline JSON (starting with '{') or a JSON file (a cell.json from the store works too)."""
    if text.lstrip().startswith("{"):
        return Cell.from_json(text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"--cell: no such file {str(path)!r}; give a cell JSON file or inline JSON")
    return Cell.from_json(path.read_text())


def train_cell(cell: Cell, store: Store, *, data_root: str, device: str = "auto", flush_steps: int = 500,
               flush_seconds: float = 15.0, checkpoint_seconds: float = 300.0, checkpoint_steps: int = 0,
               download: bool = False, force: bool = False, progress: str = "auto") -> dict:
    """Train ``cell`` (resuming from its newest checkpoint) and return its ``_SUCCESS`` summary.

    Everything that can be wrong with the input (the cell for this world
    size, the data, the model options) raises ConfigError before anything is
    written. Raises :class:`Preempted` after a SIGTERM.
    """
    dist = dist_from_env()
    problems = cell.problems(world_size=dist.world)
    if problems:
        raise ConfigError(problems)
    if flush_steps < 1 or flush_seconds <= 0:
        raise ConfigError(f"--flush-steps/--flush-seconds: must be positive, got {flush_steps}, {flush_seconds}")
    if checkpoint_steps < 0 or checkpoint_seconds <= 0:
        raise ConfigError(f"--checkpoint-steps must be >= 0 and --checkpoint-seconds > 0, "
                          f"got {checkpoint_steps}, {checkpoint_seconds}")
    done_key = success_key(cell.sweep, cell.id)
    if not force and store.exists(done_key):
        summary = json.loads(store.get_text(done_key))
        if dist.is_main:
            print(f"critbatch train: cell {cell.id} already finished ({summary.get('status')}); "
                  f"{store.join(done_key)} exists, nothing to do (--force trains it again)", flush=True)
        return summary

    dev = pick_device(device, dist)  # before the data: a GPU pod without its GPU fails in seconds
    data = load_task_data(cell, data_root, download=download)
    if cell.batch_size > data.n_train:
        raise ConfigError(f"cell.batch_size: {cell.batch_size} is larger than the training set "
                          f"({data.n_train} examples)")
    # Same initial weights on every rank (DDP also broadcasts rank 0's at wrap time).
    torch.manual_seed(mix_seed("init", cell.seed))
    model = build_model(cell, data)

    distributed.init(dist, dev)
    previous_handler = None
    try:
        if force and dist.is_main:
            store.delete_prefix(cell_prefix(cell.sweep, cell.id) + "/")
        distributed.barrier(dist)
        trainer = Trainer(cell, store, data.to(dev), model, dev, dist, flush_steps=flush_steps,
                          flush_seconds=flush_seconds, checkpoint_seconds=checkpoint_seconds,
                          checkpoint_steps=checkpoint_steps, progress=progress)
        previous_handler = _install_sigterm(trainer)
        return trainer.run()
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        distributed.shutdown()


def pick_device(name: str, dist: Dist) -> torch.device:
    """``auto``: this rank's GPU (local rank modulo the GPUs seen) if there is one, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceMissing(f"--device cuda: torch {torch.__version__} sees no CUDA device (built for CUDA "
                            f"{torch.version.cuda}; an older driver, or a pod without its GPU); not training on the CPU")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        dev = torch.device("cuda", dist.local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def _install_sigterm(trainer: Trainer):
    """SIGTERM sets a flag; the loop checkpoints at the next sync point and raises Preempted."""
    def handler(signum, frame):  # noqa: ARG001 - signal API
        trainer.stop_requested = True

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a library caller); SIGTERM then keeps its default
        return None


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"
