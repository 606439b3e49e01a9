"""Load: a sweep's logs in the store, reduced one cell at a time to small summaries.

A cell's step log can hold 10^5 rows or more, and a sweep 10^3 cells, so the
rows are never held together: each cell's parts are read, deduplicated on
step (a later part wins, as after a resume), reduced to a few curves of at
most a few thousand points (:class:`CellSummary`), and dropped. Cells are
reduced in a thread pool, which hides S3 latency (or, for a large local
sweep, a process pool, which uses every core); memory stays at one cell's
rows per worker plus the summaries.

What cannot be read is skipped and named: a part that is not a whole Arrow
file (corrupt, truncated), a cell without ``cell.json``. A cell without
``_SUCCESS`` is loaded with status ``incomplete``; the compute step decides
where such cells count.
"""

from __future__ import annotations

import functools
import os
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.cell.inputs import decode
from critbatch.jobs.cell.layout import cell_prefix, success_key
from critbatch.jobs.cell.logschema import (
    EVALS_SCHEMA,
    STATUS_DIVERGED,
    STEPS_SCHEMA,
    TASK_METRIC,
    ipc_to_table,
    part_index,
)
from critbatch.jobs.store import LocalStore, S3Store, Store
from critbatch.jobs.store.cellstate import RECORD, parse_success, read_record

from .noise import NoiseTrace, gns_components

#: Points of a cell's dense log-spaced grid: consecutive steps differ by at most 0.5 %, so a threshold
#: crossing read off the running mean of minibatch losses is within 0.5 % of the step where it happens.
GRID_RATIO = 1.005

INCOMPLETE = "incomplete"
#: From this many cells on, a local store's cells are reduced in one process per CPU.
PROCESS_MIN_CELLS = 64

_STEP_COLUMNS = ("step", "samples_seen", "train_loss", "wall_time_s",
                 "noise_b_small", "noise_b_big", "noise_g_small_sq", "noise_g_big_sq")
_EVAL_COLUMNS = ("step", "split", "loss", "metric", "value")


@dataclass
class Curve:
    """A loss (or metric) curve: values at increasing steps."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class Skipped:
    """Something that was not used, and why."""

    key: str
    reason: str


@dataclass
class CellSummary:
    """Everything the compute step needs from one cell, in a few kilobytes."""

    id: str
    sweep: str
    cell: dict[str, Any]  # Cell.to_dict()
    derived: dict[str, Any]
    code_version: str
    status: str  # done | diverged | reached (stopped at its threshold) | incomplete
    success: dict[str, Any] | None
    train_eval: Curve | None  # train-split evaluations (full-set or cell.eval.train_subset examples)
    test_eval: Curve | None  # test-split losses
    test_metric: Curve | None  # test-split task metric (accuracy, perplexity, mIoU)
    metric: str  # its name; "none" for regression
    running_mean: Curve | None  # running mean of minibatch losses on the dense grid
    grid_steps: np.ndarray  # the dense grid (steps present in the log)
    grid_wall: np.ndarray  # wall_time_s there
    grid_samples: np.ndarray  # samples_seen there
    last_step: int  # the last step logged (steps or evals)
    diverged_at: int | None  # first step whose minibatch loss is not finite
    noise_points: int  # steps with gradient-noise statistics
    noise: NoiseTrace | None  # their estimates of |G|^2 and tr(Sigma) (None without)
    duplicates: int = 0  # step rows dropped as duplicates
    step_rows: int = 0  # distinct steps logged (the audit compares them with _SUCCESS's steps)
    eval_rows: int = 0  # eval rows logged (... with _SUCCESS's manifest)
    notes: list[str] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return int(self.cell["batch_size"])

    @property
    def seed(self) -> int:
        return int(self.cell["seed"])

    @property
    def task(self) -> str:
        return _task(self.cell)


def _task(cell: dict[str, Any]) -> str:
    from critbatch.jobs.cell.spec import DATASETS

    return DATASETS.get(cell["dataset"]["name"], {}).get("task", "imported")


@dataclass
class Loaded:
    """The reduced sweeps: summaries of every readable cell, and what was skipped."""

    store_url: str
    sweeps: list[str]
    sweep_yaml: dict[str, str | None]
    cells: list[CellSummary]
    skipped: list[Skipped]
    window: int

    @property
    def incomplete(self) -> list[CellSummary]:
        return [c for c in self.cells if c.status == INCOMPLETE]


def load_sweeps(store: Store, sweeps: list[str], *, window: int = 50, workers: int | None = None,
                processes: bool | None = None, warn: Callable[[str], None] | None = None) -> Loaded:
    """Read and reduce every cell of ``sweeps``.

    A sweep with no cell at all is a :class:`ConfigError` (the name or the
    store is probably wrong). ``warn`` receives one line per skipped item.
    Cells are reduced by ``workers`` threads (S3: 16), or by one process per
    CPU for a local store of ``PROCESS_MIN_CELLS`` cells or more
    (``processes`` forces either way).
    """
    if window < 1:
        raise ConfigError(f"--window: must be a positive number of steps, got {window}")
    problems, jobs, yaml, unreadable = [], [], {}, []
    for sweep in sweeps:
        by_cell: dict[str, dict[str, int]] = {}
        for key, size in store.sizes(f"{sweep}/cells/").items():
            parts = key.split("/")
            if len(parts) >= 4:
                by_cell.setdefault(parts[2], {})[key] = size
        if not by_cell:
            problems.append(f"--sweep {sweep}: no cells under {store.join(sweep + '/cells/')}; "
                            f"check the sweep name and --store")
            continue
        try:
            yaml[sweep] = decode(store.get_bytes(f"{sweep}/sweep.yaml"), store.join(f"{sweep}/sweep.yaml"))
        except KeyError:
            yaml[sweep] = None
        except ConfigError as err:  # damaged: named, and treated as missing
            yaml[sweep] = None
            unreadable.append(Skipped(f"{sweep}/sweep.yaml", f"{err}; treated as missing"))
        jobs.extend((sweep, cell_id, cell_keys) for cell_id, cell_keys in sorted(by_cell.items()))
    if problems:
        raise ConfigError(problems)

    cpus = available_cpus()
    if processes is None:
        processes = isinstance(store, LocalStore) and len(jobs) >= PROCESS_MIN_CELLS and cpus > 1
    if processes:
        # Decoding a cell's parts is mostly Python per part, which holds the GIL: processes use every core.
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["critbatch.analysis.load"])
        with ProcessPoolExecutor(max_workers=workers or cpus, mp_context=ctx) as pool:
            results = list(pool.map(_load_job, [(store, *job, window) for job in jobs], chunksize=4))
    else:
        # Threads hide S3 latency (the GIL is released while waiting on the network).
        workers = workers or (16 if isinstance(store, S3Store) else cpus)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(lambda job: load_cell(store, *job, window=window), jobs))

    cells, skipped, seen = [], unreadable, {}
    for summary, skips in results:
        skipped.extend(skips)
        if summary is None:
            continue
        if summary.id in seen:  # the same cell in two sweeps analysed together: count it once
            skipped.append(Skipped(f"{summary.sweep}/cells/{summary.id}",
                                   f"the same cell as {seen[summary.id]}/cells/{summary.id}, already loaded"))
            continue
        seen[summary.id] = summary.sweep
        cells.append(summary)
    for item in skipped:
        if warn:
            warn(f"skipped {item.key}: {item.reason}")
    return Loaded(store.url, list(sweeps), yaml, cells, skipped, window)


def available_cpus() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:  # not on Linux
        return max(1, min(os.cpu_count() or 1, 8))


def _load_job(job: tuple) -> tuple[CellSummary | None, list[Skipped]]:
    store, sweep, cell_id, keys, window = job
    return load_cell(store, sweep, cell_id, keys, window=window)


def load_cell(store: Store, sweep: str, cell_id: str, keys: Iterable[str], *, window: int = 50
              ) -> tuple[CellSummary | None, list[Skipped]]:
    """Read one cell's files and reduce them; returns the summary (or None) and what was skipped.

    ``cell.json`` and ``_SUCCESS`` are read as every command reads them (critbatch.jobs.store.cellstate);
    a part with non-finite values where the trainer writes none is skipped as damaged.
    """
    prefix = cell_prefix(sweep, cell_id)
    skipped: list[Skipped] = []
    key_set = set(keys)
    if f"{prefix}/{RECORD}" not in key_set:
        return None, [Skipped(prefix, f"no {RECORD}")]
    try:
        doc, cell = read_record(store.get_bytes(f"{prefix}/{RECORD}"), cell_id)
    except (ValueError, KeyError) as err:
        return None, [Skipped(f"{prefix}/{RECORD}", f"not a valid cell ({str(err).splitlines()[0]})")]

    success = None
    if success_key(sweep, cell_id) in key_set:
        try:
            success = parse_success(store.get_bytes(success_key(sweep, cell_id)))
        except (ValueError, KeyError) as err:
            skipped.append(Skipped(success_key(sweep, cell_id), f"unreadable ({err}); cell treated as incomplete"))
    # The trainer writes a non-finite loss (and noise statistics) only on the step a cell diverges at.
    whole = success is not None and success["status"] != STATUS_DIVERGED
    steps = _read_parts(store, sorted(k for k in key_set if k.startswith(f"{prefix}/steps/part-")),
                        STEPS_SCHEMA, _STEP_COLUMNS, skipped,
                        finite=("wall_time_s",) + (("train_loss",) + _NOISE_COLUMNS if whole else ()))
    evals = _read_parts(store, sorted(k for k in key_set if k.startswith(f"{prefix}/evals/part-")),
                        EVALS_SCHEMA, _EVAL_COLUMNS, skipped, finite=("loss",) if whole else ())
    doc["id"] = cell_id
    summary = reduce_cell(doc, cell, success, steps, evals, sweep=sweep, window=window)
    return summary, skipped


def _read_parts(store: Store, keys: list[str], schema: pa.Schema, columns: tuple[str, ...],
                skipped: list[Skipped], finite: tuple[str, ...] = ()) -> pa.Table | None:
    """The parts' rows (in part order), with unreadable parts, and parts with non-finite values in the columns
    ``finite``, skipped and named."""
    want = pa.schema([schema.field(name) for name in columns])
    tables = []
    expected = 0
    for key in sorted(keys, key=part_index):
        index = part_index(key)
        if index != expected:
            skipped.append(Skipped(key, f"parts {expected:06d}..{index - 1:06d} are missing before it (read anyway)"))
        expected = index + 1
        try:
            table = ipc_to_table(_get(store, key))
        except KeyError:
            skipped.append(Skipped(key, "vanished while reading"))
            continue
        except (pa.ArrowInvalid, pa.ArrowException, OSError, ValueError) as err:
            skipped.append(Skipped(key, f"corrupt or truncated Arrow file ({str(err).splitlines()[0][:120]})"))
            continue
        try:
            table = table.select(columns)
            if not table.schema.equals(want):
                table = pa.table([table.column(n).cast(want.field(n).type) for n in columns], names=columns)
        except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            skipped.append(Skipped(key, f"does not follow the log schema ({str(err).splitlines()[0][:120]})"))
            continue
        bad = [name for name in finite if pc.any(pc.invert(pc.is_finite(table.column(name)))).as_py()]
        if bad:
            skipped.append(Skipped(key, f"damaged: non-finite {', '.join(bad)}, which the trainer writes only on "
                                        "the step a cell diverges at, and this one did not"))
            continue
        tables.append(table)
    if not tables:
        return None
    return pa.concat_tables(tables)


def _get(store: Store, key: str) -> bytes:
    """A part's bytes; a local store's file is read directly (the store's path checks cost more than the read)."""
    if isinstance(store, LocalStore):
        try:
            with open(os.path.join(store.url, key), "rb") as fh:
                return fh.read()
        except (FileNotFoundError, IsADirectoryError):
            raise KeyError(key) from None
    return store.get_bytes(key)


def _np(table: pa.Table, name: str, dtype=float) -> np.ndarray:
    """A column as a contiguous numpy array; nulls become NaN (floats)."""
    col = table.column(name)
    if col.null_count:
        return col.to_numpy().astype(dtype) if dtype is float else col.to_numpy()
    return np.asarray(col.to_numpy(), dtype=dtype)


def _dedupe_last(order_keys: np.ndarray) -> tuple[np.ndarray, int]:
    """Indices that sort ``order_keys`` keeping the last of equal keys; and how many were dropped.

    Already strictly increasing keys (the usual case) give ``arange`` and 0.
    """
    n = len(order_keys)
    if n == 0 or np.all(order_keys[1:] > order_keys[:-1]):
        return np.arange(n), 0
    idx = np.argsort(order_keys, kind="stable")
    s = order_keys[idx]
    keep = np.empty(n, dtype=bool)
    keep[:-1] = s[1:] != s[:-1]
    keep[-1] = True
    return idx[keep], int(n - keep.sum())


def dense_grid(steps: np.ndarray) -> np.ndarray:
    """Indices into sorted ``steps`` at targets that grow by one step or 0.5 %, whichever is more; the last kept."""
    n = len(steps)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    targets = _grid_targets(max(1, int(steps[0])), max(1, int(steps[-1])))
    idx = np.searchsorted(steps, targets, side="right") - 1  # the last logged step at or before each target
    return np.unique(np.clip(np.concatenate([idx, [n - 1]]), 0, n - 1))


@functools.lru_cache(maxsize=64)
def _grid_targets(first: int, last: int) -> np.ndarray:
    out, t = [first], first
    while t < last:
        t = min(last, max(t + 1, int(t * GRID_RATIO)))
        out.append(t)
    return np.array(out, dtype=np.int64)


#: The running mean's window at a step is at most this fraction of the rows logged so far (and at most
#: ``window`` rows): a fixed 50-step window would average over most of an early crossing's curve.
RUNNING_FRACTION = 0.25


def running_mean(loss: np.ndarray, window: int, steps: np.ndarray | None = None, at: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(window centres, means) of the minibatch losses, at every row or at the row indices ``at``.

    The window at row i holds the last min(window, max(1, RUNNING_FRACTION *
    (i + 1))) rows, and its mean is placed at the mean of their ``steps`` (row
    numbers from 1 when not given): a trailing mean describes the middle of
    its window, and placing it at the window's end delays every crossing by
    half a window. A non-finite loss makes every window that contains it
    +inf: a diverged cell's curve does not recover by averaging the divergence
    away.
    """
    loss = np.asarray(loss, dtype=float)
    steps = np.arange(1, len(loss) + 1, dtype=float) if steps is None else np.asarray(steps, dtype=float)
    bad = ~np.isfinite(loss)
    cs = np.concatenate([[0.0], np.cumsum(np.where(bad, 0.0, loss))])
    cb = np.concatenate([[0], np.cumsum(bad)])
    ct = np.concatenate([[0.0], np.cumsum(steps)])
    i = np.arange(1, len(loss) + 1) if at is None else np.asarray(at) + 1
    width = np.clip(np.floor(RUNNING_FRACTION * i), 1, window).astype(np.int64)
    lo = i - width
    mean = (cs[i] - cs[lo]) / width
    mean[(cb[i] - cb[lo]) > 0] = np.inf
    return (ct[i] - ct[lo]) / width, mean


def reduce_cell(doc: dict[str, Any], cell: dict[str, Any], success: dict[str, Any] | None,
                steps: pa.Table | None, evals: pa.Table | None, *, sweep: str, window: int) -> CellSummary:
    """One cell's rows -> its summary (pure: tables in, small arrays out)."""
    notes: list[str] = []
    status = success["status"] if success else INCOMPLETE
    last_step = 0
    diverged_at = None
    duplicates = 0
    empty = np.zeros(0)
    grid_steps, grid_wall, grid_samples, run = empty, empty, empty, None
    steps_logged = 0
    noise_points, noise = 0, None

    if steps is not None and steps.num_rows:
        step = _np(steps, "step", np.int64)
        idx, duplicates = _dedupe_last(step)
        if duplicates:
            notes.append(f"{duplicates} duplicate step rows dropped (the later part kept)")
            step = step[idx]

        def column(name: str, dtype=float) -> np.ndarray:
            values = _np(steps, name, dtype)
            return values[idx] if duplicates else values

        loss = column("train_loss")
        bad = np.flatnonzero(~np.isfinite(loss))
        if len(bad):
            diverged_at = int(step[bad[0]])
        g = dense_grid(step)
        grid_steps = step[g].astype(float)
        grid_wall = column("wall_time_s")[g]
        grid_samples = column("samples_seen", np.int64)[g].astype(float)
        run = Curve(*running_mean(loss, window, steps=step.astype(float), at=g))
        last_step = int(step[-1])
        steps_logged = len(step)
        noise_points, noise = _noise(steps, idx if duplicates else None, _train_size(doc, cell), notes)
        del step, loss

    train_eval = test_eval = test_metric = None
    metric = TASK_METRIC.get(_task(cell), "none")
    if evals is not None and evals.num_rows:
        e_step = _np(evals, "step", np.int64)
        split = np.asarray(evals.column("split").to_pylist(), dtype=object)
        names = np.asarray(evals.column("metric").to_pylist(), dtype=object)
        e_loss = _np(evals, "loss")
        value = _np(evals, "value")
        last_step = max(last_step, int(e_step.max()))
        for which in ("train", "test"):
            sel = np.flatnonzero(split == which)
            if not len(sel):
                continue
            # One loss per step: the last row written for it (rows of several metrics repeat the loss).
            keep, _ = _dedupe_last(e_step[sel])
            rows = sel[keep]
            curve = Curve(e_step[rows].astype(float), e_loss[rows])
            if which == "train":
                train_eval = curve
            else:
                test_eval = curve
                msel = sel[names[sel] == metric] if metric != "none" else np.zeros(0, dtype=np.int64)
                if len(msel):
                    keep, _ = _dedupe_last(e_step[msel])
                    test_metric = Curve(e_step[msel][keep].astype(float), value[msel][keep])
    if status == "diverged" and diverged_at is None:
        diverged_at = last_step

    return CellSummary(
        id=str(doc.get("id") or ""), sweep=sweep, cell=cell, derived=dict(doc.get("derived") or {}),
        code_version=_versions(doc), status=status, success=success,
        train_eval=train_eval, test_eval=test_eval, test_metric=test_metric, metric=metric,
        running_mean=run, grid_steps=grid_steps, grid_wall=grid_wall, grid_samples=grid_samples,
        last_step=last_step, diverged_at=diverged_at, noise_points=noise_points, noise=noise,
        duplicates=duplicates, notes=notes, step_rows=steps_logged,
        eval_rows=evals.num_rows if evals is not None else 0,
    )


def _versions(doc: dict[str, Any]) -> str:
    """The code version of cell.json, then the package and version of each plug-in the cell ran (its
    ``plugins``): the report counts cells by everything that ran them."""
    parts = [str(doc.get("code_version") or "unknown")]
    for plugin in (doc.get("plugins") or {}).values():
        parts.append(f"{plugin.get('distribution') or plugin.get('name')} {plugin.get('version') or 'unversioned'}")
    return ", ".join(dict.fromkeys(parts))  # a package that provides the model and the dataset counts once


_NOISE_COLUMNS = ("noise_g_small_sq", "noise_g_big_sq", "noise_b_small", "noise_b_big")


def _train_size(doc: dict[str, Any], cell: dict[str, Any]) -> int | None:
    """The examples the cell's batches are drawn from: the trainer's figure, else the cell's own."""
    derived = doc.get("derived") or {}
    for key in ("n_train", "train_size"):
        if isinstance(derived.get(key), (int, float)) and derived[key] > 0:
            return int(derived[key])
    try:
        return Cell.from_dict(cell).train_size()
    except ConfigError:
        return None


def _noise(steps: pa.Table, idx: np.ndarray | None, n: int | None, notes: list[str]
           ) -> tuple[int, NoiseTrace | None]:
    """(measured steps, their |G|^2 and tr(Sigma) as a trace); ``idx`` reorders/deduplicates rows when given."""
    valid = None
    for name in _NOISE_COLUMNS:
        col = steps.column(name)
        if col.null_count == len(col):
            return 0, None
        ok = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        valid = ok if valid is None else valid & ok
    if idx is not None:
        valid = valid[idx]
    rows = np.flatnonzero(valid)
    if not len(rows):
        return 0, None
    if idx is not None:
        rows = idx[rows]
    take = pa.array(rows)
    gs, gb, bs, bb = (np.asarray(steps.column(name).take(take).to_numpy(), dtype=float) for name in _NOISE_COLUMNS)
    measured = np.asarray(steps.column("step").take(take).to_numpy(), dtype=float)
    if n is None:
        notes.append("gradient noise: the training-set size is unknown; estimated without the "
                     "finite-population correction")
    try:
        g2, trace = gns_components(gs, gb, bs, bb, n=n)
    except ValueError as err:
        notes.append(f"gradient noise not used: {err}")
        return len(rows), None
    return len(rows), NoiseTrace.from_measurements(measured, g2, trace, keep=dense_grid(measured))
