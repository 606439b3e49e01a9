"""GPU check of the GPT-124M cell (preset gpt124m-fineweb): bf16 throughput, MFU and peak memory. A few minutes.

    pip install -e '.[dev]'
    python benchmarks/gpu_check_gpt.py --out gpu-check-gpt.json          # on a machine with a CUDA GPU

Prepared for a machine with a CUDA GPU (the development machines have none). For each of two batch sizes
(``--batch``, sequences of 1024 tokens; default 8 and 32) it trains the preset's first cell with that batch
size for ``--steps`` updates through ``critbatch train --device cuda`` on synthetic FineWeb-format shards
(random GPT-2 token ids, written here), in this process, and reports:

    tokens/s   steps x m x 1024 over the training time _SUCCESS gives (evaluations excluded), first
               ``--warm`` steps included (so a conservative figure)
    MFU        6 N tokens/s over the card's dense bf16 peak (N the parameters, embedding included; the
               attention's FLOPs left out, as in the PaLM paper's simple form): --peak-tflops, else from
               the device name (H100/H200 989, A100 312, L40S 362 TFLOP/s)
    memory     torch.cuda.max_memory_allocated over the run, beside the sizing's estimate for one device
               without the CUDA context (jobs/sweep/sizing.py: the state copies of the weights, plus m x the
               per-sequence figure of memory.json, counted on fake tensors on a CPU); and per sequence: the
               slope of the measured peaks between the two batch sizes against memory.json's figure (bf16)

It prints a table and the per-sequence comparison, writes JSON (``--out``; default $OUT/gpu_check_gpt.json
when OUT is set) and exits 1 when a cell did not finish.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from critbatch.jobs.cell.layout import cell_prefix, success_key
from critbatch.jobs.cell.options import model_options
from critbatch.jobs.cli import main as cli
from critbatch.jobs.data.tokens import write_fineweb
from critbatch.jobs.models.gpt import GPT, n_params
from critbatch.jobs.store import open_store
from critbatch.jobs.sweep import sizing
from critbatch.jobs.sweep.grid import load_grid

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def write_shards(root: Path, tokens: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    write_fineweb(root / "fineweb_train_000001.bin", rng.integers(0, 50257, tokens, dtype=np.uint16))
    write_fineweb(root / "fineweb_val_000000.bin", rng.integers(0, 50257, 1 << 20, dtype=np.uint16))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (sequences); default 8 and 32")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check_gpt: no CUDA device", file=sys.stderr)
        return 1
    device = torch.cuda.get_device_name(0)
    peak = peak_tflops(device, args.peak_tflops)
    template = load_grid("gpt124m-fineweb").cells()[0]
    with torch.device("meta"):  # N: the parameters of the preset's GPT (vocabulary 50304), counted without memory
        n = n_params(GPT(50304, model_options(template.model, template.model_options)))
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_shards(data / "tokens", 1 << 25)  # 32M tokens, 64 MB
        for m in args.batch or [8, 32]:
            cell = template.model_copy(update={
                "batch_size": m, "base_batch": m, "max_steps": args.steps, "sweep": "gpu-check",
                "eval": {"points": 2, "train_subset": 8}, "noise": {"every": 0}, "warmup": {"steps": 5}})
            url = str(Path(tmp) / f"store-{m}")
            gc.collect()  # the previous batch's model and optimizer gone, so each peak is its own run's
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            code = cli(["train", "--cell", cell.to_json(), "--store", url, "--data-root", str(data),
                        "--device", "cuda", "--progress", "none"])
            done = json.loads(open_store(url).get_text(success_key(cell_prefix(cell.sweep, cell.id)))) \
                if code == 0 else {}
            ok &= code == 0
            tokens_s = done["steps"] * m * 1024 / done["wall_time_s"] if done else float("nan")
            fit = sizing.fit_of(cell)
            estimate = (fit.fixed + m * fit.per_sample) if fit else sizing.state_copies(cell) * n * 4
            entry = sizing.load_table().get(sizing.memory_key(cell), {})
            rows.append({
                "device": device, "batch": m, "exit": code, "steps": done.get("steps"), "tokens_per_s": tokens_s,
                "mfu": 6 * n * tokens_s / (peak * 1e12) if peak else None, "peak_tflops": peak,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                "sizing_estimate_gib": estimate / 2**30,
                "estimate_kind": ("fixed + per example, " + ("counted" if "method" in entry else "measured"))
                if fit else "fixed part only (no memory.json entry)",
                "sizing_per_sequence_mib": fit.per_sample / 2**20 if fit else None,
                "skipped_nonfinite_steps": done.get("skipped_nonfinite_steps"),
            })
    print(f"{'device':<28} {'batch':>5} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'estimate GiB':>13}")
    for r in rows:
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        print(f"{r['device']:<28} {r['batch']:>5} {r['tokens_per_s']:>10.0f} {mfu:>6} {r['peak_memory_gib']:>9.2f} "
              f"{r['sizing_estimate_gib']:>13.2f}  ({r['estimate_kind']})")
    per_sequence = per_sequence_check(rows)
    if per_sequence:
        print(f"per sequence (bf16, batches {per_sequence['batches'][0]} to {per_sequence['batches'][1]}): GPU "
              f"{per_sequence['gpu_mib']:.1f} MiB, memory.json {per_sequence['sizing_mib']:.1f} MiB, "
              f"ratio {per_sequence['ratio']:.2f}")
    out = args.out or (str(Path(os.environ["OUT"]) / "gpu_check_gpt.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps({"cells": rows, "per_sequence": per_sequence}, indent=2) + "\n")
    return 0 if ok else 1


def per_sequence_check(rows: list[dict]) -> dict | None:
    """The GPU's bytes per sequence (the slope of the peaks between the smallest and largest batch that
    finished) against the sizing's figure; None without two finished batches or an entry."""
    done = sorted((r for r in rows if r["exit"] == 0), key=lambda r: r["batch"])
    if len(done) < 2 or done[0]["sizing_per_sequence_mib"] is None:
        return None
    low, high = done[0], done[-1]
    gpu = (high["peak_memory_gib"] - low["peak_memory_gib"]) * 1024 / (high["batch"] - low["batch"])
    return {"batches": [low["batch"], high["batch"]], "gpu_mib": gpu, "sizing_mib": low["sizing_per_sequence_mib"],
            "ratio": gpu / low["sizing_per_sequence_mib"]}


if __name__ == "__main__":
    sys.exit(main())
