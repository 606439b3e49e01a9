"""The SGD cells of every shipped preset, pinned: ids and the first 50 logged losses of a short trace.

    python tests/sgdtrace.py            # writes tests/golden/sgd-presets.json (run only to re-pin on purpose)
    python tests/sgdtrace.py --machine  # adds this machine's losses to it (a CPU the file does not know yet)

For each preset: the id of its first cell (every preset's cells are SGD cells),
and a trace cell derived from it (batch 8, 50 steps, tiny data files in the
dataset's real format where the data is not built in) with its id and its
first 50 step losses. tests/test_golden_sgd.py checks both against this file,
bit for bit: an SGD cell keeps its id and its result whatever is added beside it.

Losses are pinned per machine (``machine()``: the CPU model and the kernels torch picks for it): the same code
gives other last bits on another CPU, and a trace that trains hard (the ResNet-34 ones at batch 8) turns that
round-off into different losses within a few steps. The first pins were recorded before the optimizer
component by the code it replaced; the second machine's by that same code, checked out again
(``git checkout 2d09a8f^``) and run with this module.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden" / "sgd-presets.json"
TRACE_STEPS = 50
#: Datasets that need files on disk (tests/datafiles.py writes them); the others are built in.
ON_DISK = ("mnist", "cifar10", "cifar100", "svhn", "cityscapes", "wikitext2")


def machine() -> str:
    """What decides the last bits of a CPU trace: the processor model and the vector width torch's kernels use
    on it, and torch's version (its kernels and the MKL it bundles)."""
    import platform

    import torch

    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    cpu = (f"{info['vendor_id']} family {info['cpu family']} model {info['model']} stepping {info['stepping']}"
           if {"vendor_id", "cpu family", "model", "stepping"} <= info.keys() else platform.processor() or "unknown")
    return f"{cpu}, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"


def trace_cell(cell):
    """The short CPU trace of ``cell``: its optimizer, strategy, model and dataset, 50 steps at batch 8."""
    dataset = cell.dataset.model_dump()
    dataset["max_train"] = None
    if dataset["name"] == "cityscapes":
        dataset["options"] = {**dataset["options"], "size": [32, 64]}
    batch = 2 if dataset["name"] == "cityscapes" else 8
    return cell.model_copy(update={
        "dataset": dataset, "batch_size": batch, "base_batch": batch, "max_steps": TRACE_STEPS, "sweep": "golden",
        "eval": {"points": 2, "train_subset": 8}, "noise": {"every": 10},
    })


def first_cells() -> dict[str, object]:
    from critbatch.jobs.sweep.grid import load_grid, preset_names

    return {name: load_grid(name).cells()[0] for name in preset_names()}


def trace_losses(cell, work: Path, steps: int = TRACE_STEPS) -> list[float]:
    """Train ``cell`` in this process (one thread) into a local store under ``work``; its first ``steps`` step
    losses (fewer than the trace's: the same cell paused there, so they are the full trace's first ones)."""
    from critbatch.jobs.cell.layout import cell_prefix
    from critbatch.jobs.cell.logschema import ipc_to_table
    from critbatch.jobs.cli import main as cli_main
    from critbatch.jobs.store import open_store

    sys.path.insert(0, str(HERE))
    from datafiles import write_dataset

    name = cell.dataset.name
    data = work / "data"
    if name in ON_DISK and not (data / name).exists():
        write_dataset(name, data / name, **({"n_extra": 32} if cell.dataset.extra else {}))
    url = str(work / "store")
    code = cli_main(["train", "--cell", cell.to_json(), "--store", url, "--progress", "none", "--threads", "1",
                     "--data-root", str(data), *(["--pause-at", str(steps)] if steps < TRACE_STEPS else [])])
    assert code == 0, f"trace of {cell.id} exited {code}"
    store = open_store(url)
    prefix = cell_prefix(cell.sweep, cell.id)
    rows = []
    for key in store.list(f"{prefix}/steps/"):
        rows.extend(ipc_to_table(store.get_bytes(key)).to_pylist())
    return [r["train_loss"] for r in sorted(rows, key=lambda r: r["step"])][:steps]


#: Models whose 50 steps take a minute or more on one thread: their trace is pinned and checked to this step (the
#: same cell paused there, so its losses are the full trace's first ones), which holds the data and its
#: augmentation, the model, the optimizer, the schedule's start and a noise measurement (at step 10).
HEAVY_MODELS = {"resnet34": 10, "vgg16": 10, "drn_d_22": 10}


def record(out: dict, only_machine: bool = False) -> dict:
    """Every preset's entry, its losses under this machine's name; presets already in ``out`` are kept, or with
    ``only_machine`` given this machine's losses (one trace per trace cell; the file is written after each)."""
    here = machine()
    done: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset, cell in first_cells().items():
            trace = trace_cell(cell)
            entry = out.get(preset)
            if entry is None:
                if only_machine:
                    continue  # --machine pins the presets the file holds, no new ones
            elif not only_machine or here in entry["losses"]:
                continue
            if entry is not None and (entry["cell_id"], entry["trace_id"]) != (cell.id, trace.id):
                raise SystemExit(f"{preset}: its cell or trace id changed; a new machine's losses would pin "
                                 "another cell (re-pin the whole file on purpose, without --machine)")
            if trace.id not in done:
                steps = HEAVY_MODELS.get(trace.model, TRACE_STEPS)
                done[trace.id] = [float.hex(v) for v in trace_losses(trace, Path(tmp) / preset, steps)]
            if entry is None:
                entry = out[preset] = {"cell_id": cell.id, "cell": cell.canonical_json(), "trace_id": trace.id,
                                       "trace_cell": trace.canonical_json(), "losses": {}}
            entry["losses"][here] = done[trace.id]
            print(preset, cell.id, trace.id, len(done[trace.id]), here, file=sys.stderr)
            GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return out


if __name__ == "__main__":
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    keep = ("--resume" in sys.argv or "--machine" in sys.argv) and GOLDEN.exists()
    record(json.loads(GOLDEN.read_text()) if keep else {}, only_machine="--machine" in sys.argv)
