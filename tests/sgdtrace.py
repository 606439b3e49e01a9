"""The SGD cells of every shipped preset, pinned: ids and the first 50 logged losses of a short trace.

    python tests/sgdtrace.py            # writes tests/golden/sgd-presets.json (run only to re-pin on purpose)

For each preset: the id of its first cell (every preset's cells are SGD cells),
and a trace cell derived from it (batch 8, 50 steps, tiny data files in the
dataset's real format where the data is not built in) with its id and its
first 50 step losses. tests/test_golden_sgd.py checks both against this file,
bit for bit: an SGD cell keeps its id and its result whatever is added beside it.
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


def trace_losses(cell, work: Path) -> list[float]:
    """Train ``cell`` in this process (one thread) into a local store under ``work``; its step losses."""
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
                     "--data-root", str(data)])
    assert code == 0, f"trace of {cell.id} exited {code}"
    store = open_store(url)
    prefix = cell_prefix(cell.sweep, cell.id)
    rows = []
    for key in store.list(f"{prefix}/steps/"):
        rows.extend(ipc_to_table(store.get_bytes(key)).to_pylist())
    return [r["train_loss"] for r in sorted(rows, key=lambda r: r["step"])][:TRACE_STEPS]


def record(out: dict) -> dict:
    """Every preset's entry; those already in ``out`` are kept (the file is written after each preset)."""
    with tempfile.TemporaryDirectory() as tmp:
        for preset, cell in first_cells().items():
            if preset in out:
                continue
            trace = trace_cell(cell)
            losses = trace_losses(trace, Path(tmp))
            out[preset] = {"cell_id": cell.id, "cell": cell.canonical_json(), "trace_id": trace.id,
                           "trace_cell": trace.canonical_json(), "losses": [float.hex(v) for v in losses]}
            print(preset, cell.id, trace.id, len(losses), file=sys.stderr)
            GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return out


if __name__ == "__main__":
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    record(json.loads(GOLDEN.read_text()) if "--resume" in sys.argv and GOLDEN.exists() else {})
