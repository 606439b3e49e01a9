"""Each cell sized for its hardware: GPUs and gradient accumulation from a per-sample memory estimate.

    critbatch cells table2-cifar10-resnet34      # the plan (devices, micro-batch, accumulation) on stderr

One device of a cell holds, in bytes::

    estimate(micro) = fixed + micro x per_sample
    fixed           = (STATE_COPIES + the optimizer's copies past one) x the model's fp32 weights
                      (weights, gradients, DDP's buckets, the optimizer's state: SGD's momentum, Adam's two moments)
                      + the training data, resident on the device
                      + RESERVED_BYTES on a GPU (CUDA context, workspaces), RESERVED_CPU_BYTES in a CPU pod
    per_sample      = a training step's peak memory per example (memory.json), at least what autograd
                      saves per example for the backward

``per_sample`` was measured once per model and input size on the CPU (benchmarks/measure_memory.py
writes memory.json beside this file; torch stays out of this package, which only reads the table). A
language model too costly to step on a CPU (GPT-2 small at 1024 tokens) is counted instead: one step on
fake tensors at its full shape, its peak the live tensor bytes rather than a resident set; its entry
says so in ``method``. A token set's windows stream from its files, so its data adds nothing. A
device offers ``USABLE`` of its memory: ``resources.gpu_memory``, else the memory of
``resources.gpu_type`` (GPU_MEMORY, or the "-80GB" in the product name), else DEFAULT_GPU_MEMORY, with
a warning; a CPU cell (gpus 0) offers its pod's ``resources.memory``.

The plan of a cell: the fewest devices whose share of the batch fits one device (so small cells take
one GPU), up to ``resources.gpus`` per node and ``resources.nodes`` nodes; only when even all of them
cannot hold the batch at once, accumulation: the fewest micro-batches per step that fit. A grid may
pin ``accumulation`` or ``micro_batch`` (then the other follows); ``resources.sizing: fixed`` runs
every cell on all the grid's devices as written. A model with no table entry (a plug-in model, or
options the table does not list) gets one device and no accumulation, and the plan says so.

Identity: the layout changes a result only through BatchNorm, which normalises over each device's
micro-batch. So a BatchNorm cell on several devices (without ``sync_bn``) records its ``micro_batch``;
on one device it is implied by batch_size / accumulation, and the field stays unset, as does every
other model's, whose id therefore does not depend on the hardware unless accumulation changes.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from importlib import resources as importlib_resources
from typing import Any, Iterable

from ..cell.errors import ConfigError
from ..cell.options import dataset_options, model_options
from ..cell.spec import DATASETS, Cell

GiB = 2 ** 30

#: Copies of the fp32 weights a training device holds with one copy of optimizer state: weights, gradients,
#: DDP's buckets and SGD's momentum. An optimizer with more (Adam: two moments) adds the rest (state_copies()).
STATE_COPIES = 4
#: Per-device memory no estimate sees: the CUDA context, cuDNN and cuBLAS workspaces.
RESERVED_BYTES = GiB
#: The same in a CPU pod: the interpreter with torch loaded (about 0.7 GiB resident with the CUDA build's
#: libraries mapped, of which part is shared file pages).
RESERVED_CPU_BYTES = GiB // 2
#: Share of a device's memory the plan fills (the caching allocator fragments the rest).
USABLE = 0.9
#: A GPU's memory when the grid names neither gpu_memory nor a gpu_type whose memory is known:
#: the smallest common data-centre GPU (T4, V100-16GB).
DEFAULT_GPU_MEMORY = 16 * GiB

#: Memory of the GPUs named by their ``nvidia.com/gpu.product`` label (NVIDIA GPU feature discovery),
#: as the driver reports it; a name ending in "-<N>GB" not listed here is read as N GiB.
GPU_MEMORY = {
    "Tesla-T4": 15 * GiB,
    "Tesla-V100-SXM2-16GB": 16 * GiB,
    "Tesla-V100-SXM2-32GB": 32 * GiB,
    "NVIDIA-A10G": 22 * GiB,
    "NVIDIA-L4": 22 * GiB,
    "NVIDIA-L40S": 45 * GiB,
    "NVIDIA-A100-SXM4-40GB": 40 * GiB,
    "NVIDIA-A100-SXM4-80GB": 80 * GiB,
    "NVIDIA-A100-80GB-PCIe": 80 * GiB,
    "NVIDIA-H100-80GB-HBM3": 79 * GiB,
    "NVIDIA-H100-PCIe": 79 * GiB,
    "NVIDIA-H200": 140 * GiB,
}
_GB_IN_NAME = re.compile(r"-(\d+)GB\b")

#: Shapes of one training example as the models see it, by dataset (MNIST is padded to 32x32);
#: Cityscapes and linreg take theirs from their options. A language model's "shape" is its tokens per
#: sample and its vocabulary, which sizes the logits.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "mnist": (1, 32, 32), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "svhn": (3, 32, 32),
    "digits": (1, 8, 8), "mnist1d": (1, 40), "wikitext2": (35, 33278),
}
#: Token datasets (critbatch.jobs.data.tokens): an example is a window of the options' seq_len tokens, the
#: vocabulary the options' vocab_size or this figure; the windows stream from memory-mapped files, so none of
#: the data stays on the device.
TOKEN_SETS: dict[str, int | None] = {"tokens": None, "pycorpus": 256}
#: Bytes of one stored example (inputs and labels as the loaders hold them on the device), and test-split
#: sizes: the data a cell keeps resident on its device.
_STORED = {"uint8_image": 1, "float_image": 4}
TEST_SIZES = {"mnist": 10000, "cifar10": 10000, "cifar100": 10000, "svhn": 26032, "cityscapes": 500,
              "wikitext2": 7376, "digits": 360}


def input_shape(cell: Cell) -> tuple[int, ...] | None:
    """The shape of one example of the cell's dataset, or None for a dataset this table does not know."""
    name = cell.dataset.name
    if name == "cityscapes":
        return (3, *dataset_options(cell.dataset).size)
    if name == "linreg":
        return (dataset_options(cell.dataset).d,)
    if name in TOKEN_SETS:
        options = dataset_options(cell.dataset)
        return (options.seq_len, getattr(options, "vocab_size", TOKEN_SETS[name]))
    return INPUT_SHAPES.get(name)


def dataset_classes(cell: Cell) -> int | None:
    return DATASETS.get(cell.dataset.name, {}).get("classes")


def example_bytes(cell: Cell) -> int:
    """Bytes the loaders keep per example (inputs and labels), 0 for a dataset this table does not know."""
    shape = input_shape(cell)
    if shape is None:
        return 0
    name = cell.dataset.name
    if cell.task == "language_model":
        return 2 * shape[0] * 8  # int64 inputs and targets
    if name in ("digits", "linreg", "mnist1d"):
        return 4 * _product(shape) + 8  # float32 features
    label = _product(shape[1:]) if cell.task == "segmentation" else 8  # uint8 label map | int64 class
    return _product(shape) + label


def data_bytes(cell: Cell) -> int:
    """The training and test data the cell keeps on its device (none of a token set's)."""
    if cell.dataset.name in TOKEN_SETS:
        return 0
    train = cell.train_size() or 0
    return (train + TEST_SIZES.get(cell.dataset.name, 0)) * example_bytes(cell)


def memory_key(cell: Cell) -> str:
    """The table key of the cell's model and input: ``resnet34/3x32x32``, ``vgg16[batch_norm=false]/...``."""
    shape = input_shape(cell)
    try:
        effective = model_options(cell.model, cell.model_options)
    except (ConfigError, KeyError):
        effective = None
    changed = ""
    if effective is not None:
        defaults = type(effective)().model_dump()
        diff = {k: v for k, v in effective.model_dump().items() if v != defaults[k]}
        if diff:
            changed = "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(diff.items())) + "]"
    return f"{cell.model}{changed}/{'x'.join(map(str, shape)) if shape else cell.dataset.name}"


@functools.lru_cache(maxsize=1)
def load_table() -> dict[str, dict[str, Any]]:
    """memory.json's entries by key (shipped beside this module)."""
    text = (importlib_resources.files("critbatch.jobs.sweep") / "memory.json").read_text()
    return json.loads(text)["entries"]


def per_sample_bytes(entry: dict[str, Any], precision: str) -> int:
    """Training bytes per example on one device: the measured peak's slope, at least the saved tensors'."""
    return max(entry["saved_bytes_per_sample"][precision], entry["peak_bytes_per_sample"][precision])


def _product(values: Iterable[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


# ---- the device a cell runs on -------------------------------------------------------------------------


_UNITS = {"": 1, "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15, "E": 10 ** 18,
          "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60, "m": 10 ** -3}


def quantity_value(quantity: int | float | str) -> float:
    """A Kubernetes quantity as a number of base units: ``"32Gi"`` -> 34359738368, ``"7500m"`` -> 7.5."""
    if not isinstance(quantity, str):
        return float(quantity)
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", quantity).groups()
    return float(number) * _UNITS[unit]


def scale_quantity(quantity: int | float | str, share: float, *, cpu: bool) -> int | str:
    """``quantity`` times ``share``: whole CPUs or millicores; memory in the largest binary unit that is exact."""
    value = quantity_value(quantity) * share
    if cpu:
        milli = math.ceil(round(value * 1000, 6))
        return milli // 1000 if milli % 1000 == 0 else f"{milli}m"
    whole = math.ceil(round(value, 3))
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        if whole % _UNITS[unit] == 0:
            return f"{whole // _UNITS[unit]}{unit}"
    return whole


def device_memory(resources: Any) -> tuple[int, str, str]:
    """(bytes of one device, where the figure comes from, a warning or "")."""
    if resources.gpus == 0:
        return int(quantity_value(resources.memory)), f"the pod's resources.memory {resources.memory}", ""
    if resources.gpu_memory is not None:
        return int(quantity_value(resources.gpu_memory)), f"resources.gpu_memory {resources.gpu_memory}", ""
    if resources.gpu_type:
        if resources.gpu_type in GPU_MEMORY:
            return GPU_MEMORY[resources.gpu_type], f"resources.gpu_type {resources.gpu_type}", ""
        if match := _GB_IN_NAME.search(resources.gpu_type):
            return int(match.group(1)) * GiB, f"the {match.group(1)}GB in resources.gpu_type", ""
    known = f"resources.gpu_type {resources.gpu_type!r} is not in the table" if resources.gpu_type else \
        "neither resources.gpu_memory nor resources.gpu_type is set"
    return (DEFAULT_GPU_MEMORY, f"the default {DEFAULT_GPU_MEMORY // GiB} GiB",
            f"resources.gpu_memory: {known}; cells are sized for GPUs of {DEFAULT_GPU_MEMORY // GiB} GiB "
            f"(set resources.gpu_memory, e.g. 80Gi)")


# ---- the plan of one cell -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """What one cell's pods ask for: ``nodes`` pods of ``gpus`` GPUs each (0: one CPU process per pod)."""

    nodes: int
    gpus: int

    @property
    def procs_per_node(self) -> int:
        return max(1, self.gpus)

    @property
    def world(self) -> int:
        return self.procs_per_node * self.nodes

    @property
    def name(self) -> str:
        """The resource class, a DNS label: ``1gpu``, ``4gpu``, ``8gpu-2n`` (two nodes), ``cpu``."""
        base = f"{self.gpus}gpu" if self.gpus else "cpu"
        return base if self.nodes == 1 else f"{base}-{self.nodes}n"

    def describe(self) -> str:
        """``1 GPU``, ``4 GPUs``, ``2x8 GPUs``, ``1 CPU``."""
        count = f"{self.nodes}x{self.procs_per_node}" if self.nodes > 1 else str(self.procs_per_node)
        return f"{count} {'GPU' if self.gpus else 'CPU'}{'s' if self.world > 1 else ''}"


@dataclass(frozen=True)
class CellPlan:
    """How one cell runs: its placement, and the batch arithmetic m = micro x accumulation x world."""

    placement: Placement
    accumulation: int
    micro_batch: int
    estimate: int | None  # bytes on one device at this micro-batch; None without a table entry
    note: str = ""  # where the plan departs from what the estimate alone gives

    @property
    def world(self) -> int:
        return self.placement.world


@dataclass(frozen=True)
class Fit:
    """What one cell's model needs on one device: fixed bytes (its state and data), bytes per example, and
    whether it has BatchNorm."""

    fixed: int
    per_sample: int
    batch_norm: bool


def fit_of(cell: Cell) -> Fit | None:
    """``cell``'s :class:`Fit`, or None when the table has no entry for its model and input."""
    entry = load_table().get(memory_key(cell))
    if entry is None:
        return None
    fixed = state_copies(cell) * entry["param_bytes"] + data_bytes(cell)
    return Fit(fixed, per_sample_bytes(entry, cell.precision), entry["batch_norm"])


def state_copies(cell: Cell) -> int:
    """fp32 copies of the weights one device holds for ``cell``: STATE_COPIES, plus the optimizer's past one."""
    return STATE_COPIES + max(0, cell.optimizer.state_copies() - 1)


def fit_key(cell: Cell) -> str:
    """What :func:`fit_of` depends on, as a string: a grid of 10,000 cells has a handful of them."""
    return json.dumps([cell.model, cell.model_options, cell.dataset.model_dump(), cell.precision,
                       state_copies(cell)], sort_keys=True,
                      default=str)


def reserved_bytes(resources: Any) -> int:
    """What a device of ``resources`` holds before the cell's own bytes: a GPU's CUDA context, a CPU pod's torch."""
    return RESERVED_BYTES if resources.gpus else RESERVED_CPU_BYTES


def _worlds(resources: Any) -> list[int]:
    """World sizes a cell may take, fewest first: 1 to gpus on one node, then whole nodes."""
    per, nodes = resources.procs_per_node, resources.nodes
    if resources.sizing == "fixed":
        return [per * nodes]
    return list(range(1, per + 1)) + [per * k for k in range(2, nodes + 1)]


def _placement(world: int, resources: Any) -> Placement:
    per = resources.procs_per_node
    if world <= per:
        return Placement(1, world if resources.gpus else 0)
    return Placement(world // per, resources.gpus)


def _smallest_accumulation(share: int, fit: int) -> int | None:
    """The fewest micro-batches that split ``share`` evenly into parts of at most ``fit``."""
    for parts in range(max(1, -(-share // max(fit, 1))), share + 1):
        if share % parts == 0 and share // parts <= fit:
            return parts
    return None


def plan_cell(cell: Cell, resources: Any, budget: int, fit: Fit | None, *, accumulation: int | None = None,
              micro_batch: int | None = None) -> CellPlan:
    """The plan of ``cell`` (whose model needs ``fit``) on devices of ``budget`` usable bytes;
    ``accumulation``/``micro_batch``: pinned.

    Raises ConfigError (one line, naming the field to change) when no plan exists.
    """
    b = cell.batch_size
    reserved = reserved_bytes(resources)
    most = max(0, (budget - reserved - fit.fixed) // fit.per_sample) if fit else None
    worlds = [w for w in _worlds(resources) if b % w == 0]
    what = f"cell {cell.id} ({cell.model}, batch {b})"
    note = ""
    if micro_batch is not None:
        if b % micro_batch:
            raise ConfigError(f"micro_batch: {micro_batch} does not divide the batch of {what}")
        k = b // micro_batch  # world x accumulation
        if accumulation is not None:
            world = k // accumulation if k % accumulation == 0 else 0
            if world not in worlds:
                raise ConfigError(f"micro_batch: {micro_batch} x accumulation {accumulation} needs "
                                  f"{b / (micro_batch * accumulation):g} devices for {what}; allowed: "
                                  f"{', '.join(map(str, worlds)) or 'none (resources.sizing fixed)'}")
        else:
            # Spread over devices first; accumulate only past the last one.
            fitting = [w for w in worlds if k % w == 0]
            if not fitting:
                raise ConfigError(f"micro_batch: {micro_batch} leaves {k} micro-batches per step for {what}, "
                                  f"which {worlds[0] if worlds else 'no'} devices cannot share evenly")
            world = max(fitting)
            accumulation = k // world
        if most is not None and micro_batch > most:
            note = f"micro-batch {micro_batch} is over the estimated fit of {most}"
    else:
        if not worlds:
            raise ConfigError(f"resources: world size {_worlds(resources)[0]} does not divide the batch of {what}; "
                              "change the batch, or resources.sizing to auto")
        a = accumulation or 1
        even = [w for w in worlds if (b // w) % a == 0]  # the accumulation splits each device's share evenly
        if not even:
            raise ConfigError(f"accumulation: {a} does not split the batch of {what} evenly over "
                              f"{', '.join(map(str, worlds))} devices")
        if fit is None:
            world, accumulation = even[0], a
            note = f"no memory estimate for {memory_key(cell)}: the fewest devices, no accumulation"
        elif most == 0:
            need = (reserved + fit.fixed + fit.per_sample) / GiB
            raise ConfigError(f"resources: one example of {what} needs about {need:.1f} GiB on one device, more "
                              f"than the {budget / GiB:.1f} GiB usable; set resources.gpu_memory or a larger gpu_type")
        elif fitting := [w for w in even if b // (w * a) <= most]:
            world, accumulation = fitting[0], a
        elif accumulation is None:
            world = worlds[-1]
            accumulation = _smallest_accumulation(b // world, most)
        else:
            world = even[-1]
            note = f"micro-batch {b // (world * a)} is over the estimated fit of {most} (accumulation pinned)"
    micro = b // (world * accumulation)
    estimate = reserved + fit.fixed + micro * fit.per_sample if fit else None
    return CellPlan(_placement(world, resources), accumulation, micro, estimate, note)


def identity_fields(cell: Cell, plan: CellPlan, fit: Fit | None) -> dict[str, Any]:
    """The cell fields the plan sets: accumulation, and micro_batch where BatchNorm makes it change the result.

    A model without a table entry counts as having BatchNorm (its id then records its layout to be safe).
    """
    batch_norm = fit.batch_norm if fit else True
    split = plan.world > 1 and not cell.sync_bn
    return {"accumulation": plan.accumulation, "micro_batch": plan.micro_batch if batch_norm and split else None}


def sync_bn_problems(cell: Cell, plan: CellPlan, resources: Any, fit: Fit | None) -> list[str]:
    """``sync_bn`` on a model without BatchNorm, or on several CPU processes (SyncBatchNorm runs on GPUs)."""
    if not cell.sync_bn:
        return []
    if fit is not None and not fit.batch_norm:
        return [f"sync_bn: model {memory_key(cell).split('/')[0]!r} has no BatchNorm layers to synchronise"]
    if resources.gpus == 0 and plan.world > 1:
        return ["sync_bn: torch's SyncBatchNorm runs on GPUs only; set resources.gpus, or sync_bn false"]
    return []


# ---- the plan of a grid, printed --------------------------------------------------------------------------


def format_plan(sweep: str, cells: list[Cell], plans: list[CellPlan], memory: tuple[int, str, str],
                resources: Any) -> str:
    """What ``critbatch cells`` and ``critbatch render`` print to stderr before anything is created."""
    size, source, warning = memory
    per = resources.procs_per_node
    most = f"{resources.nodes}x{per}" if resources.nodes > 1 else str(per)
    unit = "GPUs" if resources.gpus else "CPU processes"
    lines = [f"plan of sweep {sweep}: {len(cells)} cells on up to {most} {unit} each, "
             f"{size / GiB:.1f} GiB per device ({source}), {USABLE:.0%} of it usable"]
    rows = [("CELL", "MODEL", "PRECISION", "BATCH", "DEVICES", "MICRO", "ACCUM", "EST/DEVICE", "NOTE")]
    for cell, plan in zip(cells, plans):
        est = f"{plan.estimate / GiB:.1f} GiB" if plan.estimate is not None else "-"
        batch = str(cell.batch_size) if cell.ramp is None else f"{cell.batch_size}->{cell.ramp.phases[-1].batch}"
        rows.append((cell.id, cell.model, cell.precision, batch, plan.placement.describe(),
                     str(plan.micro_batch), str(plan.accumulation), est, plan.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    if warning:
        lines.append(f"warning: {warning}")
    missing = sorted({memory_key(c) for c, p in zip(cells, plans) if p.estimate is None})
    if missing:
        lines.append(f"warning: no memory estimate for {', '.join(missing)} (jobs/sweep/memory.json): those cells "
                     "take one device without accumulation; measure them with benchmarks/measure_memory.py")
    return "\n".join(lines)
