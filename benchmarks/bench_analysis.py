"""Benchmark: `critbatch analyze` on 100, 300 and 1,000 synthetic cells of 100,000 steps each.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_analysis.py                     # 100, 300, 1000 cells
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_analysis.py --cells 100,300 --dir /tmp/bench --keep

The cells are written once, in the real log format (Arrow IPC parts of 500
step rows, evaluations at 200 log-spaced steps, gradient-noise statistics
every 10 steps, cell.json and _SUCCESS), into a local store: about 10 GB for
10^8 step rows. They are split into three sweeps of 100, 200 and 700 cells,
so the 300- and 1,000-cell runs analyse several sweeps together (``--sweep a
--sweep b ...``) without writing anything twice. Each run is a fresh process
(peak memory: the largest sum of resident memory over the process and its
loader workers, polled every 0.2 s; CPU time likewise summed over them); the files are read from
a warm page cache, as they were just written. Goal: under 60 s and 4 GiB at
1,000 cells on two cores, growing linearly.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BATCH_SIZES = [2 ** i for i in range(4, 14)]  # 10 batch sizes
STRATEGIES = ["blr", "lsr", "srsr", "longer"]
GROUPS_PER_SWEEP = 5
#: (sweep, first seed, seeds): 5 groups x 10 batch sizes x seeds = 100, 200 and 700 cells.
SWEEPS = [("bench-a", 0, 2), ("bench-b", 2, 4), ("bench-c", 6, 14)]


def generate(root: Path, sweeps: list[tuple[str, int, int]], steps: int, flush_steps: int) -> None:
    from critbatch.analysis.synthetic import GroupSpec, write_sweep
    from critbatch.jobs.store import LocalStore

    groups = [GroupSpec(strategy=s, b_crit=100.0 * (i + 1), tau0=50.0, b_noise=80.0 * (i + 1))
              for i, s in enumerate(STRATEGIES)] + [GroupSpec(model="vgg16", b_crit=150.0, tau0=50.0, b_noise=90.0)]
    store = LocalStore(root)
    for name, first, count in sweeps:
        if (root / name / ".generated").exists():
            continue
        t0 = time.perf_counter()
        write_sweep(store, name, groups=groups, batch_sizes=BATCH_SIZES, seeds=range(first, first + count),
                    seed_noise=0.02, total_steps=steps, eval_points=200, flush_steps=flush_steps, noise_every=10,
                    fast_local=True)
        (root / name / ".generated").write_text("")
        cells = len(groups) * len(BATCH_SIZES) * count
        print(f"generated {name}: {cells} cells x {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)


def _tree() -> tuple[int, dict[int, int]]:
    """(resident bytes, {pid: CPU ticks}) of this process and all its descendants (the loader's workers)."""
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stats[int(entry)] = fh.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                pass
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, f in stats.items() if int(f[1]) == pid and p not in tree]
        tree.update(kids)
        frontier.extend(kids)
    rss, ticks = 0, {}
    for pid in tree:
        if pid in stats:
            # fields after the command: state ppid ... utime (12) stime (13) ... rss (22), in pages
            ticks[pid] = int(stats[pid][11]) + int(stats[pid][12])
            rss += int(stats[pid][21]) * os.sysconf("SC_PAGE_SIZE")
    return rss, ticks


class _Usage:
    """Polls the process tree every 0.2 s: the largest resident sum seen, and CPU seconds per process."""

    def __init__(self):
        self.peak = 0
        self.ticks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        rss, ticks = _tree()
        self.peak = max(self.peak, rss)
        for pid, t in ticks.items():
            self.ticks[pid] = max(self.ticks.get(pid, 0), t)

    @property
    def cpu_s(self) -> float:
        return sum(self.ticks.values()) / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.2)

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def child(root: str, sweeps: list[str], bootstrap: int) -> None:
    """One measured run, in its own process: prints timings and peak memory as JSON."""
    from critbatch.analysis import report
    from critbatch.analysis.load import load_sweeps
    from critbatch.jobs.store import open_store

    store = open_store(root)
    load_before = os.getloadavg()[0]
    with _Usage() as usage:
        t0 = time.perf_counter()
        loaded = load_sweeps(store, sweeps)
        t1 = time.perf_counter()
        a = report.compute_all(loaded, bootstrap=bootstrap)
        t2 = time.perf_counter()
        a.artifacts = report.make_artifacts(a)
        t3 = time.perf_counter()
        report.write_report(store, a, log=lambda line: None)
        t4 = time.perf_counter()
    print(json.dumps({
        "cells": len(loaded.cells), "load_s": t1 - t0, "compute_s": t2 - t1, "plot_s": t3 - t2, "write_s": t4 - t3,
        "total_s": t4 - t0, "cpu_s": usage.cpu_s, "loadavg_before": load_before,
        "peak_rss_mib": usage.peak / 2 ** 20,
        "main_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "skipped": len(loaded.skipped),
    }))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="100,300,1000", help="comma-separated sizes among 100, 300, 1000")
    p.add_argument("--steps", type=int, default=100_000, help="steps per cell")
    p.add_argument("--flush-steps", type=int, default=500, help="step rows per part (the train default)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (the analyze default)")
    p.add_argument("--dir", default=None, help="where the synthetic store lives (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated store for another run")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1:], args.bootstrap)
        return 0

    sizes = [int(x) for x in args.cells.split(",")]
    totals = {100: 1, 300: 2, 1000: 3}  # sweeps needed for each size
    if any(s not in totals for s in sizes):
        p.error("--cells: sizes must be among 100, 300, 1000")
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="critbatch-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        needed = max(totals[s] for s in sizes)
        t0 = time.perf_counter()
        generate(root, SWEEPS[:needed], args.steps, args.flush_steps)
        size_gb = sum(f.stat().st_size for f in root.rglob("*.arrow")) / 1e9
        print(f"store {root}: {size_gb:.1f} GB of parts (generation {time.perf_counter() - t0:.0f} s)", flush=True)
        results = []
        for size in sizes:
            sweeps = [name for name, _, _ in SWEEPS[: totals[size]]]
            cmd = [sys.executable, __file__, "--bootstrap", str(args.bootstrap), "--child", str(root), *sweeps]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            res = json.loads(done.stdout.strip().splitlines()[-1])
            res["rows"] = res["cells"] * args.steps
            results.append(res)
            print(f"{res['cells']:5d} cells, {res['rows']:.1e} step rows: {res['total_s']:6.1f} s "
                  f"(load {res['load_s']:.1f}, compute {res['compute_s']:.1f}, plot {res['plot_s']:.1f}, "
                  f"write {res['write_s']:.1f}; CPU {res['cpu_s']:.1f} s incl. workers), "
                  f"peak {res['peak_rss_mib']:.0f} MiB, "
                  f"{res['rows'] / res['total_s'] / 1e6:.1f} M rows/s (machine load before: "
                  f"{res['loadavg_before']:.1f})", flush=True)
        print(json.dumps(results))
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
