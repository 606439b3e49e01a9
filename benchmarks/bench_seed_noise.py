"""The seed noise of real k(m): eight seeds of the laptop problems, and how far one seed's interval can be trusted.

    .venv/bin/python benchmarks/bench_seed_noise.py run [--only cnn-blr ...] [--seeds 8] [--store DIR]
    .venv/bin/python benchmarks/bench_seed_noise.py collect [--store DIR]     # -> tests/data/seed_noise.json
    .venv/bin/python benchmarks/bench_seed_noise.py table                     # -> docs/seed-noise.md

``run`` trains every problem's curve (a preset with its seeds widened and a
stop at the lowest threshold studied) with ``critbatch run --parallel 2`` (one
thread per cell) into a directory store; the variants rerun the MNIST-1D CNN
curve with two threads per cell (``--parallel 1``) and with the noise probe
off. ``collect`` reads the store through the analysis's own loader and keeps,
per problem and threshold, every cell's steps to threshold (or its censoring
bound) in ``tests/data/seed_noise.json``. ``table`` prints from that file (no
training): the scatter of log k across seeds per batch size, the change from
the thread count and the probe, and the leave-one-seed-out coverage of the
95 % interval from one and from three seeds (analysis.seednoise), and writes
it to docs/seed-noise.md. tests/test_seed_noise.py asserts the coverage from
the same file.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "seed_noise.json"
DOC = ROOT / "docs" / "seed-noise.md"
DEFAULT_STORE = Path("~/.cache/critbatch/seed-noise").expanduser()


def _mnist1d(model: str, strategy: str) -> dict:
    return {
        "dataset": {"name": "mnist1d"}, "model": model, "strategy": strategy,
        "base_lr": 0.03, "base_batch": 32, "warmup_epochs": 5, "epochs": 60,
        "batch_size": [32, 64, 128, 256, 512, 1024, 2048],
        "optimizer": {"name": "sgd", "momentum": 0.9, "weight_decay": 5.0e-4},
        "eval": {"points": 60, "train_subset": None}, "noise": {"every": 10},
        "stop": {"threshold": 0.1},
    }


#: problem -> (the grid without sweep and seed, the thresholds studied (the first is the headline), --parallel)
PROBLEMS: dict[str, tuple[dict, list[float], int]] = {
    "cnn-blr": (_mnist1d("mnist1d_cnn", "blr"), [0.1, 0.2, 0.5], 2),
    "cnn-srsr": (_mnist1d("mnist1d_cnn", "srsr"), [0.1, 0.2, 0.5], 2),
    "mlp-blr": (_mnist1d("mnist1d_mlp", "blr"), [0.2, 0.1, 0.5], 2),  # at 0.1 only m = 32, 64 reach it
    "mlp-srsr": (_mnist1d("mnist1d_mlp", "srsr"), [0.2, 0.1, 0.5], 2),
    "digits-blr": ({
        "dataset": {"name": "digits"}, "model": "digits_cnn", "model_options": {"width": 8}, "strategy": "blr",
        "base_lr": 0.01, "base_batch": 8, "warmup_epochs": 5, "epochs": 60,
        "batch_size": [8, 16, 32, 64, 128, 256, 512],
        "optimizer": {"name": "sgd", "momentum": 0.9, "weight_decay": 5.0e-4},
        "eval": {"points": 120, "train_subset": None}, "noise": {"every": 10}, "stop": {"threshold": 0.1},
    }, [0.1, 0.2, 0.5], 2),
    "linreg-oracle": ({
        "dataset": {"name": "linreg", "options": {"n": 512, "d": 1024, "spikes": 4, "spike_var": 60.0}},
        "model": "linear", "strategy": "oracle", "base_lr": 1.0, "base_batch": 2, "epochs": 30,
        "batch_size": [2, 4, 8, 16, 32, 64, 128, 256, 512],
        "optimizer": {"name": "sgd", "momentum": 0.0, "weight_decay": 0.0},
        "eval": {"points": 80, "train_subset": None}, "noise": {"every": 5},
    }, [0.11, 0.2, 0.3], 2),  # the default q25 of this curve is 0.113 (initial loss 0.60)
    "gpt-adamw": ({
        "dataset": {"name": "pycorpus", "options": {"seq_len": 64}}, "model": "gpt",
        "model_options": {"n_layer": 2, "n_head": 2, "n_embd": 64, "seq_len": 64}, "strategy": "srsr",
        "optimizer": {"name": "adamw", "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.0},
        "base_lr": 0.003, "base_batch": 8, "warmup": {"steps": 10}, "tokens": 1.2e6,
        "batch_size": [8, 16, 32, 64, 128], "eval": {"points": 40, "train_subset": 64},
        "noise": {"every": 10}, "stop": {"threshold": 2.6},
    }, [2.6, 2.8, 3.0], 2),
}

#: variant -> (its problem, what changes in the grid, --parallel): the same seeds rerun with one thing changed
#: (the batch sizes that reach eps = 0.1, with the first seeds: ``run --only cnn-blr@2threads --seeds 4``)
VARIANTS: dict[str, tuple[str, dict, int]] = {
    "cnn-blr@2threads": ("cnn-blr", {"batch_size": [32, 64, 128, 256]}, 1),
    "cnn-blr@probe-off": ("cnn-blr", {"noise": {"every": 0}, "batch_size": [32, 64, 128, 256]}, 2),
}


def _sweep(name: str) -> str:
    return "seednoise-" + name.replace("@", "-")


def _grid(name: str, seeds: int) -> tuple[dict, int]:
    if name in VARIANTS:
        base, change, parallel = VARIANTS[name]
        grid = {**PROBLEMS[base][0], **change}
    else:
        grid, _, parallel = PROBLEMS[name]
    return {**grid, "sweep": _sweep(name), "seed": list(range(seeds))}, parallel


def run(names: list[str], seeds: int, store: Path) -> None:
    for name in names:
        grid, parallel = _grid(name, seeds)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(grid, f, sort_keys=False)
        started = time.monotonic()
        print(f"{name}: {len(grid['batch_size']) * seeds} cells, --parallel {parallel}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "critbatch.jobs.cli", "run", f.name, "--store", str(store),
                        "--parallel", str(parallel)], check=True)
        Path(f.name).unlink()
        print(f"{name}: done in {(time.monotonic() - started) / 60:.1f} min", file=sys.stderr, flush=True)


def collect(names: list[str], store: Path) -> dict:
    """Every cell's k (or its censoring bound) per problem and threshold, from the store."""
    from critbatch.analysis.compute import group_cells, steps_to_threshold
    from critbatch.analysis.load import load_sweeps
    from critbatch.jobs.store import open_store

    out = json.loads(DATA.read_text()) if DATA.exists() else {"problems": {}}
    st = open_store(str(store))
    for name in names:
        problem = VARIANTS[name][0] if name in VARIANTS else name
        thresholds = PROBLEMS[problem][1]
        loaded = load_sweeps(st, [_sweep(name)])
        if not loaded.cells:
            print(f"{name}: nothing in {store} (run it first)", file=sys.stderr)
            continue
        groups = group_cells(loaded.cells)
        if len(groups) != 1:
            raise SystemExit(f"{name}: expected one curve, found {[g.label for g in groups]}")
        _, rows = steps_to_threshold(groups, thresholds)
        cells = {}
        for r in rows:
            if not r["threshold"].startswith("eps=") or r["use"] not in ("reached", "censored", "stopped"):
                continue
            cells.setdefault(r["threshold"][4:], []).append({
                "m": r["batch_size"], "seed": r["seed"],
                "k": None if not math.isfinite(r["k"]) else round(r["k"], 6),
                "bound": None if not math.isfinite(r["k_bound"]) else r["k_bound"],
                "use": r["use"]})
        out["problems"][name] = {"sweep": _sweep(name), "thresholds": [f"{e:g}" for e in thresholds],
                                 "cells": len(loaded.cells), "k": cells}
        print(f"{name}: {len(loaded.cells)} cells collected", file=sys.stderr)
    DATA.parent.mkdir(parents=True, exist_ok=True)
    DATA.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return out


def table() -> str:
    from critbatch.analysis.seednoise import report_markdown

    text = report_markdown(json.loads(DATA.read_text()))
    DOC.write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["run", "collect", "table"])
    p.add_argument("--only", nargs="+", choices=[*PROBLEMS, *VARIANTS])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--store", type=Path, default=DEFAULT_STORE)
    args = p.parse_args()
    names = args.only or [*PROBLEMS, *VARIANTS]
    if args.what == "run":
        args.store.mkdir(parents=True, exist_ok=True)
        run(names, args.seeds, args.store)
    elif args.what == "collect":
        collect(names, args.store)
    else:
        print(table())


if __name__ == "__main__":
    main()
