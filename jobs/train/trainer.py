"""Train one cell and stream its logs to the object store: ``critbatch train``.

Launch (the same entrypoint everywhere; the cell is a JSON file or inline JSON):

    # one process, local directory store
    critbatch train --cell cell.json --store ./critbatch-out --data-root ~/.cache/critbatch/data

    # two data-parallel processes on one machine (gloo on CPU, nccl on GPUs), S3 store
    AWS_ENDPOINT_URL=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=k AWS_SECRET_ACCESS_KEY=s \\
        torchrun --standalone --nproc-per-node=2 -m critbatch.jobs.cli train --cell cell.json \\
            --store s3://critbatch/runs

    # on a cluster: one Job (or PyTorchJob/TrainJob) per cell, each running the torchrun line above in a pod
    critbatch render grid.yaml | kubectl apply -f -

Batch arithmetic (printed at start): the cell's batch size m is the global
batch, m = micro-batch x accumulation x world size; each rank takes m / world
rows of every global batch and splits them into ``accumulation`` micro-batches,
whose losses are scaled by 1 / accumulation so that one update applies the mean
gradient over all m examples. One step = one update; an epoch is
floor(n_train / m) steps (the last partial batch is dropped).

What is written, in order (rank 0 alone writes): ``cell.json`` (the cell, its
id, code version and derived figures), step and eval log parts through
:class:`LogStream`, checkpoints, ``model.pt`` (final weights) and ``_SUCCESS``
last. A cell whose ``_SUCCESS`` exists is not trained again (``--force`` wipes
its prefix and starts over).

Resume: the trainer's whole state (step, data position, samples seen, wall
time, model, optimizer, every rank's RNG states, the log part indices) is one
checkpoint, saved every ``--checkpoint-seconds`` / ``--checkpoint-steps`` and
on SIGTERM, after which the process exits with code 143 (Kubernetes retries the
pod, which resumes). On the CPU a resumed run ends with weights bit-identical
to an uninterrupted one (deterministic algorithms, same thread count).

Host syncs: the per-step loss and noise figures stay on the device and are
copied to the host (and averaged over ranks, in one all-reduce) every
``sync_every`` steps (1 on the CPU, where it is free; 25 on a GPU), and at
evaluations, checkpoints and the end. Divergence (a non-finite loss) is
therefore noticed at the next sync and logged at the step where it happened;
the cell then ends with status ``diverged``, which is a result, not a crash.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed
from .checkpoint import Checkpointer
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.cell.version import code_version
from critbatch.jobs.data.datasets import TaskData, load_task_data, mix_seed
from .distributed import Dist, all_gather_object, all_reduce_mean_, average_gradients_, dist_from_env
from critbatch.jobs.cell.errors import ConfigError, StoreUnavailable
from .evaluate import evaluate, gradient_sq_norm, linear_approx_error
from critbatch.jobs.cell.logschema import STATUS_DIVERGED, STATUS_DONE, success_summary
from critbatch.jobs.store.logstream import LogStream
from critbatch.jobs.models.zoo import build_model, loss_fn, metric_name
from critbatch.jobs.store import Store, open_store
from critbatch.jobs.cell.layout import cell_prefix, success_key
from .strategies import base_total_steps, eval_steps, lr_at, peak_lr, total_steps, warmup_steps

#: Exit code after a SIGTERM-triggered checkpoint (128 + SIGTERM, what a killed process reports).
EXIT_PREEMPTED = 143
#: Steps between host syncs of the logged figures on a GPU (on the CPU: every step).
GPU_SYNC_EVERY = 25
#: Seconds to wait for log parts to reach the store before a periodic checkpoint is skipped (the
#: store is down: training goes on, the parts wait in the spool, the next checkpoint tries again),
#: and before the SIGTERM checkpoint gives up (torchrun kills its workers 30 s after forwarding it).
CHECKPOINT_LOG_TIMEOUT_S = 5.0
#: ... and while the store is known to be down (the previous checkpoint was skipped).
CHECKPOINT_LOG_TIMEOUT_DOWN_S = 0.5
SIGTERM_LOG_TIMEOUT_S = 20.0
#: Seconds the final writes (model.pt, _SUCCESS) wait out a store outage before the run fails.
STORE_PATIENCE_S = 1800.0
#: Seconds between progress lines when the output is not a terminal.
PROGRESS_LINE_SECONDS = 10.0


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was written (if the store allowed) and the process should exit."""

    def __init__(self, step: int, checkpointed: bool):
        super().__init__(f"stopped at step {step} on SIGTERM ({'checkpointed' if checkpointed else 'no checkpoint'})")
        self.step = step
        self.checkpointed = checkpointed


# ---- the command ------------------------------------------------------------------


def read_cell(text: str) -> Cell:
    """The cell from inline JSON (starting with '{') or a JSON file (a cell.json from the store works too)."""
    if text.lstrip().startswith("{"):
        return Cell.from_json(text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"--cell: no such file {str(path)!r}; give a cell JSON file or inline JSON")
    return Cell.from_json(path.read_text())


def main(args: argparse.Namespace) -> int:
    """``critbatch train``: validate cell, store and data, then train.

    Exit codes: 0 done, diverged or already finished; 2 bad input (nothing written); 143 stopped by SIGTERM
    after a checkpoint.
    """
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


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


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
    prefix = cell_prefix(cell.sweep, cell.id)
    done_key = success_key(cell.sweep, cell.id)
    if not force and store.exists(done_key):
        summary = json.loads(store.get_text(done_key))
        if dist.is_main:
            print(f"critbatch train: cell {cell.id} already finished ({summary.get('status')}); "
                  f"{store.join(done_key)} exists, nothing to do (--force trains it again)", flush=True)
        return summary

    data = load_task_data(cell, data_root, download=download)
    if cell.batch_size > data.n_train:
        raise ConfigError(f"cell.batch_size: {cell.batch_size} is larger than the training set "
                          f"({data.n_train} examples)")
    dev = pick_device(device, dist)
    # Same initial weights on every rank (DDP also broadcasts rank 0's at wrap time).
    torch.manual_seed(mix_seed("init", cell.seed))
    model = build_model(cell, data)

    distributed.init(dist, dev)
    previous_handler = None
    try:
        if force and dist.is_main:
            store.delete_prefix(prefix + "/")
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
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda asked for, but torch sees no CUDA device; allowed here: auto, cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        dev = torch.device("cuda", dist.local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def _install_sigterm(trainer: "Trainer"):
    """SIGTERM sets a flag; the loop checkpoints at the next sync point and raises Preempted."""
    def handler(signum, frame):  # noqa: ARG001 - signal API
        trainer.stop_requested = True

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a library caller); SIGTERM then keeps its default
        return None


def spool_dir(store: Store) -> Path:
    """Local folder where log parts wait for upload: $CRITBATCH_SPOOL, else under the temp dir, per store."""
    base = os.environ.get("CRITBATCH_SPOOL") or os.path.join(tempfile.gettempdir(), "critbatch-spool")
    where = store.url if "://" in store.url else os.path.abspath(store.url)
    return Path(base) / hashlib.sha256(where.encode()).hexdigest()[:12]


# ---- the trainer ---------------------------------------------------------------------


@dataclass
class Pending:
    """A step whose figures are still on the device (copied to the host at the next sync)."""

    step: int
    epoch: float
    lr: float
    wall: float
    loss: Tensor
    noise: tuple[int, int, Tensor, Tensor] | None = None


@dataclass
class Progress:
    """A tqdm bar on a terminal, a line every few seconds otherwise; rank 0 only."""

    mode: str
    total: int
    start: int
    bar: Any = None
    last_line: float = field(default_factory=time.monotonic)
    last_step: int = 0

    def __post_init__(self):
        if self.mode == "auto":
            self.mode = "bar" if sys.stderr.isatty() else "lines"
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.start, unit="step", dynamic_ncols=True)
        self.last_step = self.start
        self.t0 = time.monotonic()

    def update(self, step: int, loss: float, lr: float, force: bool = False) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", refresh=False)
            return
        now = time.monotonic()
        if self.mode == "lines" and (force or now - self.last_line >= PROGRESS_LINE_SECONDS):
            rate = (step - self.last_step) / max(1e-9, now - self.last_line)
            print(f"step {step}/{self.total}  loss {loss:.4g}  lr {lr:.4g}  {rate:.1f} steps/s", flush=True)
            self.last_line, self.last_step = now, step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Trainer:
    """One cell's training state and loop. ``run()`` resumes, trains, evaluates and writes ``_SUCCESS``."""

    def __init__(self, cell: Cell, store: Store, data: TaskData, model: nn.Module, device: torch.device,
                 dist: Dist, *, flush_steps: int, flush_seconds: float, checkpoint_seconds: float,
                 checkpoint_steps: int, progress: str):
        self.cell, self.store, self.data, self.device, self.dist = cell, store, data, device, dist
        self.prefix = cell_prefix(cell.sweep, cell.id)
        self.flush_steps, self.flush_seconds = flush_steps, flush_seconds
        self.checkpoint_seconds, self.checkpoint_steps = checkpoint_seconds, checkpoint_steps
        self.progress_mode = progress
        self.task = data.task
        self.loss_fn = loss_fn(self.task)
        self.metric = metric_name(self.task)
        self.cuda = device.type == "cuda"
        self.channels_last = self.cuda and data.train_x.dim() == 4
        self.sync_every = GPU_SYNC_EVERY if self.cuda else 1

        # Batch arithmetic: m = micro x accumulation x world (divisibility checked by Cell.problems).
        self.m = cell.batch_size
        self.acc = cell.accumulation
        self.per_rank = self.m // dist.world
        self.micro = self.per_rank // self.acc
        self.spe = data.steps_per_epoch(self.m)
        self.total = total_steps(cell, self.spe)
        self.base_total = base_total_steps(cell, data.steps_per_epoch(cell.base_batch))
        self.eval_at = set(eval_steps(cell, self.total, self.base_total))
        self.derived = {
            **data.info, "n_train": data.n_train, "steps_per_epoch": self.spe, "total_steps": self.total,
            "base_total_steps": self.base_total, "warmup_steps": warmup_steps(cell, self.spe),
            "world_size": dist.world, "micro_batch": self.micro,
        }
        self._configure_backends()
        self.raw_model = model.to(device)
        if self.channels_last:
            self.raw_model = self.raw_model.to(memory_format=torch.channels_last)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.noise_mode = self._noise_mode()
        opt = cell.optimizer
        self.optimizer = torch.optim.SGD(
            self.params, lr=cell.base_lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
            nesterov=opt.nesterov,
        )
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cell.precision == "bf16"
                         else nullcontext())

        # The resumable state (see state_dict()).
        self.step = 0
        self.epoch = 0
        self.batch_index = 0  # batches of `epoch` already consumed
        self.wall = 0.0  # seconds of training so far (evaluations and checkpoints excluded)
        self.last_eval: dict[str, Any] = {}

        self.stop_requested = False
        self.pending: list[Pending] = []
        self.diverged: tuple[int, str] | None = None
        self.logs: LogStream | None = None
        self.checkpointer = Checkpointer(store, self.prefix)
        self.model: nn.Module = self.raw_model
        self._batches: Iterator[tuple[Tensor, Tensor]] | None = None
        self._clock: float | None = None
        self._last_checkpoint = time.monotonic()
        self._store_down = False  # the last checkpoint was skipped for an unreachable store
        self._last_loss = math.nan
        self.progress: Progress | None = None

    # ---- set-up ----------------------------------------------------------------------

    def _configure_backends(self) -> None:
        if self.cuda:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the paper's numerics
            torch.backends.cudnn.allow_tf32 = False
        else:
            # Bit-identical resume on the CPU; ops without a deterministic kernel only warn.
            # torch.use_deterministic_algorithms() also imports the compiler stack to set its flag
            # (about 2 s per start-up); nothing here compiles, so set the eager flag alone when possible.
            setter = getattr(torch._C, "_set_deterministic_algorithms", None)
            if setter is not None:
                setter(True, warn_only=True)
            else:  # pragma: no cover - other torch versions
                torch.use_deterministic_algorithms(True, warn_only=True)

    def _noise_mode(self) -> str | None:
        """How the gradient-noise statistics (design 6) are measured, given the batch layout.

        micro  accumulation >= 2: the first micro-batch's gradient (b = micro-batch) against the
               step's full gradient (B = m, all-reduced when there are several ranks);
        rank   several ranks, no accumulation: the local gradient (b = m / world) against the
               all-reduced one (B = m); the measured steps reduce by hand after a no_sync backward;
        split  one process, no accumulation, even m, no BatchNorm, a per-example mean loss: the
               measured step runs as two micro-batches of m / 2 (b = m / 2, B = m). Without BatchNorm
               the update is the full-batch one (up to the order of the sum) and costs nothing extra;
        extra  one process, no accumulation otherwise: an extra forward/backward on the first quarter
               of the batch (b = max(1, m // 4)) against the step's gradient (B = m), costing a quarter
               of a step per measurement (2.5 % at every = 10); it runs with a forked RNG and restored
               buffers, so BatchNorm statistics and the training trajectory are the same as without
               measuring.
        """
        if self.cell.noise.every <= 0:
            return None
        if self.acc >= 2:
            return "micro"
        if self.dist.active:
            return "rank"
        if self.m < 2:
            return None
        batch_norm = any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in self.raw_model.modules())
        if self.m % 2 == 0 and not batch_norm and self.task != "segmentation":
            return "split"
        return "extra"

    def _noise_batches(self) -> tuple[int, int]:
        small = {"micro": self.micro, "rank": self.per_rank, "split": self.m // 2, "extra": max(1, self.m // 4)}
        small = small[self.noise_mode]
        return small, self.m

    def _print_arithmetic(self) -> None:
        c = self.cell
        lr0 = lr_at(c, 0, self.spe, self.derived)
        lr_end = lr_at(c, self.total - 1, self.spe, self.derived)
        peak = peak_lr(c, self.derived)
        noise = "off"
        if self.noise_mode:
            b, big = self._noise_batches()
            noise = f"every {c.noise.every} steps, b={b} vs B={big} ({self.noise_mode})"
        evals = sorted(self.eval_at)
        lines = [
            f"critbatch train: cell {c.id} (sweep {c.sweep}): {c.dataset.name}/{c.model}, strategy {c.strategy}, "
            f"seed {c.seed}",
            f"  global batch {self.m} = micro-batch {self.micro} x accumulation {self.acc} x world size "
            f"{self.dist.world}  (base batch m0 = {c.base_batch})",
            f"  train examples {self.data.n_train} -> {self.spe} steps/epoch; total steps {self.total} "
            f"({c.epochs:g} epochs{', x m/m0 (longer)' if c.strategy == 'longer' else ''}"
            f"{f', capped at max_steps {c.max_steps}' if c.max_steps else ''}); base budget {self.base_total}",
            f"  lr {lr0:.6g} at step 0 -> peak {peak:.6g} (warm-up {self.derived['warmup_steps']} steps) -> "
            f"{lr_end:.6g} at the last step; decay {c.decay}; SGD momentum {c.optimizer.momentum}, "
            f"weight decay {c.optimizer.weight_decay}, nesterov {c.optimizer.nesterov}",
            f"  evaluations at {len(evals)} iterations ({_abbreviate(evals)}); "
            f"noise statistics {noise}",
            f"  device {self.device}, precision {c.precision}, store {self.store.join(self.prefix)}",
        ]
        print("\n".join(lines), flush=True)

    def _write_cell_json(self) -> None:
        key = f"{self.prefix}/cell.json"
        if self.store.exists(key):
            return  # a resumed run keeps the record of its first start
        body = {
            **self.cell.to_dict(), "id": self.cell.id, "code_version": code_version(), "derived": self.derived,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.store.put_text(key, json.dumps(body, indent=2, sort_keys=True) + "\n")

    # ---- state -----------------------------------------------------------------------

    def rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if self.cuda:
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if self.cuda and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def seed_rngs(self, *extra: Any) -> None:
        """Per-rank seeds for what draws from the global RNGs (dropout): offset by rank."""
        seed = mix_seed("train", self.cell.seed, self.dist.rank, *extra)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def state_dict(self, rngs: list[dict[str, Any]], log_parts: dict[str, int]) -> dict[str, Any]:
        return {
            "cell_id": self.cell.id, "step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
            "samples_seen": self.step * self.m, "wall_time_s": self.wall, "last_eval": self.last_eval,
            "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": rngs, "world_size": self.dist.world, "logs": log_parts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
        self.wall, self.last_eval = state["wall_time_s"], state.get("last_eval", {})
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        rngs = state["rng"]
        if len(rngs) == self.dist.world:
            self.set_rng_state(rngs[self.dist.rank])
        else:
            # A different world size: data order and augmentation do not depend on it, dropout does.
            if self.dist.is_main:
                print(f"critbatch train: checkpoint from {len(rngs)} ranks, now {self.dist.world}; "
                      f"reseeding the per-rank RNGs", flush=True)
            self.seed_rngs(self.step)

    # ---- run ---------------------------------------------------------------------------

    def run(self) -> dict:
        if self.dist.is_main:
            self._print_arithmetic()
        self.seed_rngs()
        checkpoint = self.checkpointer.load_latest()
        if checkpoint is not None:
            self.load_state_dict(checkpoint)
        if self.dist.active:
            ids = [self.device.index] if self.cuda else None
            self.model = nn.parallel.DistributedDataParallel(self.raw_model, device_ids=ids)
        if self.dist.is_main:
            self._write_cell_json()
            self.logs = LogStream(self.store, self.prefix, spool_dir=spool_dir(self.store),
                                  flush_steps=self.flush_steps, flush_seconds=self.flush_seconds,
                                  cell_id=self.cell.id)
            self.logs.resume(checkpoint["logs"] if checkpoint is not None else None)
            if checkpoint is not None:
                print(f"critbatch train: resumed from the checkpoint at step {self.step} "
                      f"(epoch {self.epoch}, batch {self.batch_index})", flush=True)
            self.progress = Progress(self.progress_mode, self.total, self.step)
        try:
            if checkpoint is None:
                self._evaluate()  # step 0: before training
            self._train()
            return self._finish()
        except BaseException:
            self._abandon_logs()
            raise
        finally:
            if self.progress is not None:
                self.progress.close()

    def _abandon_logs(self) -> None:
        """On an exception: stop the log threads; rows past the last checkpoint are redone on resume."""
        if self.logs is not None:
            try:
                self.logs.close(timeout=10.0)
            except (StoreUnavailable, RuntimeError) as err:
                print(f"critbatch train: log parts not all uploaded on exit ({err})", file=sys.stderr)
            self.logs = None

    # ---- the loop ----------------------------------------------------------------------

    def _start_clock(self) -> None:
        self._clock = time.perf_counter()

    def _stop_clock(self) -> None:
        """Add the running segment to the training wall time (after the device has caught up)."""
        if self._clock is not None:
            if self.cuda:
                torch.cuda.synchronize(self.device)
            self.wall += time.perf_counter() - self._clock
            self._clock = None

    def _now(self) -> float:
        return self.wall + (time.perf_counter() - self._clock if self._clock is not None else 0.0)

    def _next_batch(self) -> tuple[Tensor, Tensor]:
        if self._batches is None:
            self._batches = self.data.train_batches(self.epoch, self.m, seed=self.cell.seed, rank=self.dist.rank,
                                                    world=self.dist.world, start=self.batch_index)
        x, y = next(self._batches)
        self.batch_index += 1
        if self.batch_index >= self.spe:
            self.epoch, self.batch_index, self._batches = self.epoch + 1, 0, None
        return x, y

    def _train(self) -> None:
        cell, spe, noise_every = self.cell, self.spe, self.cell.noise.every
        self.model.train()
        self._start_clock()
        while self.step < self.total:
            x, y = self._next_batch()
            lr = lr_at(cell, self.step, spe, self.derived)
            measure = self.noise_mode is not None and (self.step + 1) % noise_every == 0
            loss, noise = self._update(x, y, lr, measure)
            self.step += 1
            self.pending.append(Pending(self.step, self.epoch + self.batch_index / spe, lr, self._now(), loss, noise))

            at_eval = self.step in self.eval_at
            at_checkpoint = self.checkpoint_steps > 0 and self.step % self.checkpoint_steps == 0
            if not (at_eval or at_checkpoint or self.step % self.sync_every == 0 or self.step == self.total):
                continue
            stop, due = self._sync()
            if self.diverged:
                break
            if at_eval:
                self._evaluate()
            if self.step == self.total:
                break
            if at_checkpoint or due or stop:
                saved = self._checkpoint(stopping=stop)
                if stop:
                    self._stop_clock()
                    self._abandon_logs()  # synced by the checkpoint; only stops the threads
                    raise Preempted(self.step, saved)
        self._stop_clock()

    def _prepare(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _update(self, x: Tensor, y: Tensor, lr: float, measure: bool):
        """One SGD step on this rank's share (x, y) of the global batch; returns (loss, noise) on the device.

        The loss returned is this rank's mean minibatch loss (the mean over ranks is taken at the next sync).
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        parts = 2 if measure and self.noise_mode == "split" else self.acc
        xs, ys = (x.chunk(parts), y.chunk(parts)) if parts > 1 else ((x,), (y,))
        manual_reduce = measure and self.noise_mode == "rank"
        loss_sum: Tensor | None = None
        g_small: Tensor | None = None
        for i, (xm, ym) in enumerate(zip(xs, ys)):
            last = i == parts - 1
            # DDP all-reduces in the last micro-batch's backward only; earlier ones accumulate locally.
            sync = self.dist.active and last and not manual_reduce
            with (self.model.no_sync() if self.dist.active and not sync else nullcontext()):
                with self.autocast:
                    loss = self.loss_fn(self.model(self._prepare(xm)), ym)
                (loss / parts if parts > 1 else loss).backward()
            loss = loss.detach().float()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            if measure and i == 0 and self.noise_mode in ("micro", "split"):
                # After the first micro-batch .grad holds g_1 / parts: |G_b|^2 = parts^2 |grad|^2.
                g_small = gradient_sq_norm(self.params) * parts**2
        noise = None
        if measure:
            if self.noise_mode == "rank":
                g_small = gradient_sq_norm(self.params)  # this rank's gradient, before the all-reduce
                average_gradients_(self.params, self.dist)
            elif self.noise_mode == "extra":
                g_small = self._small_batch_grad_sq(x, y)
            b_small, b_big = self._noise_batches()
            noise = (b_small, b_big, g_small, gradient_sq_norm(self.params))
        if self.cell.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.params, self.cell.clip_grad)
        self.optimizer.step()
        mean_loss = loss_sum / parts if parts > 1 else loss_sum
        return mean_loss, noise

    def _small_batch_grad_sq(self, x: Tensor, y: Tensor) -> Tensor:
        """|G_b|^2 of the batch's first b rows, at the step's weights, without touching the trajectory."""
        b = self._noise_batches()[0]
        buffers = [b.detach().clone() for b in self.raw_model.buffers()]
        devices = [self.device] if self.cuda else []
        with torch.random.fork_rng(devices=devices):
            with self.autocast:
                loss = self.loss_fn(self.raw_model(self._prepare(x[:b])), y[:b])
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        with torch.no_grad():
            for b, saved in zip(self.raw_model.buffers(), buffers):
                b.copy_(saved)
        return torch.nn.utils.get_total_norm([g for g in grads if g is not None]).double().pow(2)

    def _sync(self) -> tuple[bool, bool]:
        """Copy the pending steps' figures to the host in one go, mean over ranks; log them.

        Also agrees across ranks on whether to stop (SIGTERM seen by any rank) and whether a
        time-based checkpoint is due (rank 0's clock), so every rank takes the same branch.
        Returns (stop, checkpoint_due).
        """
        pending, self.pending = self.pending, []
        measured = [p for p in pending if p.noise is not None]
        due = self.dist.is_main and time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds
        flags = torch.tensor([float(self.stop_requested), float(due)], device=self.device)
        parts = [torch.stack([p.loss.double() for p in pending])] if pending else []
        if measured:
            parts.append(torch.stack([p.noise[2].double() for p in measured]))
            parts.append(torch.stack([p.noise[3].double() for p in measured]))
        packed = torch.cat(parts + [flags.double()])
        # One host sync for all of them; the mean over ranks gives the global-batch loss and the
        # rank-averaged |G_b|^2 (|G_B|^2 is the same on every rank).
        values = all_reduce_mean_(packed, self.dist).tolist()
        if pending and self.cuda:
            pending[-1].wall = self._now()  # exact at the sync point (the device has caught up)
        n, k = len(pending), len(measured)
        losses, small, big, flags_out = values[:n], values[n:n + k], values[n + k:n + 2 * k], values[n + 2 * k:]
        noise_by_step = {p.step: (p.noise[0], p.noise[1], s, b) for p, s, b in zip(measured, small, big)}
        for p, loss in zip(pending, losses):
            row = {"step": p.step, "epoch": p.epoch, "samples_seen": p.step * self.m, "lr": p.lr,
                   "train_loss": loss, "wall_time_s": p.wall}
            if p.step in noise_by_step:
                b_small, b_big, g_small, g_big = noise_by_step[p.step]
                row.update(noise_b_small=b_small, noise_b_big=b_big, noise_g_small_sq=g_small,
                           noise_g_big_sq=g_big)
            if self.logs is not None:
                self.logs.log_step(row)
            if not math.isfinite(loss):
                self.diverged = (p.step, f"non-finite training loss ({loss}) at step {p.step}")
                break
            self._last_loss = loss
        if self.progress is not None and pending:
            last = pending[-1]
            self.progress.update(last.step, self._last_loss, last.lr, force=last.step == self.total)
        return flags_out[0] > 0, flags_out[1] > 0

    def _eval_batch_size(self) -> int:
        if self.task in ("segmentation", "language_model"):
            return max(1, self.micro)
        return max(256, min(self.micro, 2048))

    def _eval_split(self, split: str) -> tuple[float, str, float]:
        return evaluate(self.raw_model, self.data.eval_batches(split, self._eval_batch_size()), self.task,
                        self.loss_fn, dist=self.dist, num_classes=self.data.num_classes, prepare=self._prepare,
                        autocast=self.autocast)

    def _evaluate(self) -> None:
        """Train-subset and test loss and metric at the current step, logged as eval rows (time not counted)."""
        self._stop_clock()
        epoch = self.step / self.spe
        result: dict[str, Any] = {"step": self.step, "metric": self.metric}
        for split in ("train", "test"):
            loss, metric, value = self._eval_split(split)
            result[f"{split}_loss"], result[f"{split}_metric"] = loss, value
            if self.logs is not None:
                self.logs.log_eval({"step": self.step, "epoch": epoch, "split": split, "loss": loss,
                                    "metric": metric, "value": value})
        self.last_eval = result
        self._start_clock()

    def _checkpoint(self, stopping: bool = False) -> bool:
        """Save the trainer's state; the logs are synced first so their part indices cover every step so far."""
        self._stop_clock()
        rngs = all_gather_object(self.rng_state(), self.dist)
        saved = False
        if self.dist.is_main:
            try:
                timeout = (SIGTERM_LOG_TIMEOUT_S if stopping else
                           CHECKPOINT_LOG_TIMEOUT_DOWN_S if self._store_down else CHECKPOINT_LOG_TIMEOUT_S)
                parts = self.logs.sync(timeout=timeout)
                self.checkpointer.save(self.step, self.state_dict(rngs, parts))
                saved, self._store_down = True, False
            except StoreUnavailable as err:
                self._store_down = True
                print(f"critbatch train: checkpoint at step {self.step} skipped, store unavailable ({err})",
                      file=sys.stderr, flush=True)
        self._last_checkpoint = time.monotonic()
        self._start_clock()
        return saved

    # ---- the end -----------------------------------------------------------------------

    def _finish(self) -> dict:
        final: dict[str, Any] = {"train_loss": None, "test_loss": None, "metric": self.metric,
                                 "train_metric": None, "test_metric": None, "lin_approx_error": None}
        if self.diverged:
            status, reason = STATUS_DIVERGED, self.diverged[1]
            steps = self.diverged[0]
        else:
            status, reason, steps = STATUS_DONE, None, self.step
            for key in ("train_loss", "test_loss", "train_metric", "test_metric"):
                final[key] = _finite_or_none(self.last_eval.get(key))
            error, details = self._linear_approx_error()
            final["lin_approx_error"] = _finite_or_none(error)
            final["lin_approx"] = {k: _finite_or_none(v) for k, v in details.items()}
        summary = success_summary(
            cell_id=self.cell.id, status=status, steps=steps, samples_seen=steps * self.m,
            wall_time_s=self.wall, final=final, code_version=code_version(), reason=reason,
        )
        if self.dist.is_main:
            # Logs first (close() waits until every part is in the store, however long an outage
            # lasts), then the final weights, then _SUCCESS: its presence means everything is there.
            if self.logs is not None:
                self.logs.close()
                self.logs = None
            if not self.diverged:
                buf = io.BytesIO()
                torch.save(self.raw_model.state_dict(), buf)
                self._put_patiently(f"{self.prefix}/model.pt", buf.getvalue())
            else:
                print(f"critbatch train: cell {self.cell.id} diverged: {reason}", flush=True)
            self._put_patiently(success_key(self.cell.sweep, self.cell.id),
                                (json.dumps(summary, indent=2) + "\n").encode())
        distributed.barrier(self.dist)
        return summary

    def _put_patiently(self, key: str, data: bytes) -> None:
        """Write a final object, waiting out a store outage (up to STORE_PATIENCE_S).

        A store that stays down longer is a crash (exit 1, the pod is retried and resumes from the
        last checkpoint), not bad input: StoreUnavailable would map to exit code 2, which fails the Job.
        """
        deadline = time.monotonic() + STORE_PATIENCE_S
        delay = 1.0
        while True:
            try:
                self.store.put_bytes(key, data)
                return
            except StoreUnavailable as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"store still unreachable after {STORE_PATIENCE_S:.0f} s: {err}") from err
                print(f"critbatch train: cannot write {key} yet ({err}); retrying in {delay:.0f} s",
                      file=sys.stderr, flush=True)
                time.sleep(delay)
                delay = min(60.0, delay * 2)

    def _linear_approx_error(self) -> tuple[float, dict]:
        """Paper 4.2 at the final weights, with g_m the gradient of one global batch of m examples.

        eta * m / m0 is taken as eta_0 * m / m0 (the LSR step, as in the paper's Figure 2), whatever
        the cell's strategy; L is the train-subset loss. Both L and g_m are taken in eval mode (no
        dropout, BatchNorm on running statistics) so that g_m is the gradient of the L evaluated.
        The batch is the first of the epoch after training (this rank's share, in micro-batches).
        """
        x, y = next(self.data.train_batches(self.epoch + 1, self.m, seed=self.cell.seed, rank=self.dist.rank,
                                            world=self.dist.world))
        model = self.raw_model

        def loss_at() -> float:
            return self._eval_split("train")[0]

        def gradient() -> None:
            was_training = model.training
            model.eval()
            try:
                xs, ys = (x.chunk(self.acc), y.chunk(self.acc)) if self.acc > 1 else ((x,), (y,))
                for xm, ym in zip(xs, ys):
                    with self.autocast:
                        loss = self.loss_fn(model(self._prepare(xm)), ym)
                    (loss / len(xs)).backward()
                average_gradients_(self.params, self.dist)
            finally:
                model.train(was_training)

        step_size = self.cell.base_lr * self.m / self.cell.base_batch
        return linear_approx_error(model, loss_at, gradient, step_size)


def _abbreviate(values: list[int], head: int = 6) -> str:
    shown = ", ".join(map(str, values[:head]))
    return shown if len(values) <= head + 1 else f"{shown}, ..., {values[-1]}"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
