"""Run every benchmark under benchmarks/, one process each, and print each one's figures.

    make bench                                         # reduced sizes: a few minutes on two cores
    make bench BENCH_ARGS=--full                       # the sizes each benchmark documents
    .venv/bin/python benchmarks/run_all.py --only render --only data

Every bench_*.py in this folder runs, each in its own process, its output passed through as it comes;
a summary of exit codes and wall times follows, and the exit code is 1 if any benchmark failed.
Without --full, those whose documented size takes long on two cores run smaller (SETTINGS): the
analysis on 100 and 300 cells (not 1,000), the log writer over 10^5 steps (not 10^6), the train loop
on the digits workload only (not the CIFAR ResNet-34). The others run at their documented sizes.
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
class Settings:
    threads: int = 1  # OMP_NUM_THREADS, as the benchmark's docstring runs it
    reduced: tuple[str, ...] = ()  # its arguments without --full (none: its documented sizes)


#: What each benchmark runs with, where that is not one thread at its documented sizes. Every bench_*.py
#: in this folder runs; one missing here runs at its documented sizes, so a long one needs an entry.
SETTINGS = {
    # 100 and 300 cells of 100,000 steps (3 GB of parts in a temporary folder); --full adds 1,000 (10 GB).
    "analysis": Settings(reduced=("--cells", "100,300")),
    # 50,000 CIFAR-format images, batch 128, as documented: already quick.
    "data": Settings(threads=2),
    # 10^5 logged steps instead of 10^6, paced at 20,000 steps/s (its docstring's shorter run).
    "logging": Settings(reduced=("--steps", "100000", "--rate", "20000")),
    # The digits CNN and the laptop GPT with AdamW; --full adds the CIFAR ResNet-34 (about 8 s a step on a CPU
    # core: 10+ minutes).
    "train": Settings(reduced=("--only", "digits", "--only", "gpt", "--steps-gpt", "100")),
    # The linreg oracle problem only (2 minutes); --full adds its LR grid and digits (15 to 25 minutes).
    "search": Settings(reduced=("--only", "linreg")),
}


def benchmarks() -> dict[str, Path]:
    """Every benchmark in this folder by name: bench_render.py is ``render``."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def run(script: Path, settings: Settings, full: bool) -> tuple[int, float]:
    """Run one benchmark with its output on ours; (exit code, wall seconds)."""
    args = [] if full else list(settings.reduced)
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads)}
    sizes = " ".join(args) or "(documented sizes)"
    print(f"\n==== {script.name} {sizes}  OMP_NUM_THREADS={settings.threads}", flush=True)
    started = time.perf_counter()
    code = subprocess.run([sys.executable, str(script), *args], env=env).returncode
    return code, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    found = benchmarks()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the documented sizes (about 20 minutes on two cores)")
    parser.add_argument("--only", action="append", choices=sorted(found), help="run only these (repeatable)")
    args = parser.parse_args(argv)

    results = []
    started = time.perf_counter()
    for name, script in found.items():
        if args.only is None or name in args.only:
            results.append((script, *run(script, SETTINGS.get(name, Settings()), args.full)))
    total = time.perf_counter() - started

    print(f"\n==== summary ({'full' if args.full else 'reduced'} sizes)")
    for script, code, wall in results:
        print(f"{script.name:<24} {'ok' if code == 0 else f'FAILED (exit {code})':<18} {wall:7.1f} s")
    failed = sum(code != 0 for _, code, _ in results)
    print(f"{len(results) - failed} of {len(results)} passed in {total:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
