"""Other studies' released measurements as sweeps in the store, so critbatch's estimators run on them.

    critbatch import shallue ./batch_science --store ./critbatch-out --sweep shallue-cifar10
    critbatch import shallue ./batch_science --workload 'cifar_10/resnet_8/*' --store S --sweep NAME
    critbatch analyze --store ./critbatch-out --sweep shallue-cifar10 --threshold 0.3

Shallue et al. (2018), "Measuring the Effects of Data Parallelism on Neural
Network Training", released every trial of their metaparameter searches in
this layout (a *workload* is a dataset, model and optimizer; a *study* one
batch size's search; a *trial* one run of it):

    <dataset>/<model>/<optimizer>/<batch_size>/study.json
    <dataset>/<model>/<optimizer>/<batch_size>/<trial_id>/metadata.json    status, parameters, steps
    <dataset>/<model>/<optimizer>/<batch_size>/<trial_id>/measurements.csv step, then one column per measure

(a few workloads sit one folder deeper, under ``mnist_subsets/`` and the
like). Each trial becomes one cell: its ``measurements.csv`` column ``--curve``
(default ``train/cross_entropy_error``) is the cell's training-loss curve (the
train-split evaluations), ``test/cross_entropy_error`` (else ``val/``) its
test loss; ``learning_rate`` and ``momentum`` are its trial fields (so the
analysis takes, per batch size, the trial with the fewest steps to the
threshold, Shallue et al.'s steps-to-result), and the trial id is its seed
(their trials have one run each). Status COMPLETE is a finished cell,
INFEASIBLE (training diverged) a diverged one, INCOMPLETE one without
``_SUCCESS`` (used only where it crossed the threshold). Every other
metaparameter and the study's budget are kept in ``derived``. Cells keep the
source's names (``cifar_10``, ``resnet_8``, ``nesterov_momentum``) and the
strategy ``tuned``; the loader reads them without critbatch's training
catalogue (critbatch.jobs.store.cellstate.read_record).

Everything is read and checked before anything is written: bad input writes
nothing.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import fnmatch
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.cell.layout import cell_prefix, success_key, sweep_problem
from critbatch.jobs.cell.logschema import EVALS_SCHEMA, part_key, success_summary, table_to_ipc
from critbatch.jobs.cell.optimizers import SGDOptions
from critbatch.jobs.cell.spec import Cell, DatasetSpec, EvalSpec, NoiseSpec
from critbatch.jobs.store import Store, open_store

SHALLUE = "shallue2018"
STATUSES = {"COMPLETE": "done", "INFEASIBLE": "diverged", "INCOMPLETE": None}
DEFAULT_CURVE = "train/cross_entropy_error"
TEST_CURVES = ("test/cross_entropy_error", "val/cross_entropy_error")


@dataclass
class Trial:
    """One trial of one study, read and checked."""

    workload: str  # dataset/model/optimizer, as the folders name it
    study: dict
    meta: dict
    steps: np.ndarray
    curve: np.ndarray
    test: np.ndarray | None
    source: str  # the trial's folder, relative to the root


@dataclass
class Imported:
    sweep: str
    cells: int
    workloads: dict[str, list[int]] = field(default_factory=dict)  # batch sizes per workload
    skipped: list[str] = field(default_factory=list)


def read_shallue(root: Path, *, curve: str = DEFAULT_CURVE, workloads: list[str] | None = None
                 ) -> tuple[list[Trial], list[str]]:
    """Every trial under ``root`` (whose workload matches one of the ``workloads`` globs, if given).

    Returns the trials and the lines naming what was skipped (a trial without
    the curve column, an unreadable file). A root with no study at all, or no
    usable trial, is a ConfigError.
    """
    if not root.is_dir():
        raise ConfigError(f"import shallue: DIR: {root} is not a directory")
    studies = sorted(root.rglob("study.json"))
    if not studies:
        raise ConfigError(f"import shallue: DIR: no study.json under {root}; expected "
                          f"<dataset>/<model>/<optimizer>/<batch_size>/study.json")
    trials, skipped = [], []
    for study_file in studies:
        workload = study_file.parent.parent.relative_to(root).as_posix()
        if workloads and not any(fnmatch.fnmatch(workload, pattern) for pattern in workloads):
            continue
        try:
            study = json.loads(study_file.read_text())
            int(study["batch_size"])
        except (ValueError, KeyError, TypeError) as err:
            skipped.append(f"{study_file.relative_to(root)}: not a study ({err})")
            continue
        for meta_file in sorted(study_file.parent.glob("*/metadata.json")):
            rel = meta_file.parent.relative_to(root).as_posix()
            try:
                trials.append(_read_trial(meta_file, workload, study, curve, rel))
            except (ValueError, KeyError, TypeError, OSError) as err:
                skipped.append(f"{rel}: {err}")
    if workloads and not trials and not skipped:
        raise ConfigError(f"import shallue: --workload: no workload under {root} matches "
                          f"{', '.join(workloads)}")
    if not trials:
        raise ConfigError([f"import shallue: no usable trial under {root}"] + [f"  {s}" for s in skipped[:10]])
    return trials, skipped


def _read_trial(meta_file: Path, workload: str, study: dict, curve: str, rel: str) -> Trial:
    meta = json.loads(meta_file.read_text())
    if meta.get("status") not in STATUSES:
        raise ValueError(f"status {meta.get('status')!r}; allowed: {', '.join(STATUSES)}")
    with open(meta_file.parent / "measurements.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "step" not in rows[0]:
        raise ValueError("measurements.csv has no step column")
    if curve not in rows[0]:
        raise ValueError(f"measurements.csv has no column {curve!r} (it has {', '.join(list(rows[0])[1:])})")
    steps = np.array([int(float(r["step"])) for r in rows], dtype=np.int64)
    order = np.argsort(steps, kind="stable")
    value = lambda r, col: float(r[col]) if r.get(col) not in (None, "") else math.nan  # noqa: E731
    test_col = next((c for c in TEST_CURVES if c in rows[0]), None)
    return Trial(
        workload=workload, study=study, meta=meta, steps=steps[order],
        curve=np.array([value(r, curve) for r in rows])[order],
        test=np.array([value(r, test_col) for r in rows])[order] if test_col else None, source=rel,
    )


def cell_of(trial: Trial, sweep: str, base_batch: int) -> dict:
    """The trial as a cell's fields: a Cell's shape and defaults, the source's names."""
    params = trial.meta.get("parameters") or {}
    optimizer = str(trial.study.get("optimizer", trial.workload.split("/")[-1]))
    momentum = float(params.get("momentum", 0.0))
    template = Cell(
        dataset=DatasetSpec(name="cifar10"), model="resnet34", strategy="blr",
        batch_size=int(trial.study["batch_size"]), base_lr=float(params.get("learning_rate", 1.0)),
        base_batch=base_batch, epochs=1.0, sweep=sweep, seed=int(trial.meta.get("trial_id", 0)),
        optimizer=SGDOptions(momentum=momentum if 0 <= momentum < 1 else 0.0, weight_decay=0.0),
        eval=EvalSpec(points=max(2, len(trial.steps)), train_subset=None), noise=NoiseSpec(every=0),
    ).to_dict()
    template["dataset"]["name"] = str(trial.study.get("dataset", trial.workload.split("/")[-3]))
    template["model"] = str(trial.study.get("model", trial.workload.split("/")[-2]))
    template["strategy"] = "tuned"
    template["optimizer"]["name"] = optimizer
    template["optimizer"]["nesterov"] = optimizer.startswith("nesterov")
    return template


def cell_id(fields: dict) -> str:
    """The id a Cell would have: the hash of its canonical JSON (sweep left out)."""
    data = {k: v for k, v in fields.items() if k != "sweep"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:10]


def write_trials(store: Store, sweep: str, trials: list[Trial], *, curve: str) -> Imported:
    """Write every trial as a cell of ``sweep``: cell.json, one evals part, and _SUCCESS when it ended."""
    out = Imported(sweep, 0)
    base = {}
    for t in trials:
        base[t.workload] = min(base.get(t.workload, 10**12), int(t.study["batch_size"]))
        out.workloads.setdefault(t.workload, [])
        if int(t.study["batch_size"]) not in out.workloads[t.workload]:
            out.workloads[t.workload].append(int(t.study["batch_size"]))
    created = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    seen: set[str] = set()
    for t in trials:
        fields = cell_of(t, sweep, base[t.workload])
        cid = cell_id(fields)
        if cid in seen:
            out.skipped.append(f"{t.source}: the same cell as another trial (same batch size and metaparameters)")
            continue
        seen.add(cid)
        params = t.meta.get("parameters") or {}
        doc = {**fields, "id": cid, "code_version": f"imported:{SHALLUE}", "created": created, "derived": {
            "imported_from": SHALLUE, "source": t.source, "trial_id": t.meta.get("trial_id"),
            "status": t.meta["status"], "parameters": params, "train_steps": t.study.get("train_steps"),
            "steps": t.meta.get("steps"), "curve": curve,
        }}
        prefix = cell_prefix(sweep, cid)
        store.put_text(f"{prefix}/cell.json", json.dumps(doc, indent=1))
        store.put_bytes(part_key(prefix, "evals", 0), table_to_ipc(_evals(cid, t)))
        status = STATUSES[t.meta["status"]]
        if status:
            last = int(t.steps[-1]) if len(t.steps) else 0
            final = {"train_loss": _last(t.curve), "test_loss": _last(t.test) if t.test is not None else None,
                     "metric": "none", "test_metric": None, "lin_approx_error": None}
            store.put_text(success_key(sweep, cid), json.dumps(success_summary(
                cell_id=cid, status=status, steps=last, samples_seen=last * fields["batch_size"],
                wall_time_s=None, final=final, code_version=f"imported:{SHALLUE}",
                reason="INFEASIBLE: training diverged" if status == "diverged" else None)))
        out.cells += 1
    store.put_text(f"{sweep}/sweep.yaml", _describe(out, curve))
    return out


def _evals(cid: str, t: Trial) -> pa.Table:
    blocks = [("train", t.curve)] + ([("test", t.test)] if t.test is not None else [])
    n = len(t.steps)
    return pa.table({
        "cell_id": [cid] * (n * len(blocks)),
        "step": np.concatenate([t.steps] * len(blocks)),
        "epoch": np.full(n * len(blocks), math.nan),
        "split": [split for split, _ in blocks for _ in range(n)],
        "loss": np.concatenate([v for _, v in blocks]),
        "metric": ["none"] * (n * len(blocks)),
        "value": np.full(n * len(blocks), math.nan),
    }, schema=EVALS_SCHEMA)


def _last(values: np.ndarray) -> float | None:
    ok = values[np.isfinite(values)]
    return float(ok[-1]) if len(ok) else None


def _describe(out: Imported, curve: str) -> str:
    lines = [f"sweep: {out.sweep}", f"# imported from Shallue et al. (2018)'s released trials; curve: {curve}",
             "workloads:"]
    lines += [f"  {w}: {sorted(ms)}" for w, ms in sorted(out.workloads.items())]
    return "\n".join(lines) + "\n"


def cli_import(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """``critbatch import shallue DIR --store S --sweep NAME``."""
    sweep = args.sweep
    problem = sweep_problem(sweep)
    if problem:
        raise ConfigError(f"--sweep: {problem}")
    trials, skipped = read_shallue(Path(args.dir).expanduser(), curve=args.curve, workloads=args.workload)
    store = open_store(args.store)
    store.check()
    if store.list(f"{sweep}/cells/"):
        raise ConfigError(f"--sweep: {sweep} already has cells in {store.url}; import into a new sweep")
    out = write_trials(store, sweep, trials, curve=args.curve)
    for line in skipped + out.skipped:
        print(f"critbatch import: skipped {line}", file=sys.stderr)
    for workload, ms in sorted(out.workloads.items()):
        log(f"critbatch import: {workload}: batch sizes {' '.join(map(str, sorted(ms)))}")
    log(f"critbatch import: {out.cells} trials -> {store.join(sweep + '/cells/')}; next: critbatch analyze "
        f"--store {store.url} --sweep {sweep} --threshold <the loss goal>")
    return 0
