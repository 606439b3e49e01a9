"""``critbatch demo``: the whole flow on one machine, no cluster, no GPU.

    critbatch demo            # ./critbatch-out, a local directory store
    critbatch demo --s3       # the same through an S3 server it starts on loopback (SeaweedFS)

It runs two sweeps with the local executor, the same ``critbatch train``
entrypoint the pods run: ``mnist1d-cnn-blr`` (MNIST-1D's CNN with the base LR
across batch sizes 32..2048, three seeds, each cell stopping at the threshold:
one seed's interval does not survive a rerun on another machine, three seeds'
does; docs/seed-noise.md) and ``linreg`` (the known-answer least-squares
problem under Ma et al.'s oracle step, three seeds), then
analyses each into its report and prints where the reports are, with the
critical batch size found for each problem and, for ``linreg``, the analytic
value m* = beta / lambda_1 + 1 beside it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import ExitStack
from typing import Any

from .executor import run_cells, write_sweep_spec
from ..sweep.grid import Grid, load_grid
from ..store import Store, open_store
from ..cell.layout import DEFAULT_STORE

SWEEPS = ("mnist1d-cnn-blr", "linreg")
DEMO_BUCKET = "s3://critbatch-demo/runs"

#: --quick: a reduced version of both presets (fewer batch sizes, epochs and seeds), for tests and a first look.
QUICK = {
    "mnist1d-cnn-blr": {"batch_size": [32, 64, 128, 256], "seed": [0], "epochs": 12, "eval": {"points": 20},
                        "stop": {"threshold": 1.2}, "analysis": {"args": ["--threshold", "1.2"]}},
    "linreg": {"batch_size": [2, 8, 32, 128, 512], "seed": [0, 1], "epochs": 20, "eval": {"points": 30}},
}


def demo_grids(quick: bool = False) -> list[Grid]:
    grids = []
    for name in SWEEPS:
        grid = load_grid(name)
        if quick:
            raw = {**grid.raw, **QUICK[name]}
            raw["sweep"] = f"{name}-quick"
            grid = load_grid(raw)
        grids.append(grid)
    return grids


def cli_demo(args) -> int:
    started = time.monotonic()
    grids = demo_grids(args.quick)
    with ExitStack() as stack:
        if args.s3:
            from .s3server import S3Server

            print("critbatch demo: starting an S3 server on loopback (SeaweedFS) ...", file=sys.stderr)
            server = stack.enter_context(S3Server())
            os.environ.update(server.env())
            store_url = args.store or DEMO_BUCKET
        else:
            store_url = args.store or DEFAULT_STORE
        store = open_store(store_url)
        store.check()
        cells = []
        for grid in grids:
            write_sweep_spec(store, grid.sweep, grid.sweep_yaml())
            cells.extend(grid.cells())
        print(f"critbatch demo: {len(cells)} cells ({', '.join(f'{g.sweep}: {len(g.cells())}' for g in grids)}) "
              f"-> {store.url}, {args.parallel} at a time", file=sys.stderr)
        result = run_cells(cells, store, parallel=args.parallel, label="demo",
                           data_root=os.environ.get("CRITBATCH_DATA", "~/.cache/critbatch/data"))
        if result.failed:
            print(f"critbatch demo: {len(result.failed)} cells failed; see the messages above", file=sys.stderr)
            return 1
        lines = []
        for grid in grids:
            lines.append(_analyze(store, grid))
        took = time.monotonic() - started
        if args.s3:
            # The server goes away with the demo: keep a copy of the reports on disk.
            print("critbatch demo: the S3 server stops now; the reports were copied to ./critbatch-demo-report/",
                  file=sys.stderr)
    print(f"critbatch demo: finished in {took / 60:.1f} min")
    for line in lines:
        print(line)
    return 0


def _analyze(store: Store, grid: Grid) -> str:
    """Analyse one sweep into its report; return its one-line summary."""
    from critbatch.analysis.report import analyze, write_report

    output = f"critbatch-demo-report/{grid.sweep}" if store.url.startswith("s3://") else None
    # The options the grid gives its analysis Job (analysis.args), read by the same parser.
    from ..cell.analysis_args import parse_analyze_args

    opts = parse_analyze_args(grid.analysis.args)
    analysis = analyze(store, [grid.sweep], thresholds=opts.threshold, efficiency=opts.efficiency,
                       bootstrap=min(opts.bootstrap, 500), window=opts.window, seed_noise=opts.seed_noise,
                       tolerance=opts.tolerance, warn=lambda line: print(line, file=sys.stderr))
    index = write_report(store, analysis, output=output, log=lambda line: print(line, file=sys.stderr))
    if output:  # the loopback server stops with the demo: point at the copy that stays
        print(f"report: {output}/index.html (copied from {store.join(index)})")
    else:
        print(f"report: {store.join(index)}")
    return summary_line(grid, analysis.primary_results(), _derived(store, grid))


def _derived(store: Store, grid: Grid) -> dict[str, Any]:
    cell = grid.cells()[0]
    try:
        return json.loads(store.get_text(f"{grid.sweep}/cells/{cell.id}/cell.json")).get("derived", {})
    except KeyError:
        return {}


def summary_line(grid: Grid, results: list, derived: dict[str, Any]) -> str:
    """``digits: critical batch size B_crit = 9 [6, 14] ...``: one per problem (its BLR curve where present)."""
    from critbatch.analysis.plots import problem_groups

    shown = {g.label for g in problem_groups([r.group for r in results])}
    parts = []
    for r in (r for r in results if r.group.label in shown):
        s = r.summary
        how = f"{r.group.label}, McCandlish fit over {s['seeds']} seed(s) x {s['batch_sizes']} batch sizes"
        if s.get("fit_problem"):
            parts.append(f"{s['fit_problem']} ({how})")
        else:
            hi = _fmt(s["b_crit_hi"]) if math.isfinite(s["b_crit_hi"]) else "∞"
            parts.append(f"B_crit = {_fmt(s['b_crit'])} [{_fmt(s['b_crit_lo'])}, {hi}] ({how})")
    text = f"{grid.sweep}: critical batch size " + ("; ".join(parts) if parts else "not found (no speedup curve)")
    if "m_star" in derived:
        text += f"; analytic beta/lambda_1 - 1 = {derived['m_star'] - 2:.1f} (m* = {derived['m_star']:.1f})"
    return text


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = value[0]
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not math.isfinite(value) else f"{value:.0f}"
