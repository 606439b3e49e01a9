"""Synthetic sweeps in the real log format, with a known answer for every cell.

Each cell's training loss follows ``L(k) = a * exp(-k / tau)`` with

    tau(m) = tau0 * (1 + B_crit / m) * trial_factor * seed_factor

so the steps to any threshold eps are ``k(m; eps) = tau(m) * ln(a / eps)``:
McCandlish et al.'s ``k(m) = S_min * (1 + B_crit / m)`` holds exactly, with
``S_min = tau0 * ln(a / eps)``, at every eps (design section 6). The
evaluations sit on the sweep's shared log-spaced grid; since ``log L`` is
linear in k, interpolating ``log loss`` between two evaluations recovers k
exactly. Seeds add a small known multiplicative factor to tau.

Everything is written as a cell writes it (design section 5): ``cell.json``,
``steps``/``evals`` parts (Arrow IPC files of ``flush_steps`` rows), and
``_SUCCESS`` last. Columns are built whole with numpy, so a benchmark sweep of
10^8 step rows is generated in minutes.

The faults the analysis must survive are options (a diverged cell, a cell that
is still running) or functions applied afterwards (:func:`corrupt_part`,
:func:`truncate_part`, :func:`remove_success`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from critbatch.jobs.cell.optimizers import SGDOptions
from critbatch.jobs.cell.spec import Cell, DatasetSpec, EvalSpec, NoiseSpec
from critbatch.jobs.cell.logschema import (
    EVALS_SCHEMA,
    STATUS_DIVERGED,
    STATUS_DONE,
    STEPS_SCHEMA,
    TASK_METRIC,
    part_key,
    success_summary,
    table_to_ipc,
)
from critbatch.jobs.store import LocalStore, Store
from critbatch.jobs.cell.layout import cell_prefix, success_key

#: Initial loss of every synthetic cell (a in L(k) = a exp(-k / tau)).
LOSS_0 = 2.0


@dataclass(frozen=True)
class GroupSpec:
    """One speedup curve: everything but batch size, seed and the trial metaparameters is fixed."""

    dataset: str = "cifar10"
    model: str = "resnet34"
    strategy: str = "blr"
    fraction: float = 1.0
    tau0: float = 20.0  # steps per e-fold of the loss at infinite batch size
    b_crit: float = 256.0  # McCandlish's B_crit: k(m) = S_min (1 + B_crit / m)
    base_lrs: tuple[float, ...] = (0.1,)  # one trial per value
    trial_factors: tuple[float, ...] = (1.0,)  # multiplies tau per trial (the smallest wins)
    b_noise: float | None = None  # the B_simple the noise columns encode; None: not measured
    test_gap: float = 0.05  # test loss = train loss + test_gap * log2(m / m_min) + 0.1
    acc_top: float = 0.93  # final test accuracy at the smallest batch size
    acc_drop: float = 0.01  # accuracy lost per doubling of the batch size


@dataclass
class SyntheticCell:
    """The truth behind one generated cell."""

    id: str
    group: int
    batch_size: int
    seed: int
    trial: int
    base_lr: float
    tau: float
    total_steps: int  # steps planned (the budget)
    last_step: int  # steps written (< total_steps for a diverged or incomplete cell)
    eval_steps: np.ndarray
    step_time: float  # wall-clock seconds per step
    status: str  # done | diverged | incomplete
    test_metric: float | None
    lin_approx_error: float | None
    cell: dict

    def loss(self, step) -> np.ndarray:
        """The full-set training loss at ``step`` (the evaluations' values)."""
        return LOSS_0 * np.exp(-np.asarray(step, dtype=float) / self.tau)

    def k(self, eps: float) -> float:
        """Steps to reach ``eps`` (fractional); inf when the written steps never get there."""
        k = self.tau * math.log(LOSS_0 / eps)
        reach = self.last_step if self.status != STATUS_DIVERGED else self.last_step - 1
        return k if k <= reach else math.inf


@dataclass
class SyntheticSweep:
    name: str
    groups: list[GroupSpec]
    batch_sizes: list[int]
    seeds: list[int]
    cells: list[SyntheticCell] = field(default_factory=list)

    def find(self, *, group: int = 0, batch_size: int, seed: int | None = None, trial: int | None = None
             ) -> SyntheticCell:
        hits = [c for c in self.cells if c.group == group and c.batch_size == batch_size
                and (seed is None or c.seed == seed) and (trial is None or c.trial == trial)]
        if len(hits) != 1:
            raise LookupError(f"{len(hits)} synthetic cells match group={group} m={batch_size} seed={seed}")
        return hits[0]


def eval_grid(base_total: int, points: int) -> np.ndarray:
    """The sweep's shared log-spaced evaluation steps in [1, base_total] (without 0 and the final step)."""
    return np.unique(np.round(np.geomspace(1, base_total, points)).astype(np.int64))


def write_sweep(
    store: Store,
    name: str = "synthetic",
    *,
    groups: Iterable[GroupSpec] = (GroupSpec(),),
    batch_sizes: Iterable[int] = (16, 32, 64, 128, 256, 512, 1024, 2048),
    seeds: Iterable[int] = (0,),
    seed_noise: float = 0.0,
    epochs: float | None = 2.0,
    train_size: int = 50000,
    total_steps: int | None = None,
    eval_points: int = 60,
    train_evals: bool = True,
    minibatch_noise: float = 0.05,
    noise_every: int = 10,
    flush_steps: int = 500,
    step_time: tuple[float, float] = (0.01, 1e-4),
    diverge: dict[tuple[int, int, int], int] | None = None,
    incomplete: dict[tuple[int, int, int], int] | None = None,
    sweep_yaml: str | None = "",
    fast_local: bool = False,
) -> SyntheticSweep:
    """Write a synthetic sweep to ``store`` under ``name`` and return its truth.

    Budget: ``epochs`` over ``train_size`` examples (``ceil(epochs * n / m)``
    steps), or ``total_steps`` for every cell when given. ``seed_noise`` is
    the relative spread of tau across (batch size, seed). ``diverge`` maps
    ``(group, batch_size, seed)`` to the step whose loss becomes NaN (the
    cell then ends, status diverged); ``incomplete`` to the last step written
    before the cell stopped without ``_SUCCESS``. ``train_evals=False`` writes
    test evaluations only (the analysis then falls back to the running mean of
    minibatch losses). ``sweep_yaml=None`` leaves ``sweep.yaml`` out;
    ``fast_local`` writes a LocalStore's files without fsync (benchmarks).
    """
    groups = list(groups)
    batch_sizes = sorted(int(m) for m in batch_sizes)
    seeds = list(seeds)
    diverge = diverge or {}
    incomplete = incomplete or {}
    sweep = SyntheticSweep(name, groups, batch_sizes, seeds)
    put = _fast_put(store) if fast_local and isinstance(store, LocalStore) else store.put_bytes
    m_min = batch_sizes[0]

    def budget(m: int) -> int:
        if total_steps is not None:
            return int(total_steps)
        return int(math.ceil(epochs * train_size / m))

    grid = eval_grid(budget(m_min), eval_points)
    if sweep_yaml is not None:
        store.put_text(f"{name}/sweep.yaml", sweep_yaml or _describe(name, groups, batch_sizes, seeds))

    for gi, spec in enumerate(groups):
        for m in batch_sizes:
            for seed in seeds:
                # One seeded factor per (group, m, seed), shared by all trials of the cell.
                rng = np.random.default_rng([gi, m, seed, 7])
                seed_factor = 1.0 + seed_noise * float(rng.standard_normal())
                for ti, base_lr in enumerate(spec.base_lrs):
                    tau = spec.tau0 * (1.0 + spec.b_crit / m) * spec.trial_factors[ti] * seed_factor
                    cell = _cell(name, spec, m, m_min, seed, base_lr, train_size, epochs, total_steps,
                                 eval_points, noise_every if spec.b_noise else 0)
                    total = budget(m)
                    last, status = total, STATUS_DONE
                    if (gi, m, seed) in diverge:
                        last, status = min(total, diverge[gi, m, seed]), STATUS_DIVERGED
                    if (gi, m, seed) in incomplete:
                        last, status = min(total, incomplete[gi, m, seed]), "incomplete"
                    evals = np.concatenate([[0], grid[grid < last], [last] if status == STATUS_DONE else []])
                    if status == "incomplete":
                        evals = np.concatenate([[0], grid[grid <= last]])
                    truth = SyntheticCell(
                        id=cell.id, group=gi, batch_size=m, seed=seed, trial=ti, base_lr=base_lr, tau=tau,
                        total_steps=total, last_step=last, eval_steps=np.unique(evals).astype(np.int64),
                        step_time=step_time[0] + step_time[1] * m, status=status,
                        test_metric=None, lin_approx_error=None, cell=cell.to_dict(),
                    )
                    if status == STATUS_DONE:
                        truth.test_metric = spec.acc_top - spec.acc_drop * math.log2(m / m_min)
                        truth.lin_approx_error = 0.01 * (m / m_min) ** 0.8
                    _write_cell(put, store, name, cell, spec, truth, rng, train_size, train_evals,
                                minibatch_noise, noise_every, flush_steps, m_min)
                    sweep.cells.append(truth)
    return sweep


def _cell(name, spec, m, m_min, seed, base_lr, train_size, epochs, total_steps, eval_points, noise_every) -> Cell:
    return Cell(
        dataset=DatasetSpec(name=spec.dataset, fraction=spec.fraction, max_train=train_size),
        model=spec.model,
        strategy=spec.strategy,
        batch_size=m,
        base_lr=base_lr,
        base_batch=m_min,
        epochs=float(epochs or 1.0),
        sweep=name,
        seed=seed,
        optimizer=SGDOptions(),
        eval=EvalSpec(points=eval_points),
        noise=NoiseSpec(every=noise_every),
        max_steps=total_steps,
    )


def _write_cell(put, store, name, cell, spec, truth, rng, train_size, train_evals, minibatch_noise,
                noise_every, flush_steps, m_min) -> None:
    prefix = cell_prefix(name, cell.id)
    m, n_rows = truth.batch_size, truth.last_step
    task = cell.task
    doc = {**cell.to_dict(), "id": cell.id, "code_version": "synthetic", "derived": {"train_size": train_size},
           "created": "2026-01-01T00:00:00Z"}
    put(f"{prefix}/cell.json", json.dumps(doc, indent=1).encode())

    # ---- steps, column-wise -------------------------------------------------
    step = np.arange(1, n_rows + 1, dtype=np.int64)
    clean = truth.loss(step)
    train_loss = clean * np.exp(minibatch_noise * rng.standard_normal(n_rows))
    if truth.status == STATUS_DIVERGED:
        train_loss[-1] = math.nan
    measured = np.zeros(n_rows, dtype=bool)
    if spec.b_noise and noise_every:
        measured[noise_every - 1::noise_every] = True
    # |G|^2 follows the loss and tr(Sigma) = b_noise * |G|^2, so B_simple over any window is b_noise; the
    # norms are their expectations for batches drawn without replacement from train_size examples.
    g2 = clean
    trace = spec.b_noise * g2 if spec.b_noise else g2
    b_small, b_big = max(1, m // 2), m
    fpc = lambda b: (train_size - b) / (b * (train_size - 1))  # noqa: E731
    cols = {
        "cell_id": pa.array([cell.id] * n_rows, pa.string()),
        "step": step,
        "epoch": step * m / train_size,
        "samples_seen": step * m,
        "lr": np.full(n_rows, truth.base_lr),
        "train_loss": train_loss,
        "wall_time_s": step * truth.step_time,
        "noise_b_small": pa.array(np.full(n_rows, b_small, np.int64), mask=~measured),
        "noise_b_big": pa.array(np.full(n_rows, b_big, np.int64), mask=~measured),
        "noise_g_small_sq": pa.array(g2 + trace * fpc(b_small), mask=~measured),
        "noise_g_big_sq": pa.array(g2 + trace * fpc(b_big), mask=~measured),
    }
    steps = pa.table({k: cols[k] for k in STEPS_SCHEMA.names}, schema=STEPS_SCHEMA)
    for index, start in enumerate(range(0, n_rows, flush_steps)):
        put(part_key(prefix, "steps", index), table_to_ipc(steps.slice(start, flush_steps)))

    # ---- evals --------------------------------------------------------------
    ev = truth.eval_steps
    train = truth.loss(ev)
    gap = spec.test_gap * math.log2(m / m_min) + 0.1
    test = train + gap
    metric = TASK_METRIC[task]
    final_acc = truth.test_metric if truth.test_metric is not None else spec.acc_top
    # Accuracy climbs from chance to its final value as the loss falls.
    test_value = final_acc - (final_acc - 0.1) * train / LOSS_0 if metric == "accuracy" else np.exp(test)
    if metric == "none":
        test_value = np.full(len(ev), math.nan)
    blocks = []
    if train_evals:
        blocks.append((ev, "train", train, test_value))
    blocks.append((ev, "test", test, test_value))
    rows = {"cell_id": [], "step": [], "epoch": [], "split": [], "loss": [], "metric": [], "value": []}
    for steps_, split, loss, value in blocks:
        rows["cell_id"] += [cell.id] * len(steps_)
        rows["step"] += steps_.tolist()
        rows["epoch"] += (steps_ * m / train_size).tolist()
        rows["split"] += [split] * len(steps_)
        rows["loss"] += loss.tolist()
        rows["metric"] += [metric] * len(steps_)
        rows["value"] += value.tolist()
    evals = pa.table(rows, schema=EVALS_SCHEMA)
    put(part_key(prefix, "evals", 0), table_to_ipc(evals))

    if truth.status == "incomplete":
        return
    final = {
        "train_loss": None if truth.status == STATUS_DIVERGED else float(train[-1]),
        "test_loss": None if truth.status == STATUS_DIVERGED else float(test[-1]),
        "metric": metric,
        "test_metric": truth.test_metric,
        "lin_approx_error": truth.lin_approx_error,
    }
    summary = success_summary(
        cell_id=cell.id, status=truth.status, steps=n_rows, samples_seen=n_rows * m,
        wall_time_s=n_rows * truth.step_time, final=final, code_version="synthetic",
        reason=f"loss is nan at step {n_rows}" if truth.status == STATUS_DIVERGED else None,
    )
    put(success_key(name, cell.id), json.dumps(summary).encode())


def _fast_put(store: LocalStore):
    root = Path(store.root)
    made: set[Path] = set()

    def put(key: str, data: bytes) -> None:
        path = root / key
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        with open(path, "wb") as fh:
            fh.write(data)

    return put


def _describe(name, groups, batch_sizes, seeds) -> str:
    lines = [f"sweep: {name}", "# synthetic sweep: L(k) = 2 exp(-k / tau), tau = tau0 (1 + B_crit / m)"]
    lines.append(f"batch_size: {batch_sizes}")
    lines.append(f"seed: {seeds}")
    for spec in groups:
        lines.append(f"- {{dataset: {spec.dataset}, model: {spec.model}, strategy: {spec.strategy}, "
                     f"fraction: {spec.fraction}, tau0: {spec.tau0}, b_crit: {spec.b_crit}}}")
    return "\n".join(lines) + "\n"


# ---- faults, applied after writing ---------------------------------------------

def corrupt_part(store: Store, key: str) -> None:
    """Replace a part with bytes that are not an Arrow file."""
    store.put_bytes(key, b"this is not an arrow file" * 10)


def truncate_part(store: Store, key: str, keep: float = 0.5) -> None:
    """Cut a part to ``keep`` of its bytes (an upload that stopped half-way)."""
    data = store.get_bytes(key)
    store.put_bytes(key, data[: int(len(data) * keep)])


def remove_success(store: Store, sweep: str, cell_id: str) -> None:
    """Make a finished cell look like one still running."""
    store.delete(success_key(sweep, cell_id))


# ---- steps to threshold without logs: the fit's coverage ---------------------------

@dataclass
class CensoredSweep:
    """Per-seed steps to threshold of one synthetic speedup curve, with the truth behind them."""

    b_crit: float
    s_min: float
    rows: list[dict]  # cell-crossing rows as analysis.compute.steps_to_threshold writes them


def censored_sweep(rng: np.random.Generator, *, seeds: int = 3, noise: float = 0.15,
                   batch_sizes: Iterable[int] = tuple(2 ** i for i in range(2, 15)),
                   b_range: tuple[float, float] = (64.0, 512.0), cut: tuple[float, float] = (4.0, 16.0),
                   group: str = "synthetic", threshold: str = "q25") -> CensoredSweep:
    """k = S_min (1 + B/m) exp(noise z) per seed, censored by an epoch budget that cuts off the largest m.

    B is drawn log-uniformly from ``b_range`` (inside the batch sizes), S_min
    from [50, 500]; the budget is the same number of examples for every batch
    size, enough for m up to ``cut`` x B (drawn log-uniformly), so the largest
    batch sizes run out of steps before they reach eps, some seeds of the
    batch size at the edge too. A censored seed's bound is its budget.
    """
    ms = sorted(int(m) for m in batch_sizes)
    b = math.exp(rng.uniform(*np.log(b_range)))
    s_min = math.exp(rng.uniform(math.log(50.0), math.log(500.0)))
    examples = s_min * (b * math.exp(rng.uniform(*np.log(cut))) + b)
    rows = []
    for m in ms:
        budget = examples / m
        for seed in range(seeds):
            k = s_min * (1 + b / m) * math.exp(noise * rng.standard_normal())
            reached = k <= budget
            rows.append({"group": group, "threshold": threshold, "cell_id": f"m{m}-s{seed}", "batch_size": m,
                         "seed": seed, "trial": "", "use": "reached" if reached else "censored",
                         "k": k if reached else math.nan, "k_bound": math.nan if reached else budget,
                         "wall_s": math.nan, "samples": m * k if reached else math.nan})
    return CensoredSweep(b, s_min, rows)
