"""``critbatch search`` against the full grid, side by side: the samples each spends and the B_crit each finds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_search.py              # the four curves, ~25 min on 2 cores
    .venv/bin/python benchmarks/bench_search.py --only linreg --workers 2
    .venv/bin/python benchmarks/bench_search.py --store /tmp/bench-search      # keep (and reuse) the runs

Problems, each a shipped preset with its ``search:`` block:

    linreg           the known-answer least squares under the oracle step (3 seeds, 9 batch sizes)
    linreg-lr-grid   the same data, a constant LR searched per batch size (9 trials, 7 batch sizes)
    digits           the digits CNN, BLR and SRSR (the preset's LSR left out), 7 batch sizes, its
                     analysis.args threshold (eps = 0.1): the search takes it as its explicit eps

For each, the full grid runs every cell to its epoch budget (sweep ``<preset>-full``) and the search
runs what it decides (sweep ``<preset>-search``), into one local store. Both run their cells in the
same pool of ``--workers`` processes, each importing torch once and calling ``train_cell`` (what the
``critbatch train`` subprocess of ``critbatch run`` calls) with one thread: on two shared cores a
subprocess's start-up (torch's import) costs as much as a small cell, and it would be paid once per
race rung. So the numerics of both sides are the same and a cell they share is bit-identical.

Printed per curve: samples (and steps) spent by each, their ratio, B_crit with its 95 % interval from
each (the full grid at the search's eps: its explicit one, or the default q25, which the search takes
from the same largest-batch cells), and whether the search's value lies in the full grid's interval.
Goal: the search spends at most 25 % of the full grid's samples on every problem and lands inside.

Measured on the 2-core VM (shared with other jobs), ``--workers 2``, 12 minutes in all:

    curve                     eps     full grid: samples (steps)   search: samples (steps)   ratio
    linreg/linear/oracle      0.1196     414,720 (45,990)              56,198 (  914)         13.6 %
    linreg/linear/blr         0.1626     884,912 (27,629)             219,784 (1,811)         24.8 %
    digits/digits_cnn/blr     0.1        563,040 (21,120)             122,728 (1,833)         21.8 %
    digits/digits_cnn/srsr    0.1        563,040 (21,120)              81,224 (1,256)         14.4 %

    curve                     B_crit, full grid    B_crit, search       inside
    linreg/linear/oracle      28.2 [24.8, 32]      29.1 [25.5, 33.2]    yes
    linreg/linear/blr         44.2 [18, 101]       44.1 [18, 101]       yes
    digits/digits_cnn/blr     9.01 [4.51, 15.2]    9.36 [4.5, 16.2]     yes
    digits/digits_cnn/srsr    57.1 [35.2, 91.9]    61.2 [41.2, 90.9]    yes

(digits rerun, 137 s, once the search judged its choices on the report's interval, seed floor included: SRSR
then runs m = 512 too, 14.4 % instead of 9.2 %; linreg rerun unchanged.)

Per problem: linreg 13.6 % (decided after 9 cells), linreg-lr-grid 24.8 % (every batch size raced, 48 of
63 trials put out early), digits 18.1 % (13 cells, until no choice narrowed the interval by enough). Where it goes: the
threshold waves (the largest batch size run whole, every seed and trial) are 82 % of linreg's search and
63 % of linreg-lr-grid's (9 trials of m = 512, 138,240 samples); digits BLR's m = 256 is 46 % of its
curve's (56,320 samples: under BLR the samples to eps grow as S_min m past B ~ 9, and k(256) = 174 is
58 % of that cell's 300-step budget, so stopping saves little there).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

from critbatch.analysis.report import analyze
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.search.loop import Search
from critbatch.jobs.search.state import read_state
from critbatch.jobs.store import LocalStore, Store
from critbatch.jobs.sweep.grid import Grid, load_grid

PROBLEMS = {
    "linreg": ("linreg", {}),
    "linreg-lr-grid": ("linreg-lr-grid", {}),
    "digits": ("digits", {"strategy": ["blr", "srsr"]}),
}


def _train(cell_json: str, store_url: str, pause_at: int | None) -> tuple[str, str]:
    """One cell in a pool worker: (cell id, what happened)."""
    import torch

    from critbatch.jobs.store import open_store
    from critbatch.jobs.train.main import train_cell
    from critbatch.jobs.train.trainer import Paused

    torch.set_num_threads(1)
    cell = Cell.from_json(cell_json)
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # each cell's start-up banner
            summary = train_cell(cell, open_store(store_url), data_root="~/.cache/critbatch/data", progress="none",
                                 checkpoint_seconds=3600.0, pause_at=pause_at)
    except Paused:
        return cell.id, "paused"
    return cell.id, summary["status"]


class PoolBackend:
    """The search's backend, and the full grid's runner: cells in a pool of worker processes."""

    def __init__(self, store: Store, workers: int):
        self.store, self.parallel = store, workers
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["critbatch.jobs.train.main"])
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        self.cells = 0

    def run(self, runs: Sequence[tuple[Cell, int | None]]) -> list[str]:
        futures = [self.pool.submit(_train, cell.to_json(), self.store.url, pause) for cell, pause in runs]
        failed = []
        for cell_and_pause, future in zip(runs, futures):
            try:
                future.result()
            except Exception as err:  # noqa: BLE001 - a cell's crash is reported as failed, as the executor does
                print(f"cell {cell_and_pause[0].id} failed: {err!r}", file=sys.stderr)
                failed.append(cell_and_pause[0].id)
        self.cells += len(runs)
        return failed


def problem_grid(preset: str, changes: dict, suffix: str) -> Grid:
    raw = {**load_grid(preset).raw, **changes}
    raw["sweep"] = f"{preset}-{suffix}"
    return load_grid(raw)


def curves(store: Store, sweep: str, eps: float | None) -> dict[str, dict]:
    """Per curve label: B_crit, its interval, and the cells' samples and steps, at ``eps`` (None: q25)."""
    a = analyze(store, [sweep], thresholds=[eps] if eps is not None else None, bootstrap=0)
    name = f"eps={eps:g}" if eps is not None else "q25"
    by_cell = {c.id: c for c in a.loaded.cells}
    out = {}
    for r in a.results:
        if r.threshold != name:
            continue
        cells = [by_cell[c.id] for c in r.group.cells]
        out[r.group.label] = {"b": r.summary["b_crit"], "lo": r.summary["b_crit_lo"], "hi": r.summary["b_crit_hi"],
                              "eps": r.eps, "samples": sum(c.last_step * c.batch_size for c in cells),
                              "steps": sum(c.last_step for c in cells), "cells": len(cells),
                              "problem": r.summary["fit_problem"]}
    return out


def run_problem(name: str, store: Store, backend: PoolBackend) -> list[dict]:
    preset, changes = PROBLEMS[name]
    full, searched = problem_grid(preset, changes, "full"), problem_grid(preset, changes, "search")
    started = time.monotonic()
    backend.run([(c, None) for c in full.cells()])
    full_s = time.monotonic() - started
    started = time.monotonic()
    state = Search(searched, store, backend, searched.search, log=lambda line: print(line, file=sys.stderr)).run()
    search_s = time.monotonic() - started
    eps = state.threshold.get("eps")  # None: the default q25, the same rule on the same largest-batch cells
    f, s = curves(store, full.sweep, eps), curves(store, searched.sweep, eps)
    rows = []
    for label in sorted(f):
        a, b = f[label], s.get(label, {})
        rows.append({"problem": name, "curve": label, "eps": a["eps"], "full": a, "search": b,
                     "ratio": b.get("samples", math.nan) / a["samples"],
                     "inside": bool(b) and a["lo"] <= b["b"] <= a["hi"], "full_s": full_s, "search_s": search_s,
                     "status": state.status})
    return rows


def _iv(r: dict) -> str:
    if not r or not math.isfinite(r.get("b", math.nan)):
        return f"no fit ({r.get('problem', 'no cells') if r else 'no cells'})"
    hi = f"{r['hi']:.3g}" if math.isfinite(r["hi"]) else "inf"
    return f"{r['b']:.3g} [{r['lo']:.3g}, {hi}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(PROBLEMS), help="run only these (repeatable)")
    parser.add_argument("--workers", type=int, default=2, help="cells at once")
    parser.add_argument("--store", default=None, help="a directory to keep the runs in (default: a temporary one)")
    args = parser.parse_args(argv)
    names = args.only or list(PROBLEMS)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(args.store or tmp))
        backend = PoolBackend(store, args.workers)
        rows = []
        try:
            for name in names:
                rows.extend(run_problem(name, store, backend))
                state = read_state(store, f"{PROBLEMS[name][0]}-search")
                print(f"{name}: search {state.status}, {len(state.waves)} waves, {len(state.cells)} cells",
                      file=sys.stderr)
        finally:
            backend.pool.shutdown()
    print(f"{'curve':<34} {'eps':>8} {'full samples (steps)':>22} {'search samples (steps)':>24} {'ratio':>7}  "
          f"{'B_crit full':<22} {'B_crit search':<22} inside  wall full/search")
    ok = True
    for r in rows:
        f, s = r["full"], r["search"]
        ok &= r["ratio"] <= 0.25 and r["inside"]
        print(f"{r['curve']:<34} {r['eps']:>8.4g} {f['samples']:>12,} ({f['steps']:>7,}) {s.get('samples', 0):>13,} "
              f"({s.get('steps', 0):>7,}) {r['ratio']:>6.1%}  {_iv(f):<22} {_iv(s):<22} "
              f"{'yes' if r['inside'] else 'NO':<6}"
              f"  {r['full_s']:.0f} s / {r['search_s']:.0f} s")
    for name in names:
        mine = [r for r in rows if r["problem"] == name]
        full = sum(r["full"]["samples"] for r in mine)
        spent = sum(r["search"].get("samples", 0) for r in mine)
        wall_full, wall_search = mine[0]["full_s"], mine[0]["search_s"]
        print(f"problem {name}: search {spent:,} of the full grid's {full:,} samples ({spent / full:.1%}), "
              f"{mine[0]['status']}; wall {wall_full:.0f} s full grid, {wall_search:.0f} s search "
              f"({wall_search / wall_full:.1%})")
    print("goal (<= 25 % of the samples and inside the full grid's interval on every curve): "
          + ("met" if ok else "NOT met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
