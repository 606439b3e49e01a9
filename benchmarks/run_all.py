"""Run every benchmark under benchmarks/, one process each, and print each one's figures.

    make bench                                         # reduced sizes: about two minutes on two cores
    make bench BENCH_ARGS=--full                       # the sizes each benchmark documents
    .venv/bin/python benchmarks/run_all.py --only render --only data

Without --full, the benchmarks whose documented size takes long on two cores run smaller: the
analysis on 100 and 300 cells (not 1,000), the log writer over 10^5 steps (not 10^6), the train loop
on the digits workload only (not the CIFAR ResNet-34); the data and render benchmarks run at their
documented sizes. Each benchmark runs in its own process with the OMP_NUM_THREADS its docstring uses,
its output passed through as it comes; a summary of exit codes and wall times follows. The exit
code is 1 if any benchmark failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    name: str
    threads: int  # OMP_NUM_THREADS, as the benchmark's docstring runs it
    reduced: tuple[str, ...]  # its arguments without --full; with --full it runs with none (its documented sizes)

    @property
    def script(self) -> Path:
        return HERE / f"bench_{self.name}.py"


BENCHMARKS = (
    # 100 and 300 cells of 100,000 steps (3 GB of parts in a temporary folder); --full adds 1,000 (10 GB).
    Bench("analysis", 1, ("--cells", "100,300")),
    # 50,000 CIFAR-format images, batch 128: the documented size is already quick.
    Bench("data", 2, ()),
    # 10^5 logged steps instead of 10^6, paced at 20,000 steps/s (its docstring's shorter run).
    Bench("logging", 1, ("--steps", "100000", "--rate", "20000")),
    # 10,000 cells: the documented size, the one the 10 s goal is stated for.
    Bench("render", 1, ()),
    # The digits CNN only; --full adds the CIFAR ResNet-34 (about 8 s a step on a CPU core: 10+ minutes).
    Bench("train", 1, ("--only", "digits")),
)


def run(bench: Bench, full: bool) -> tuple[int, float]:
    """Run one benchmark with its output on ours; (exit code, wall seconds)."""
    args = [] if full else list(bench.reduced)
    env = {**os.environ, "OMP_NUM_THREADS": str(bench.threads)}
    print(f"\n==== {bench.script.name} {' '.join(args)}  (OMP_NUM_THREADS={bench.threads})", flush=True)
    started = time.perf_counter()
    code = subprocess.run([sys.executable, str(bench.script), *args], env=env).returncode
    return code, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    names = [b.name for b in BENCHMARKS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the documented sizes (about 20 minutes on two cores)")
    parser.add_argument("--only", action="append", choices=names, help="run only these benchmarks (repeatable)")
    args = parser.parse_args(argv)
    missing = sorted({p.stem for p in HERE.glob("bench_*.py")} - {b.script.stem for b in BENCHMARKS})
    if missing:  # a new benchmark must be given its reduced settings here
        parser.error(f"benchmarks not listed in run_all.py: {', '.join(missing)}")

    results = []
    started = time.perf_counter()
    for bench in BENCHMARKS:
        if args.only is None or bench.name in args.only:
            results.append((bench, *run(bench, args.full)))
    total = time.perf_counter() - started

    print(f"\n==== summary ({'full' if args.full else 'reduced'} sizes)")
    for bench, code, wall in results:
        print(f"{bench.script.name:<20} {'ok' if code == 0 else f'FAILED (exit {code})':<18} {wall:7.1f} s")
    failed = sum(code != 0 for _, code, _ in results)
    print(f"{len(results) - failed} of {len(results)} passed in {total:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
