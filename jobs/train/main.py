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

    # backend indexed: a pod of a resource class's Indexed Job trains the class's cell at its
    # JOB_COMPLETION_INDEX, read from <store>/<sweep>/sweep.yaml
    critbatch train --cell-from-sweep SWEEP --resource-class 1gpu --sweep-digest D --store s3://critbatch/runs

Exit codes: one table for every backend, critbatch.jobs.cell.errors.ExitCode;
``critbatch train --help`` prints the trainer's from it, and the README's
"Exit codes" says what each backend does with them.

What is written, in order (rank 0 alone writes): ``cell.json`` (the cell,
its id, code version and derived figures), step and eval log parts, checkpoints,
``model.pt`` (final weights) and ``_SUCCESS`` last. ``--force`` wipes the
cell's prefix and trains it again. The batch arithmetic is printed at start
(plan.py); the trainer and its parts are described in trainer.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..cell.errors import BasePending, ConfigError, DeviceMissing, ExitCode, LeaseHeld
from ..cell.inputs import decode, read_text, shown
from ..cell.layout import CHECKPOINT_COMPLETE, cell_prefix, checkpoint_dir, success_key, sweep_problem
from ..cell.spec import Cell, branch_start
from ..cell.sweepfile import cell_in_class
from ..data.datasets import load_task_data, mix_seed
from ..models.zoo import build_model
from ..store import Store, open_store
from ..store.cellstate import DAMAGED, cell_state
from . import distributed
from .distributed import Dist, all_gather_object, dist_from_env
from .finish import DamagedLogs
from .guard import CellGuard, default_lease_seconds
from .launch import record_cause
from .parent import arm_from_env
from .plan import Plan
from .trainer import Paused, Preempted, Trainer, write_cell_record


#: Seconds between two looks at the store while a branch waits for its base's checkpoint.
BASE_POLL_S = 5.0
#: Seconds a branch waits for its base's checkpoint unless told (--base-wait, env CRITBATCH_BASE_WAIT).
BASE_WAIT_S = 600.0


def default_base_wait() -> float:
    """``CRITBATCH_BASE_WAIT`` when set (seconds), else BASE_WAIT_S."""
    text = os.environ.get("CRITBATCH_BASE_WAIT", "")
    if not text:
        return BASE_WAIT_S
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"CRITBATCH_BASE_WAIT: {shown(text)} is not a number of seconds") from None


@record_cause
def main(args: argparse.Namespace) -> int:
    """Validate the cell, the store and the data, then train; the exit code (see the module docstring)."""
    arm_from_env()  # under `critbatch run`: die with the executor (or with torchrun, which dies with it)
    store = open_store(args.store)
    stray = [f"--{name.replace('_', '-')}" for name in ("resource_class", "sweep_digest", "index")
             if getattr(args, name) is not None]
    if stray and not args.cell_from_sweep:
        raise ConfigError(f"{', '.join(stray)}: only with --cell-from-sweep (an Indexed Job's pod), not with --cell")
    if args.cell_from_sweep:
        cell = cell_from_sweep(store, args.cell_from_sweep, args.resource_class, args.sweep_digest, args.index)
    else:
        cell = read_cell(args.cell)
    dist = dist_from_env()
    problems = cell.problems(world_size=dist.world)
    if problems:
        raise ConfigError(problems)
    store.check()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        summary = train_cell(
            cell, store, data_root=args.data_root, device=args.device, flush_steps=args.flush_steps,
            flush_seconds=args.flush_seconds, checkpoint_seconds=args.checkpoint_seconds,
            checkpoint_steps=args.checkpoint_steps, download=args.download, force=args.force,
            progress=args.progress, lease_seconds=args.lease_seconds, pause_at=args.pause_at,
            base_wait=args.base_wait if args.base_wait is not None else default_base_wait(),
        )
    except Paused as paused:
        if dist.is_main:
            print(f"critbatch train: cell {cell.id}: {paused} (--pause-at); no _SUCCESS yet, exit 0", flush=True)
        return 0
    except Preempted as stop:
        if dist.is_main:
            print(f"critbatch train: cell {cell.id}: {stop}; exit {ExitCode.PREEMPTED}", flush=True)
        return ExitCode.PREEMPTED
    except LeaseHeld as held:
        print(f"critbatch train: {held}; the cell is left to it, exit {ExitCode.LEASE_HELD}", flush=True)
        return ExitCode.LEASE_HELD
    except BasePending as pending:
        print(f"critbatch train: cell {cell.id}: {pending}; nothing written, exit {ExitCode.BASE_PENDING} "
              "(a retry waits again)", flush=True)
        return ExitCode.BASE_PENDING
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
        return Cell.from_json(text, "--cell")
    if not text.strip() or "\0" in text:
        raise ConfigError(f"--cell: {shown(text)} is neither a cell JSON file nor inline JSON starting with '{{'")
    return Cell.from_json(read_text(Path(text).expanduser(), "--cell"), "--cell")


def cell_from_sweep(store: Store, sweep: str, resource_class: str | None, digest: str | None,
                    index: int | None) -> Cell:
    """An Indexed Job pod's cell (backend indexed): the one at its JOB_COMPLETION_INDEX (or ``index``) among the
    cells of ``resource_class`` in ``<store>/<sweep>/sweep.yaml``, whose digest must be ``digest``."""
    problem = sweep_problem(sweep)
    if problem:
        raise ConfigError(f"--cell-from-sweep: {problem}")
    if not resource_class or not digest:
        raise ConfigError("--cell-from-sweep: needs --resource-class and --sweep-digest (an Indexed Job's "
                          "command line has both)")
    if index is None:
        text = os.environ.get("JOB_COMPLETION_INDEX", "")
        if not text.isdigit():
            raise ConfigError(f"--index: not given, and JOB_COMPLETION_INDEX is {text!r}, not an index "
                              "(an Indexed Job sets it)")
        index = int(text)
    key = f"{sweep}/sweep.yaml"
    if not store.exists(key):
        raise ConfigError(f"--cell-from-sweep: no sweep.yaml at {store.join(key)}; `critbatch submit` writes it "
                          "before the Jobs (with kubectl apply, upload `critbatch cells GRID --sweep-yaml` there)")
    entry = cell_in_class(decode(store.get_bytes(key), store.join(key)), store.join(key), resource_class, index,
                          digest)
    cell = Cell.from_dict(entry["cell"], path=f"{key} cell {entry['id']}")
    if cell.id != entry["id"]:
        raise ConfigError(f"--cell-from-sweep: {store.join(key)} lists cell {entry['id']}, whose fields hash to "
                          f"{cell.id}: it was written by another critbatch version; submit the grid again")
    return cell


def train_cell(cell: Cell, store: Store, *, data_root: str, device: str = "auto", flush_steps: int = 500,
               flush_seconds: float = 15.0, checkpoint_seconds: float = 300.0, checkpoint_steps: int = 0,
               download: bool = False, force: bool = False, progress: str = "auto",
               lease_seconds: float | None = None, pause_at: int | None = None,
               base_wait: float = BASE_WAIT_S) -> dict:
    """Train ``cell`` (resuming from its newest checkpoint) and return its ``_SUCCESS`` summary.

    Everything that can be wrong with the input (the cell for this world
    size, the data, the model options) raises ConfigError before anything is
    written. Raises :class:`Preempted` after a SIGTERM, LeaseHeld when another
    trainer holds the cell's lease (taken by rank 0 before the data is loaded,
    renewed every ``lease_seconds / 3``), :class:`Paused` at step ``pause_at`` (checkpointed, no ``_SUCCESS``),
    BasePending when the cell is a branch whose base's kept checkpoint is not in the store within ``base_wait``
    seconds (nothing written).
    A cell whose ``_SUCCESS`` is unreadable
    or whose parts are damaged is not finished: it is trained again (guard.py).
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
    if pause_at is not None and pause_at < 1:
        raise ConfigError(f"--pause-at: must be a step >= 1, got {pause_at}")
    if lease_seconds is not None and not lease_seconds > 0:
        raise ConfigError(f"--lease-seconds: must be positive, got {lease_seconds}")
    if not base_wait >= 0:
        raise ConfigError(f"--base-wait: must be 0 or more seconds, got {base_wait}")
    if not force:
        state = cell_state(store, cell.sweep, cell.id)
        if state.finished:
            return _already_finished(cell, store, state.summary, dist)

    dev = pick_device(device, dist)  # before the data: a GPU pod without its GPU fails in seconds
    if cell.sync_bn and dist.active and dev.type != "cuda":
        raise ConfigError("cell.sync_bn: torch's SyncBatchNorm runs on GPUs only, and this cell's ranks train on "
                          f"{dev.type}")
    data = load_task_data(cell, data_root, download=download, rank=dist.rank, world=dist.world)
    if cell.batch_size > data.n_train:
        raise ConfigError(f"cell.batch_size: {cell.batch_size} is larger than the training set "
                          f"({data.n_train} examples)")
    model = _initial_model(cell, data)
    if cell.branch is not None:
        wait_for_base(store, cell, branch_start(cell, data.n_train), base_wait)

    # The lease only now, so that bad input (above) leaves nothing in the store, not even a lease record.
    guard = CellGuard(store, cell, ttl_s=lease_seconds or default_lease_seconds()).acquire() if dist.is_main else None
    try:
        distributed.init(dist, dev)
        previous_handler = None
        try:
            finished = _claim(guard, force, lambda: Plan.of(cell, data, dist.world).derived) \
                if guard is not None else None
            if dist.active:
                finished = all_gather_object(finished, dist)[0]
            if finished is not None:
                return _already_finished(cell, store, finished, dist)
            data = data.to(dev)

            def run_once(model: torch.nn.Module) -> dict:
                nonlocal previous_handler
                trainer = Trainer(cell, store, data, model, dev, dist, flush_steps=flush_steps,
                                  flush_seconds=flush_seconds, checkpoint_seconds=checkpoint_seconds,
                                  checkpoint_steps=checkpoint_steps, progress=progress, guard=guard,
                                  pause_at=pause_at)
                handler = _install_sigterm(trainer)
                previous_handler = handler if previous_handler is None else previous_handler
                return trainer.run()

            try:
                return run_once(model)
            except DamagedLogs as err:
                # A part lost or cut while the cell trained: once more, from the newest checkpoint before it.
                # Several ranks cannot agree on that here: the process fails, and its retry resumes.
                if dist.active:
                    raise
                print(f"critbatch train: cell {cell.id}: {err}; training again", flush=True)
                return run_once(_initial_model(cell, data))
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            distributed.shutdown()
    finally:
        if guard is not None:
            guard.release()


def wait_for_base(store: Store, cell: Cell, step: int, timeout: float, poll: float = BASE_POLL_S) -> None:
    """Return once the kept checkpoint of the branch's base at ``step`` is in the store (its COMPLETE marker);
    BasePending after ``timeout`` seconds without it; ConfigError when the base finished without it (it
    diverged or stopped before ``step``: waiting cannot help)."""
    base = cell.branch.base
    key = f"{checkpoint_dir(cell_prefix(cell.sweep, base), step)}/{CHECKPOINT_COMPLETE}"
    deadline = time.monotonic() + timeout
    said = False
    while not store.exists(key):
        state = cell_state(store, cell.sweep, base)
        if state.finished:
            summary = state.summary or {}
            kept = ", ".join(str(p.get("step")) for p in summary.get("kept") or []) or "none"
            raise ConfigError(f"cell.branch: the base cell {base} finished ({summary.get('status')} after "
                              f"{summary.get('steps')} steps) without a checkpoint at step {step}; its kept "
                              f"steps: {kept}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise BasePending(f"the base cell {base} has not written its checkpoint at step {step} "
                              f"({store.join(key)}) within {timeout:g} s")
        if not said:
            print(f"critbatch train: branch {cell.id} waits up to {timeout:g} s for base cell {base}'s checkpoint "
                  f"at step {step}", flush=True)
            said = True
        time.sleep(min(poll, left))


def _initial_model(cell: Cell, data) -> torch.nn.Module:
    """The cell's model at its initial weights, the same on every rank (DDP also broadcasts rank 0's)."""
    torch.manual_seed(mix_seed("init", cell.seed))
    model = build_model(cell, data)
    if cell.sync_bn and dist_from_env().active:
        # BatchNorm over every rank's micro-batch; the parameters and buffers stay the same objects.
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _claim(guard: CellGuard, force: bool, derived: Callable[[], dict]) -> dict | None:
    """Rank 0, holding the lease: the summary if the cell finished meanwhile (another trainer) or is repaired
    by writing its cell.json again (``derived``: the figures it records), else None after clearing the way:
    ``--force`` wipes the cell, a damaged one loses its ``_SUCCESS``."""
    cell = guard.cell
    state = cell_state(guard.store, cell.sweep, cell.id)
    if force:
        guard.wipe()
    elif state.finished:
        return state.summary
    elif state.record_only(cell.id):
        write_cell_record(guard.store, cell_prefix(cell.sweep, cell.id), cell, derived())
        print(f"critbatch train: cell {cell.id}: {state.record}; wrote it again from the cell (its logs and "
              "_SUCCESS are whole and this cell's)", flush=True)
        return state.summary
    elif state.state == DAMAGED:
        guard.withdraw_success("not finished: " + "; ".join(state.problems))
    return None


def _already_finished(cell: Cell, store: Store, summary: dict, dist: Dist) -> dict:
    if dist.is_main:
        print(f"critbatch train: cell {cell.id} already finished ({summary.get('status')}); "
              f"{store.join(success_key(cell.sweep, cell.id))} exists, nothing to do (--force trains it again)",
              flush=True)
    return summary


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
