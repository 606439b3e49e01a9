"""The local executor: a grid's cells as subprocesses of ``critbatch train``.

    critbatch run digits                         # preset name or a grid YAML
    critbatch run my-grid.yaml --parallel 2 --store s3://critbatch/runs

Each cell runs the same entrypoint a pod runs (under torchrun when the grid
asks for several processes per cell), N cells at a time with the machine's CPU
threads divided among them. Finished cells (a readable ``_SUCCESS`` whose
parts are all in the store) are skipped, so an interrupted sweep picks up where
it stopped (an interrupted cell resumes from its last checkpoint); a damaged
one (an unreadable ``_SUCCESS``, a part missing or cut) is trained again. A
cell whose lease another trainer holds (another ``run``, a pod on the same
store) is left to it and reported as busy. A failed cell is reported with the
tail of its log while the others go on.

A branch cell (docs/branches.md) starts once its base has written the kept
checkpoint it starts from (or has finished); until then the cells behind it go
first. A branch whose base failed, or is held by another trainer, is reported
so without being started.

The executor owns its trainers: each runs in a session of its own, armed to
die with the executor (PR_SET_PDEATHSIG, see critbatch.jobs.train.parent), and
every way out of ``run`` stops them: SIGTERM, SIGHUP or Ctrl-C is forwarded
to each as SIGTERM, each checkpoints (up to STOP_GRACE_S, then SIGKILL), and
``run`` exits with 128 + the signal (143 after SIGTERM); an exception kills
them. A second signal while they checkpoint kills them at once.

Exit code: 0 when every cell is finished; 1 if any failed; else 203 (the
trainer's ExitCode.LEASE_HELD) if any was busy elsewhere: run again later.

The store is ``--store``, else the grid's ``store`` if it is a local
directory, else ./critbatch-out; cells checkpoint every ``checkpoint_seconds``
of the grid. Each cell's output goes to its log file, and its progress is read
back from there: the JSON lines of ``critbatch train --progress json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..cell.spec import Cell, branch_start
from ..cell.errors import ConfigError, ExitCode
from ..cell.inputs import output_dir
from ..store import Store, open_store
from ..cell.layout import CHECKPOINT_COMPLETE, DEFAULT_STORE, cell_prefix, checkpoint_dir
from ..store.cellstate import DAMAGED, sweep_states
from ..store.lease import live_holder
from ..train.parent import DIE_WITH_PARENT_ENV, preexec

#: Lines of a failed cell's log shown in the report.
TAIL_LINES = 15
#: Bytes at the end of a cell's log searched for its latest progress line.
PROGRESS_TAIL_BYTES = 4096
#: Seconds the trainers get to checkpoint after a forwarded SIGTERM before they are killed.
STOP_GRACE_S = 60.0
#: Seconds between two looks at the store for a waiting branch's base checkpoint.
BASE_POLL_S = 1.0


@dataclass
class CellRun:
    cell: Cell
    log_path: Path
    proc: subprocess.Popen | None = None
    log_file: object | None = None
    started: float = 0.0
    last_line: str = ""
    status: str = "pending"  # pending | running | done | failed | busy | stopped
    returncode: int | None = None
    progress: tuple[int, int] | None = None  # (step, total)
    loss: float | None = None

    def tail(self, n: int = TAIL_LINES) -> list[str]:
        try:
            with open(self.log_path, errors="replace") as fh:
                return [line.rstrip("\n") for line in deque(fh, maxlen=n)]
        except OSError:
            return []


@dataclass
class RunResult:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # another trainer holds their lease
    stopped: list[str] = field(default_factory=list)  # running when a signal stopped the run
    signal: int | None = None  # the signal that stopped the run

    @property
    def exit_code(self) -> int:
        if self.signal is not None:
            return 128 + self.signal
        return 1 if self.failed else ExitCode.LEASE_HELD if self.busy else 0


class _Signalled(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def train_command(cell: Cell, store_url: str, *, data_root: str, threads: int, nproc: int = 1,
                  extra: Sequence[str] = ()) -> list[str]:
    """The command line that trains ``cell``: the same entrypoint a pod runs, its progress as JSON lines."""
    tail = ["train", "--cell", cell.to_json(), "--store", store_url, "--data-root", data_root,
            "--threads", str(threads), "--progress", "json", *extra]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "critbatch.jobs.cli", *tail]
    return [sys.executable, "-m", "critbatch.jobs.cli", *tail]


def pending_cells(cells: Sequence[Cell], store: Store) -> tuple[list[Cell], list[Cell], dict[str, str]]:
    """Split cells into (to run, finished, {id: what is wrong and how its trainer repairs it} of the damaged
    ones, which are among those to run)."""
    todo, finished, damaged = [], [], {}
    by_sweep: dict[str, list[Cell]] = {}
    for cell in cells:
        by_sweep.setdefault(cell.sweep, []).append(cell)
    for sweep, members in by_sweep.items():
        states = sweep_states(store, sweep, [c.id for c in members])
        for cell in members:
            state = states[cell.id]
            (finished if state.finished else todo).append(cell)
            if state.state == DAMAGED:
                repair = "writing its cell.json again" if state.record_only(cell.id) else "training it again"
                damaged[cell.id] = f"{'; '.join(state.problems)}: {repair}"
    return todo, finished, damaged


def run_cells(
    cells: Sequence[Cell],
    store: Store,
    *,
    parallel: int = 1,
    data_root: str = "~/.cache/critbatch/data",
    log_dir: str | os.PathLike[str] | None = None,
    nproc: int | Mapping[str, int] = 1,
    show_progress: bool | None = None,
    label: str = "cells",
    extra_args: Sequence[str] = (),
) -> RunResult:
    """Train every unfinished cell of ``store`` (already checked), ``parallel`` at a time; return what happened.

    ``nproc``: processes per cell, for all of them or by cell id (each cell's plan: ``grid.plan(cell).world``).

    Ctrl-C: the trainers checkpoint and stop, then KeyboardInterrupt is raised again.
    """
    if parallel < 1:
        raise ConfigError(f"--parallel: must be at least 1, got {parallel}")
    store_url = store.url
    todo, finished, damaged = pending_cells(cells, store)
    result = RunResult(skipped=[c.id for c in finished])
    logs = Path(log_dir) if log_dir else _default_log_dir(store_url)
    logs.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    slots = min(parallel, max(1, len(todo)))
    procs = (lambda cell: nproc.get(cell.id, 1)) if isinstance(nproc, Mapping) else (lambda cell: nproc)
    threads = max(1, cpus // (slots * max((procs(c) for c in todo), default=1)))
    if show_progress is None:
        show_progress = sys.stderr.isatty()

    queue = deque(CellRun(c, logs / f"{c.sweep}-{c.id}.log") for c in todo)
    running: list[CellRun] = []
    bases = _BaseWatch(store, cells, finished)
    bar = _Bar(len(cells), len(finished), label, show_progress)
    if finished:
        bar.note(f"{len(finished)} of {len(cells)} {label} already done (their _SUCCESS exists): skipped")
    for cell_id, why in damaged.items():
        bar.note(f"damaged {cell_id}: {why}")

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               **{DIE_WITH_PARENT_ENV: "1"})
    handlers = _catch_signals()
    try:
        while queue or running:
            while queue and len(running) < slots:
                run, verdict = bases.next_ready(queue)
                if run is None:
                    break  # every queued cell is a branch whose base has not reached its point yet
                if verdict is not None:
                    _held_back(run, verdict, result, bar)
                    bases.outcome[run.cell.id] = run.status
                    continue
                holder = live_holder(store, cell_prefix(run.cell.sweep, run.cell.id))
                if holder is not None:
                    _busy(run, result, bar, holder.describe())
                    bases.outcome[run.cell.id] = "busy"
                    continue
                run.log_file = open(run.log_path, "ab")
                cmd = train_command(run.cell, store_url, data_root=data_root, threads=threads,
                                    nproc=procs(run.cell),
                                    extra=extra_args)
                # A session of its own: Ctrl-C reaches the executor alone, which forwards it as SIGTERM.
                run.proc = subprocess.Popen(cmd, stdout=run.log_file, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=preexec())
                run.started = time.monotonic()
                run.status = "running"
                running.append(run)
            time.sleep(0.2)
            for run in list(running):
                _read_progress(run)
                code = run.proc.poll()
                if code is None:
                    continue
                running.remove(run)
                run.log_file.close()
                run.returncode = code
                bases.outcome[run.cell.id] = "done" if code == 0 else "failed"
                took = time.monotonic() - run.started
                holder = None if code == 0 else live_holder(store, cell_prefix(run.cell.sweep, run.cell.id))
                if code == 0:
                    run.status = "done"
                    result.done.append(run.cell.id)
                    bar.note(f"done   {run.cell.sweep}/{run.cell.id} ({_describe(run.cell)}) in {took:.0f} s")
                elif code == ExitCode.LEASE_HELD or holder is not None:
                    _busy(run, result, bar, holder.describe() if holder else "held by another trainer")
                    bases.outcome[run.cell.id] = "busy"
                    continue
                else:
                    run.status = "failed"
                    result.failed.append(run.cell.id)
                    bar.note(f"FAILED {run.cell.sweep}/{run.cell.id} ({_describe(run.cell)}), exit code {code}; "
                             f"log: {run.log_path}\n" + "\n".join(f"    | {line}" for line in run.tail()))
                bar.advance()
            bar.show_running(running)
    except (KeyboardInterrupt, _Signalled) as stop:
        name = "Ctrl-C" if isinstance(stop, KeyboardInterrupt) else str(stop)
        bar.note(f"{name}: asking {len(running)} running cells to checkpoint and stop ...")
        _stop(running, result)
        if isinstance(stop, KeyboardInterrupt):
            raise
        result.signal = stop.signum
    finally:
        # Any other way out (an exception): no trainer outlives the executor.
        for run in running:
            if run.proc.poll() is None:
                _signal(run.proc, signal.SIGKILL)
                run.proc.wait()
        _restore_signals(handlers)
        bar.close()
    return result


class _BaseWatch:
    """Which queued cell may start: any but a branch whose base (a cell of this run) has neither finished nor
    written the kept checkpoint the branch starts from. ``outcome``: the run's verdict per cell id so far."""

    def __init__(self, store: Store, cells: Sequence[Cell], finished: Sequence[Cell]):
        self.store = store
        self.in_run = {c.id for c in cells}
        self.outcome: dict[str, str] = {c.id: "done" for c in finished}
        self._seen: set[str] = set()  # branches whose base checkpoint is there
        self._looked: dict[str, float] = {}  # branch id -> when the store was last asked

    def next_ready(self, queue: deque) -> tuple[CellRun | None, str | None]:
        """The first queued cell that may start, taken from the queue, with None; or one that never will, with
        why (its base failed or is busy); (None, None) while each waits."""
        for run in list(queue):
            verdict = self._verdict(run.cell)
            if verdict != "wait":
                queue.remove(run)
                return run, None if verdict == "go" else verdict
        return None, None

    def _verdict(self, cell: Cell) -> str:
        if cell.branch is None or cell.branch.base not in self.in_run:
            return "go"  # a base outside this run: the trainer waits for it (--base-wait)
        base = cell.branch.base
        state = self.outcome.get(base)
        if state == "done" or cell.id in self._seen:
            return "go"
        if state in ("failed", "busy", "stopped"):
            return f"its base {base} {'is held by another trainer' if state == 'busy' else state}"
        now = time.monotonic()
        if now - self._looked.get(cell.id, -BASE_POLL_S) < BASE_POLL_S:
            return "wait"
        self._looked[cell.id] = now
        size = cell.train_size()
        if size is None:
            return "wait"  # its point's step depends on the data: wait for the base to finish
        key = f"{checkpoint_dir(cell_prefix(cell.sweep, base), branch_start(cell, size))}/{CHECKPOINT_COMPLETE}"
        if self.store.exists(key):
            self._seen.add(cell.id)
            return "go"
        return "wait"


def _held_back(run: CellRun, why: str, result: RunResult, bar: "_Bar") -> None:
    """A branch not started because of its base: busy with a busy base, else failed."""
    if "held by another trainer" in why:
        _busy(run, result, bar, f"not started: {why}")
        return
    run.status = "failed"
    result.failed.append(run.cell.id)
    bar.note(f"FAILED {run.cell.sweep}/{run.cell.id} ({_describe(run.cell)}): not started, {why}")
    bar.advance()


def _busy(run: CellRun, result: RunResult, bar: "_Bar", holder: str) -> None:
    run.status = "busy"
    result.busy.append(run.cell.id)
    bar.note(f"busy   {run.cell.sweep}/{run.cell.id} ({_describe(run.cell)}): {holder}; left to it")
    bar.advance()


def _stop(running: list[CellRun], result: RunResult) -> None:
    """SIGTERM to every trainer (each checkpoints), wait up to STOP_GRACE_S in all, then SIGKILL."""
    for run in running:
        _signal(run.proc, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for run in list(running):
        try:
            run.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(run.proc, signal.SIGKILL)
            run.proc.wait()
        run.status = "stopped"
        result.stopped.append(run.cell.id)
        running.remove(run)


def _catch_signals() -> dict[int, object]:
    """SIGTERM and SIGHUP raise _Signalled in the main loop (in the main thread; elsewhere nothing changes)."""
    def handler(signum, frame):  # noqa: ARG001 - signal API
        raise _Signalled(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            break
    return previous


def _restore_signals(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _default_log_dir(store_url: str) -> Path:
    if store_url.startswith("s3://"):
        return Path("critbatch-logs")
    return Path(store_url.removeprefix("file://")).expanduser() / ".logs"


def _describe(cell: Cell) -> str:
    branch = "" if cell.branch is None else \
        f" branch of {cell.branch.base} {cell.branch.point} x{cell.branch.multiplier} seed={cell.branch.seed}"
    ramp = "" if cell.ramp is None else f" ramp to {cell.ramp.phases[-1].batch}"
    return f"{cell.dataset.name} {cell.model} {cell.strategy} m={cell.batch_size}{ramp} seed={cell.seed}{branch}"


def _read_progress(run: CellRun) -> None:
    """The latest progress the cell reported: the last JSON line (``--progress json``) near the end of its log."""
    try:
        with open(run.log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - PROGRESS_TAIL_BYTES))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return
    for line in reversed(lines):
        if not line.startswith("{"):
            continue
        try:
            report = json.loads(line)
            run.progress = (int(report["step"]), int(report["total"]))
        except (ValueError, KeyError, TypeError):  # a line cut by the tail, or another program's JSON
            continue
        run.loss = report.get("loss")
        return


class _Bar:
    """A progress bar over cells with one status line per running cell (plain lines off a terminal)."""

    def __init__(self, total: int, initial: int, label: str, enabled: bool):
        self.enabled = enabled
        self.last_plain = 0.0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=label, unit="cell", file=sys.stderr,
                            dynamic_ncols=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show_running(self, running: list[CellRun]) -> None:
        parts = []
        for run in running:
            if run.progress:
                step, total = run.progress
                loss = "-" if run.loss is None else f"{run.loss:.4g}"
                parts.append(f"m={run.cell.batch_size} {run.cell.strategy} {step}/{total} loss {loss}")
            else:
                parts.append(f"m={run.cell.batch_size} {run.cell.strategy} starting")
        text = " | ".join(parts)
        if self.bar is not None:
            self.bar.set_postfix_str(text[:120], refresh=True)
        elif running and time.monotonic() - self.last_plain > 30:
            self.last_plain = time.monotonic()
            print(f"running: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_sweep_spec(store: Store, sweep: str, text: str) -> None:
    """``<sweep>/sweep.yaml``: the grid spec as expanded, for the report's provenance."""
    store.put_text(f"{sweep}/sweep.yaml", text)


def cli_run(args) -> int:
    from ..sweep.grid import load_grid

    if args.parallel < 1:
        raise ConfigError(f"--parallel: must be at least 1, got {args.parallel}")
    grid = load_grid(args.grid)
    cells = grid.cells()
    if args.log_dir:
        output_dir(args.log_dir, "--log-dir")
    # The grid's store when it is a local one (an s3:// store is the cluster's, and the grid's default).
    store_url = args.store or (grid.store if not grid.store.startswith("s3://") else DEFAULT_STORE)
    store = open_store(store_url)
    store.check()
    write_sweep_spec(store, grid.sweep, grid.sweep_yaml())
    # A cell sized for several devices runs as many processes on this machine under torchrun (gloo on the CPU).
    nproc = {c.id: grid.plan(c).world for c in cells}
    most = max(nproc.values(), default=1)
    print(f"critbatch run: {len(cells)} cells of sweep {grid.sweep!r} -> {store.url} "
          f"({args.parallel} at a time{f', up to {most} processes each' if most > 1 else ''})", file=sys.stderr)
    result = run_cells(cells, store, parallel=args.parallel, data_root=args.data_root, log_dir=args.log_dir,
                       nproc=nproc, label=grid.sweep,
                       extra_args=["--checkpoint-seconds", repr(float(grid.checkpoint_seconds))])
    print(f"critbatch run: {len(result.done)} trained, {len(result.skipped)} already done, "
          f"{len(result.failed)} failed" + (f", {len(result.busy)} busy elsewhere (run again once they finish)"
                                            if result.busy else "")
          + (f", {len(result.stopped)} stopped by {signal.Signals(result.signal).name} after a checkpoint"
             if result.signal is not None else ""), file=sys.stderr)
    return result.exit_code
