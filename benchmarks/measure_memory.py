"""Per-sample training memory of every model and input size, measured on the CPU: jobs/sweep/memory.json.

    .venv/bin/python benchmarks/measure_memory.py                      # measure every entry, rewrite the table
    .venv/bin/python benchmarks/measure_memory.py --only resnet34 --dry-run
    .venv/bin/python benchmarks/measure_memory.py --check resnet34/3x32x32 --batch 64   # estimate vs peak RSS

What the table holds, per model and input size (``critbatch.jobs.sweep.sizing.memory_key``: the model,
its non-default options, and the input's shape, e.g. ``resnet34/3x32x32``, ``lstm/35x33278``):

- ``saved_bytes_per_sample``: the bytes autograd keeps for the backward pass per training example, in
  fp32 and under bf16 autocast. Counted with ``torch.autograd.graph.saved_tensors_hooks`` over one
  forward (loss included) at two batch sizes, each storage counted once; the slope between them leaves
  out what does not grow with the batch (weights kept for the backward, their bf16 copies). Autograd
  saves the same tensors on a GPU, so this figure carries over (cuDNN's LSTM keeps a reserve buffer of
  its own instead).
- ``peak_bytes_per_sample``: the slope of a real SGD step's peak memory (forward, backward, update) between
  two batch sizes, each step in a fresh process: the peak resident set (VmHWM, reset just before the
  step through /proc/self/clear_refs) above the resident set then, after a first step on one example
  has allocated the gradients, the momentum and the CPU kernels' caches. It adds
  what the backward holds besides the saved tensors - each layer's incoming gradient, and for a
  language model the logits' gradients, which more than double its figure.
- ``param_bytes`` (fp32 weights) and ``batch_norm`` (whether the model normalises over its batch, which
  makes the per-device micro-batch part of a cell's identity).

The sizing (jobs/sweep/sizing.py, torch-free) takes the larger of the two per-sample figures. ``--check``
measures one step at a given batch and prints it against the sizing's estimate.

A language model whose example costs more than COUNT_ABOVE multiply-adds (GPT-2 small at 1024 tokens;
bf16 products run unvectorised on CPUs without bf16 instructions, minutes per example) is counted, not
run: the same step on fake tensors (torch's FakeTensorMode: shapes and dtypes, no data, no arithmetic) at
its full shape. Its saved tensors are counted as above (on a GPT small enough to run, to the byte the real
count); its peak is the slope of the peak of live tensor bytes (torch.distributed._tools.mem_tracker), what
a GPU's caching allocator counts, not a resident set (the 2-layer GPT of gpt-pycorpus: 5 % above and 8 %
below the resident set's slope in fp32 in two runs, 16 and 18 % below in bf16; GPT-2 small with 128-token
examples in fp32, batches 8 and 16: 6 % below). The entry says so in ``method``;
benchmarks/gpu_check_gpt.py compares it with a GPU's own peak.

    .venv/bin/python benchmarks/measure_memory.py --only gpt       # the GPT entries (about 8 minutes here)

Measured with torch 2.14.1 on a 2-core x86 VM, one thread (about 3 minutes, and the GPTs 8).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from critbatch.jobs.cell.spec import MODELS, Cell
from critbatch.jobs.data.datasets import TaskData
from critbatch.jobs.models.zoo import build_model, loss_fn
from critbatch.jobs.sweep import sizing
from critbatch.jobs.sweep.grid import load_grid, preset_names

TABLE = Path(__file__).resolve().parents[1] / "jobs" / "sweep" / "memory.json"
#: Model options whose architecture differs enough to need an entry of its own (beside the presets').
VARIANTS = {"vgg16": [{"batch_norm": False}]}


def cells() -> list[Cell]:
    """One cell per model, dataset and variant, then every cell of the shipped presets; entries are
    deduplicated by their memory key later."""
    out = []
    for model, datasets in MODELS.items():
        for dataset in datasets:
            for options in [{}, *VARIANTS.get(model, [])]:
                out.append(Cell.from_dict({
                    "dataset": {"name": dataset}, "model": model, "strategy": "blr", "batch_size": 1,
                    "base_lr": 0.1, "base_batch": 1, "epochs": 1.0, "model_options": options}))
    for name in preset_names():
        out.extend(load_grid(name).cells())
    return out


def synthetic(cell: Cell, batch: int, gen: torch.Generator) -> tuple[TaskData, torch.Tensor, torch.Tensor]:
    """A stand-in for the cell's data (shapes, classes, vocabulary) and one training batch (x, y)."""
    shape = sizing.input_shape(cell)
    task = cell.task
    classes = {"classification": sizing.dataset_classes(cell), "segmentation": 19}.get(task)
    if task == "language_model":
        tokens, vocab = shape
        x = torch.randint(0, vocab, (batch, tokens), generator=gen)
        y = torch.randint(0, vocab, (batch, tokens), generator=gen)
        data = TaskData(cell.dataset.name, task, 2, None, vocab, {}, train_x=x[:2])
    elif task == "regression":
        x, y = torch.randn(batch, *shape, generator=gen), torch.randn(batch, generator=gen)
        data = TaskData(cell.dataset.name, task, 2, None, None, {}, train_x=x[:2])
    else:
        x = torch.randn(batch, *shape, generator=gen)
        label_shape = (batch, *shape[1:]) if task == "segmentation" else (batch,)
        y = torch.randint(0, classes, label_shape, generator=gen)
        data = TaskData(cell.dataset.name, task, 2, classes, None, {}, train_x=torch.zeros(2, *shape))
    return data, x, y


def saved_bytes(model: nn.Module, cell: Cell, batch: int, precision: str) -> int:
    """Bytes of the distinct storages autograd saves in one forward of ``batch`` examples (loss included)."""
    gen = torch.Generator().manual_seed(0)
    data, x, y = synthetic(cell, batch, gen)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage._cdata] = storage.nbytes()  # the storage itself (a fake tensor's has no data pointer)
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss = loss_fn(data.task)(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def measure(cell: Cell) -> dict:
    """The table entry of ``cell``'s model and input: counted on fake tensors when a real step is too costly here."""
    if is_counted(cell):
        return counted(cell)
    gen = torch.Generator().manual_seed(0)
    data, _, _ = synthetic(cell, 2, gen)
    torch.manual_seed(0)
    model = build_model(cell, data)
    saved, peak = {}, {}
    for precision in ("fp32", "bf16"):
        s1, s2 = (saved_bytes(model, cell, b, precision) for b in SAVED_AT)
        saved[precision] = round((s2 - s1) / (SAVED_AT[1] - SAVED_AT[0]))
        # Peaks at batches whose saved tensors are about 128 and 256 MiB: well above the RSS's noise.
        low = max(2, round(128 * 2 ** 20 / max(saved[precision], 1)))
        p1, p2 = (step_peak(sizing.memory_key(cell), b, precision) for b in (low, 2 * low))
        peak[precision] = round((p2 - p1) / low)
    return {
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "batch_norm": any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
        "saved_bytes_per_sample": saved,
        "peak_bytes_per_sample": peak,
    }


#: Batch sizes of the saved-tensor count.
SAVED_AT = (2, 4)


# ---- counted on fake tensors: models whose step is too costly for a CPU -------------------------------


#: A language model whose forward of one example costs more multiply-adds than this (parameters x tokens) is
#: counted, not run: bf16 products run unvectorised on CPUs without bf16 instructions (GPT-2 small: four
#: minutes for one 128-token example's step, against seven seconds in fp32, on one core of the VM here).
COUNT_ABOVE = 10 ** 9
COUNTED_METHOD = (
    "counted, not run: one training step (forward, backward, SGD update) on fake tensors (torch FakeTensorMode: "
    "shapes and dtypes, no data) at the full shape; saved_bytes_per_sample as for every entry, "
    "peak_bytes_per_sample the slope of the peak of live tensor bytes between two batches whose saved tensors "
    "are at least 4x the weights (torch.distributed._tools.mem_tracker."
    "MemTracker, blocks of 512 bytes as the CUDA allocator's), not of a resident set")


def is_counted(cell: Cell) -> bool:
    """Whether ``cell``'s entry is counted on fake tensors: a language model over COUNT_ABOVE (tokens x parameters)."""
    if cell.task != "language_model":
        return False
    tokens = sizing.input_shape(cell)[0]
    data, _, _ = synthetic(cell, 1, torch.Generator().manual_seed(0))
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(cell, data).parameters())
    return params * tokens > COUNT_ABOVE


def counted(cell: Cell) -> dict:
    """The table entry of ``cell`` counted on fake tensors (COUNTED_METHOD)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        data, _, _ = synthetic(cell, 2, torch.Generator().manual_seed(0))
        model = build_model(cell, data)
        saved, peak = {}, {}
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for precision in ("fp32", "bf16"):
            s1, s2 = (saved_bytes(model, cell, b, precision) for b in SAVED_AT)
            saved[precision] = round((s2 - s1) / (SAVED_AT[1] - SAVED_AT[0]))
            # Peaks at batches whose saved tensors are at least 4x the weights, so that the backward's peak, not
            # the gradients' or the update's, is the step's (fake tensors take no memory at any batch).
            low = max(SAVED_AT[0], math.ceil(4 * param_bytes / max(saved[precision], 1)))
            p1, p2 = (live_peak(cell, b, precision) for b in (low, 2 * low))
            peak[precision] = round((p2 - p1) / low)
    return {
        "param_bytes": param_bytes,
        "batch_norm": any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
        "saved_bytes_per_sample": saved,
        "peak_bytes_per_sample": peak,
        "method": COUNTED_METHOD,
    }


def live_peak(cell: Cell, batch: int, precision: str) -> int:
    """Peak live tensor bytes of one SGD step of ``batch`` examples after a first step on one (under fake mode)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    data, x, y = synthetic(cell, batch, torch.Generator().manual_seed(0))
    model = build_model(cell, data)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    tracker = MemTracker()
    tracker.track_external(model, opt, x, y)
    with tracker:
        for rows in (1, batch):  # the first step allocates the gradients and the momentum, as step_peak_here's
            with autocast:
                loss = loss_fn(data.task)(model(x[:rows]), y[:rows])
            loss.backward()
            opt.step()
            tracker.reset_mod_stats()  # per-module figures only (it refuses a module's second forward otherwise)
    return sum(device["Total"] for device in tracker.get_tracker_snapshot("peak").values())


# ---- one real step's peak, in a fresh process ---------------------------------------------------------


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` figure (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def step_peak_here(key: str, batch: int, precision: str) -> int:
    """Peak resident set of one SGD step of ``batch`` examples above the resident set just before it."""
    cell = next(c for c in cells() if sizing.memory_key(c) == key)
    gen = torch.Generator().manual_seed(0)
    data, x, y = synthetic(cell, batch, gen)
    model = build_model(cell, data)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    # A first step on one example allocates the gradients and the momentum: the fixed state.
    with autocast:
        loss_fn(data.task)(model(x[:1]), y[:1]).backward()
    opt.step()
    gc.collect()
    # Writing 5 to clear_refs resets the peak (VmHWM) to the current resident set: the step's own peak.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_bytes("VmRSS")
    with autocast:
        loss = loss_fn(data.task)(model(x), y)
    loss.backward()
    opt.step()
    return _status_bytes("VmHWM") - before


def step_peak(key: str, batch: int, precision: str) -> int:
    """``step_peak_here`` in a fresh interpreter, so no earlier allocation hides the peak."""
    out = subprocess.run([sys.executable, __file__, "--peak-here", key, "--batch", str(batch),
                          "--precision", precision], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"measuring {key} at batch {batch} ({precision}) failed:\n{out.stderr}")
    return int(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="only these models (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the entries, do not write the table")
    parser.add_argument("--check", metavar="KEY", help="one step's peak at --batch against the estimate")
    parser.add_argument("--peak-here", metavar="KEY", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.peak_here:
        print(step_peak_here(args.peak_here, args.batch, args.precision))
        return 0
    mib = 2 ** 20
    if args.check:
        entry = sizing.load_table()[args.check]
        measured = step_peak(args.check, args.batch, args.precision)
        estimate = args.batch * sizing.per_sample_bytes(entry, args.precision)
        saved = args.batch * entry["saved_bytes_per_sample"][args.precision]
        print(f"{args.check} batch {args.batch} {args.precision}: one step peaks {measured / mib:.1f} MiB above the "
              f"resting RSS; estimate {estimate / mib:.1f} MiB (saved tensors alone {saved / mib:.1f} MiB)")
        return 0
    table = json.loads(TABLE.read_text()) if TABLE.is_file() else {}
    entries = dict(table.get("entries", {}))
    seen = set()
    for cell in cells():
        key = sizing.memory_key(cell)
        if key in seen or (args.only and cell.model not in args.only):
            continue
        seen.add(key)
        if sizing.input_shape(cell) is None:
            print(f"{key:<32} skipped: sizing.INPUT_SHAPES has no shape for dataset {cell.dataset.name!r}")
            continue
        entries[key] = entry = measure(cell)
        if not args.dry_run:
            write_table(entries)
        saved, peak = entry["saved_bytes_per_sample"], entry["peak_bytes_per_sample"]
        print(f"{key:<32} MiB/sample saved {saved['fp32'] / mib:8.3f} fp32 {saved['bf16'] / mib:8.3f} bf16, "
              f"peak {peak['fp32'] / mib:8.3f} fp32 {peak['bf16'] / mib:8.3f} bf16; params "
              f"{entry['param_bytes'] / mib:6.1f} MiB; batch_norm {entry['batch_norm']}", flush=True)
    if not args.dry_run:
        print(f"wrote {len(entries)} entries to {TABLE}")
    return 0


def write_table(entries: dict[str, dict]) -> None:
    """memory.json, rewritten after each entry (a long run that stops keeps what it measured)."""
    table = {
        "about": "Per-sample training memory of each model and input size, measured on the CPU by "
                 "benchmarks/measure_memory.py (an entry with a method: counted on fake tensors, as it says); "
                 "read by jobs/sweep/sizing.py.",
        "torch": torch.__version__.split("+")[0],
        "entries": dict(sorted(entries.items())),
    }
    TABLE.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
