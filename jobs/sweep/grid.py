"""Grid specs: a YAML file (or a shipped preset) whose axes expand into cells.

    critbatch presets                       # the paper's experiments, one preset per figure or table
    critbatch cells table1-cifar10-resnet34 # every cell of a grid: id and JSON
    critbatch render GRID | kubectl apply -f -

A grid spec names a cell field at the top level (``batch_size``, ``strategy``,
``dataset``, ...) with either one value or a list of values; the cells are the
cross product of every list. Fields that are themselves mappings expand too:
``dataset: {name: cifar10, fraction: [0.25, 0.5, 1.0]}`` is three values of
``dataset``, and ``dataset: [{name: mnist, max_train: 50000}, {name: cifar10}]``
two. Beside the cell fields a grid says where and how its cells run
(``resources``, ``image``, ``store``, ``backend``, ``namespace``, ``queue``, ...);
those never change a cell's id.

A ``ramp`` block (or a list of them) adds batch-size ramps (docs/ramp.md): one
cell per grid cell whose batch_size is the ramp's first batch, the same but
for its ``ramp``. So ``batch_size: [32, 128]`` with a ramp from 32 to 128 is
three cells: constant 32, constant 128 and the ramp.

A ``branch`` block (or a list of them) adds branch cells (docs/branches.md):
for each base cell it selects (``from``), one cell per kept point, multiplier
and seed, which starts from the base's kept checkpoint at that point and trains
at multiplier x its batch. They follow the grid's own cells.

Everything is validated before anything is rendered, written or run, and every
problem is reported at once with its path in the spec (``batch_size[3]: ...``,
``dataset.fraction[1]: ...``) as one :class:`ConfigError`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, WithJsonSchema, create_model, field_validator

from . import sizing
from .. import backends
from ..backends import k8s
from .cost import branch_cost
from .searchspec import SearchSpec
from .sizing import CellPlan, Placement
from ..cell.analysis_args import parse_analyze_args
from ..cell.errors import ConfigError
from ..cell.inputs import MAX_DEPTH, clip, read_text, shown
from ..cell.layout import store_problem
from ..cell.registry import third_party_line
from ..cell.spec import BranchLength, Cell, Fraction, RampSpec
from ..cell.sweepfile import sweep_document
from ..cell.validation import (
    Matches,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Strict,
    error_lines,
    invalid,
)

#: Cell fields a grid may set (the sweep is the grid's own name; branches and ramps come from their blocks).
CELL_FIELDS = tuple(name for name in Cell.model_fields if name not in ("sweep", "branch", "ramp"))
#: The grid's key for its branch block(s).
BRANCH = "branch"
#: The grid's key for its ramp block(s).
RAMP = "ramp"
#: Upper bound on one grid's cells: a typo such as a 1000-value axis should fail, not render 10^7 objects.
MAX_CELLS = 100_000

_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")

DNSLabel = Annotated[str, Matches(k8s.DNS_LABEL.pattern, "a DNS-1123 label", max_length=63)]
DNSSubdomain = Annotated[str, Matches(f"^{_DNS_SUBDOMAIN}$", "a DNS-1123 subdomain", max_length=253)]
LabelValue = Annotated[str, Matches(k8s.LABEL_VALUE.pattern, "a valid label value", max_length=k8s.MAX_LABEL_VALUE)]


def _quantity(value: Any) -> Any:
    """A Kubernetes quantity: a positive number, or a string such as 7500m or 32Gi."""
    if isinstance(value, bool):
        ok = False
    elif isinstance(value, (int, float)):
        ok = value > 0
    else:
        ok = isinstance(value, str) and bool(_QUANTITY.match(value)) and float(re.sub(r"[a-zA-Z]+$", "", value)) > 0
    if not ok:
        raise invalid(f"{shown(value)} is not a Kubernetes quantity (e.g. 8, 7500m, 32Gi)")
    return value


Quantity = Annotated[
    Union[int, float, str],
    BeforeValidator(_quantity),
    WithJsonSchema({"anyOf": [{"type": "number", "exclusiveMinimum": 0},
                              {"type": "string", "pattern": _QUANTITY.pattern}]}),
]


class Toleration(Strict):
    """A pod toleration, as Kubernetes spells it."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None


class Resources(Strict):
    """What the cells may ask of the cluster: up to ``gpus`` per node on up to ``nodes`` nodes.

    Each cell takes what its batch needs (sizing.py): the fewest devices that hold it, and a share of
    ``cpu``, ``memory`` and ``shm`` in proportion to its GPUs.
    """

    gpus: NonNegativeInt = Field(1, description="GPUs per node a cell may take (each takes the fewest that hold "
                                 "its batch); 0 runs one process per node on the CPU")
    nodes: PositiveInt = Field(1, description="nodes a cell may take")
    cpu: Quantity = Field(8, description="a Kubernetes quantity: 8, \"7500m\"; for gpus GPUs (a cell on fewer asks "
                          "for its share)")
    memory: Quantity = Field("32Gi", description="for gpus GPUs, as cpu")
    shm: Quantity = Field("8Gi", description="/dev/shm size limit (DataLoader workers, NCCL), for gpus GPUs, as cpu")
    gpu_memory: Quantity | None = Field(
        None, description="memory of one GPU, e.g. 80Gi, which sizes the cells; default: that of gpu_type, else 16Gi")
    sizing: Literal["auto", "fixed"] = Field(
        "auto", description="auto: each cell on the fewest devices that hold its batch, then gradient accumulation; "
        "fixed: every cell on gpus x nodes devices, accumulation as the grid says")
    max_failed_cells: PositiveInt | None = Field(
        None, description="backend indexed: an Indexed Job stops once this many of its cells failed for good "
        "(maxFailedIndexes); default: a tenth of its cells, at least 1")
    gpu_resource: Annotated[str, Matches(f"^{_DNS_SUBDOMAIN}/[-A-Za-z0-9_.]+$",
                                         "an extended resource name (vendor/name)")] = "nvidia.com/gpu"
    gpu_type: LabelValue | None = Field(
        None, description="nodeSelector nvidia.com/gpu.product, e.g. NVIDIA-A100-SXM4-80GB")
    tolerations: list[Toleration] | None = Field(
        None, description="default: tolerate the GPU taint when gpus > 0")
    node_selector: dict[str, str] = Field(default_factory=dict)
    priority_class: DNSSubdomain | None = None
    deadline_seconds: PositiveInt = Field(
        7 * 24 * 3600, description="activeDeadlineSeconds of the whole Job, retries included")
    backoff_limit: NonNegativeInt = Field(6, description="retries; each one resumes from the newest checkpoint")
    ttl_seconds: NonNegativeInt = Field(
        3 * 24 * 3600, description="ttlSecondsAfterFinished: the logs are in the store, not the pod")
    grace_seconds: NonNegativeInt = Field(
        120, description="terminationGracePeriodSeconds: longer than a checkpoint takes")

    @property
    def procs_per_node(self) -> int:
        """Processes torchrun starts per node: one per GPU, one on a CPU-only node."""
        return max(1, self.gpus)

    @property
    def world_size(self) -> int:
        """The most processes a cell may take."""
        return self.procs_per_node * self.nodes

    def effective_tolerations(self) -> list[dict]:
        if self.tolerations is not None:
            return [t.model_dump(exclude_none=True) for t in self.tolerations]
        if self.gpus > 0:
            return [{"key": self.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
        return []


class AnalysisSpec(Strict):
    """The analysis Job that runs ``critbatch analyze`` on the sweep once its cells are done."""

    cpu: Quantity = 2
    memory: Quantity = "8Gi"
    deadline_seconds: PositiveInt = 6 * 3600
    backoff_limit: NonNegativeInt = 2
    args: list[str] = Field(default_factory=list,
                            description='extra `critbatch analyze` options, e.g. [--efficiency, "0.8"]')

    @field_validator("args")
    @classmethod
    def _analyze_accepts(cls, args: list[str]) -> list[str]:
        try:
            parse_analyze_args(args)
        except ConfigError as err:
            raise invalid("; ".join(p.removeprefix("analysis.args: ") for p in err.problems)) from None
        return args


class GridSettings(Strict):
    """The grid fields that are not cell fields: where and how the cells run."""

    sweep: Annotated[str, Matches(k8s.DNS_LABEL.pattern, "a DNS-1123 label (lower-case letters, digits and '-', "
                                  "starting and ending with a letter or digit)")] = Field(
        description="names the Jobs and the store prefix")
    description: str = ""
    reproduces: str = Field("", description="which figure or table of the paper")
    resources: Resources = Field(default_factory=Resources)
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    image: Annotated[str, Matches(r"^\S+$", "an image reference")] = k8s.DEFAULT_IMAGE
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    store: str = Field(k8s.DEFAULT_STORE, description="s3://BUCKET/PREFIX, file://DIR or a directory")
    store_secret: DNSSubdomain | None = Field(
        k8s.DEFAULT_STORE_SECRET, description="the Secret with the store's keys; null: no keys in the pods, the "
        "service account's workload identity (IRSA, EKS Pod Identity) brings the credentials")
    store_endpoint: str | None = k8s.DEFAULT_STORE_ENDPOINT
    data_root: str | None = Field(
        None, description="default: the store, under whose datasets/NAME/ `critbatch data stage` puts "
        "each dataset")
    backend: Literal[backends.NAMES] | None = Field(
        None, description=f"default: {backends.DEFAULT_ONE_NODE.name} for one node, else "
        f"{backends.DEFAULT_MULTI_NODE.name}")
    namespace: DNSLabel = k8s.DEFAULT_NAMESPACE
    queue: Annotated[str, Matches(k8s.LABEL_VALUE.pattern, "a valid label value (Kueue LocalQueue name)",
                                  max_length=k8s.MAX_LABEL_VALUE, min_length=1)] | None = Field(
        None, description="Kueue LocalQueue")
    workload_priority_class: Annotated[str, Matches(k8s.LABEL_VALUE.pattern, "a valid label value (Kueue "
                                                    "WorkloadPriorityClass name)", max_length=k8s.MAX_LABEL_VALUE,
                                                    min_length=1)] | None = Field(
        None, description="Kueue WorkloadPriorityClass of the cells' Workloads (needs queue); resources.priority_class "
        "is the pods' PriorityClass")
    max_active: NonNegativeInt = Field(0, description="cap on cells running at once (clusters without Kueue); 0 = none")
    service_account: DNSSubdomain = k8s.DEFAULT_SERVICE_ACCOUNT
    checkpoint_seconds: PositiveFloat = 300.0
    search: SearchSpec | None = Field(None, description="how `critbatch search` looks for the critical batch size "
                                      "(default: its defaults)")

    @field_validator("store")
    @classmethod
    def _openable(cls, store: str) -> str:
        problem = store_problem(store)
        if problem:
            raise invalid(problem)
        return store

    @property
    def effective_backend(self) -> str:
        return self.backend or backends.default_for(self.resources.nodes).name


GRID_FIELDS = tuple(GridSettings.model_fields)


class BranchBlock(Strict):
    """Branch cells (docs/branches.md; Merrill et al. 2025, arXiv 2505.23971): for each base cell ``from``
    selects, one cell per kept point, multiplier and seed, which continues the base from its kept checkpoint
    at that point at multiplier x its batch for ``length``, at the base's rate there scaled by ``rule``."""

    from_: Union[Annotated[str, Matches(r"^[0-9a-f]{10}$", "a cell id (10 hex digits)")], dict[str, Any]] | None = \
        Field(None, alias="from", description="the base cells: one cell's id (`critbatch cells` lists them), or "
              "fields they have, e.g. {batch_size: 4}; default: every cell with keep")
    at: list[Fraction] | None = Field(None, description="the points, among each base's keep.at (default: all its "
                                      "kept points)")
    steps: list[PositiveInt] | None = Field(None, description="the points, among each base's keep.steps")
    multipliers: list[PositiveInt] = Field(description="k: each branch trains at k x its base's batch")
    length: BranchLength = Field(description="examples (or tokens) each branch trains on, every multiplier alike")
    rule: Literal["linear", "sqrt", "oracle"] = Field(
        description="the LR at k x B from the base's rate eta_t: linear eta_t x k (SGD), sqrt eta_t x sqrt(k) "
        "(Adam), oracle m / (beta + (m - 1) lambda_1) (linreg)")
    seeds: list[int] | None = Field(None, description="data-order seeds after the point (default: the base's: "
                                    "the branch continues the base's order)")

    @field_validator("at", "steps", "multipliers", "seeds")
    @classmethod
    def _once_each(cls, values: list | None) -> list | None:
        if values is not None and len(set(values)) != len(values):
            raise invalid(f"a value is listed twice ({', '.join(f'{v:g}' for v in values)})")
        if values is not None and not values:
            raise invalid("list at least one value")
        return values


@dataclass
class Grid:
    """A validated grid: its cells and how they run. Built by :func:`load_grid`."""

    sweep: str
    raw: dict  # the spec as written (for <store>/<sweep>/sweep.yaml)
    resources: Resources
    analysis: AnalysisSpec
    image: str
    image_pull_policy: str
    store: str
    store_secret: str | None
    store_endpoint: str | None
    data_root: str
    backend: str
    namespace: str
    queue: str | None
    max_active: int
    service_account: str
    checkpoint_seconds: float
    search: SearchSpec | None = None
    workload_priority_class: str | None = None
    description: str = ""
    reproduces: str = ""
    source: str = "<dict>"
    _cells: list[Cell] = field(default_factory=list, repr=False)
    _plans: list[CellPlan] = field(default_factory=list, repr=False)  # one per cell, in the same order

    def cells(self) -> list[Cell]:
        """Every cell, in a fixed order (the spec's axes in the cell's field order); ``sweep`` set."""
        return list(self._cells)

    def cell_ids(self) -> list[str]:
        """``[c.id for c in cells()]`` (each cell computes its id once)."""
        return [c.id for c in self._cells]

    def cell_jsons(self) -> list[str]:
        """Each cell's JSON with sorted keys, sweep included: the ``--cell`` argument of ``critbatch train``."""
        return [c.to_json() for c in self._cells]

    @property
    def world_size(self) -> int:
        """The most processes a cell may take (each cell's own: ``plan(cell).world``)."""
        return self.resources.world_size

    def plans(self) -> list[CellPlan]:
        """Each cell's plan (placement, micro-batch, accumulation), in the order of :meth:`cells`."""
        return list(self._plans)

    def plan(self, cell: Cell) -> CellPlan:
        return self._plan_of[cell.id]

    @cached_property
    def _plan_of(self) -> dict[str, CellPlan]:
        return {c.id: p for c, p in zip(self._cells, self._plans)}

    def resource_classes(self) -> dict[str, tuple[Placement, list[Cell]]]:
        """The cells that share a pod, by resource class (``1gpu``, ``4gpu``, ``cpu``), in cell order."""
        out: dict[str, tuple[Placement, list[Cell]]] = {}
        for cell, plan in zip(self._cells, self._plans):
            out.setdefault(plan.placement.name, (plan.placement, []))[1].append(cell)
        return out

    def plan_text(self) -> str:
        """The plan, a line per cell, and what a branch grid spends against a full grid (cost.py): what
        ``critbatch cells`` and ``critbatch render`` print to stderr."""
        plan = sizing.format_plan(self.sweep, self._cells, self._plans, sizing.device_memory(self.resources),
                                  self.resources)
        cost = branch_cost(self._cells)
        return plan if cost is None else f"{plan}\n{cost.text()}"

    def sweep_yaml(self) -> str:
        """``<store>/<sweep>/sweep.yaml``: the spec as written plus every cell it expanded to, with its plan."""
        entries = [{"id": c.id, "cell": json.loads(c.to_json()),
                    "plan": {"resource_class": p.placement.name, "nodes": p.placement.nodes,
                             "gpus": p.placement.gpus, "accumulation": p.accumulation, "micro_batch": p.micro_batch}}
                   for c, p in zip(self._cells, self._plans)]
        return sweep_document(self.raw, entries)

    def with_overrides(self, **changes: Any) -> "Grid":
        """A copy with run settings replaced (``store``, ``image``, ``namespace``, ``backend``, ...).

        Cell fields cannot be overridden here; the copy is validated like a fresh grid.
        """
        raw = dict(self.raw)
        for key, value in changes.items():
            if value is None:
                continue
            if key not in GRID_FIELDS or key == "sweep":
                raise ConfigError(f"{key}: cannot be overridden; allowed: {', '.join(GRID_FIELDS[1:])}")
            raw[key] = value
        return grid_from_dict(raw, source=self.source)


# ---- loading -------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-4`` as a string; a grid spec means the number (as YAML 1.2 does)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def preset_dir():
    """The shipped presets (a Traversable: works from a checkout and from an installed wheel)."""
    return importlib_resources.files("critbatch.jobs.sweep") / "presets"


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in preset_dir().iterdir() if p.name.endswith(".yaml"))


def parse_yaml(text: str, source: str) -> Any:
    """The YAML document in ``text``; ConfigError if it is not valid YAML, repeats a key in a mapping, or
    nests or expands (through aliases) past what a grid spec needs."""
    loader = None
    try:
        loader = _Loader(text)  # reading starts here: a character YAML does not allow fails at once
        node = loader.get_single_node()
        problems = _alias_problems(node, source) or _key_problems(node, "", set())
        if problems:
            raise ConfigError(problems)
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({clip(' '.join(str(err).split()))})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested deeper than {MAX_DEPTH} levels") from None
    finally:
        if loader is not None:
            loader.dispose()


#: Values a grid spec may hold once its aliases are expanded (a preset holds a few hundred).
MAX_NODES = 100_000


def _alias_problems(root: yaml.Node | None, source: str) -> list[str]:
    """An alias that refers to a node containing itself, or aliases that expand the document past
    MAX_NODES values or MAX_DEPTH levels (a billion laughs is a few lines of YAML)."""
    sizes: dict[int, tuple[int, int]] = {}  # node id -> (values once expanded, depth)
    open_nodes: set[int] = set()

    def expand(node: yaml.Node) -> tuple[int, int]:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise _Recursive()
        if isinstance(node, yaml.ScalarNode):
            return 1, 0
        open_nodes.add(id(node))
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        count, deep = 1, 0
        for child in children:
            n, d = expand(child)
            count, deep = min(count + n, MAX_NODES + 1), max(deep, d + 1)
        open_nodes.discard(id(node))
        sizes[id(node)] = count, deep
        return count, deep

    if root is None:
        return []
    try:
        count, deep = expand(root)
    except _Recursive:
        return [f"{source}: an alias refers to a node that contains it (a recursive alias); a grid spec is a tree"]
    if count > MAX_NODES:
        return [f"{source}: expands (through its aliases) to more than {MAX_NODES} values"]
    if deep > MAX_DEPTH:
        return [f"{source}: nested deeper than {MAX_DEPTH} levels"]
    return []


class _Recursive(Exception):
    pass


#: Tags of the keys a grid may write: names, and YAML's merge key ``<<``.
_NAME_TAGS = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:merge")


def _key_problems(node: yaml.Node | None, path: str, seen: set[int]) -> list[str]:
    """Every key that a mapping under ``node`` repeats (YAML would keep the last one silently), or that is
    not a string, by its path."""
    if node is None or id(node) in seen:  # an alias names a node already walked
        return []
    seen.add(id(node))
    out: list[str] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, yaml.Mark] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else key.start_mark.line
            where = f"{path}.{name}" if path else str(name)
            if key.tag not in _NAME_TAGS:  # 1, 0E0, yes, null or a mapping as a key: a grid's keys are names
                out.append(f"{clip(where)}: the key {clip(str(name))} at {_position(key.start_mark)} is not a name; "
                           "quote it to make it one")
            elif name in first:
                out.append(f"{where}: repeated at {_position(key.start_mark)} (first at {_position(first[name])}); "
                           "a key may appear once")
            else:
                first[name] = key.start_mark
            out.extend(_key_problems(value, where, seen))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.extend(_key_problems(item, f"{path}[{i}]", seen))
    return out


def _position(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1} column {mark.column + 1}"


def load_grid(spec: str | Path | dict) -> Grid:
    """A grid from a YAML path, a preset name (``critbatch presets``) or an already parsed mapping.

    Raises :class:`ConfigError` with every problem, each with its path in the spec.
    """
    if isinstance(spec, dict):
        return grid_from_dict(spec)
    text, source = _read_spec(str(spec))
    return grid_from_dict(parse_yaml(text, source), source=source)


def _read_spec(spec: str) -> tuple[str, str]:
    if not spec.strip() or "\0" in spec:
        raise ConfigError(f"grid: {shown(spec)} is neither a file nor a preset name (`critbatch presets`)")
    path = Path(spec).expanduser()
    looks_like_path = spec.endswith((".yaml", ".yml")) or "/" in spec
    if path.is_file() or (looks_like_path and path.exists()):
        return read_text(path, "grid"), str(path)
    if not looks_like_path:
        preset = preset_dir() / f"{spec}.yaml"
        if preset.is_file():
            return preset.read_text(), f"preset {spec}"
    names = ", ".join(preset_names())
    raise ConfigError(f"grid: no file {shown(spec)} and no preset of that name; presets: {names}")


def grid_from_dict(data: Any, source: str = "<dict>") -> Grid:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a grid spec must be a mapping, got {type(data).__name__}")
    problems = [f"{key}: unknown field; allowed: {', '.join(GRID_FIELDS + CELL_FIELDS + (RAMP, BRANCH))}"
                for key in data if key not in GRID_FIELDS and key not in CELL_FIELDS and key not in (RAMP, BRANCH)]
    settings = None
    try:
        settings = GridSettings.model_validate({k: v for k, v in data.items() if k in GRID_FIELDS})
    except ValidationError as err:
        problems.extend(error_lines(err, "", GridSettings))
    else:
        problems.extend(_settings_problems(settings))
    cells = _expand_cells({k: v for k, v in data.items() if k in CELL_FIELDS},
                          settings.sweep if settings else "invalid", problems)
    if RAMP in data and not problems:
        cells += _expand_ramps(data[RAMP], cells, problems)
    if problems:
        raise ConfigError(problems)
    pinned = {k for k in ("accumulation", "micro_batch") if k in data}
    cells, plans = _size_cells(cells, settings.resources, pinned=pinned)
    if BRANCH in data:
        branches = _expand_branches(data[BRANCH], cells, problems)
        if problems:
            raise ConfigError(problems)
        more, more_plans = _size_cells(branches, settings.resources, pinned=pinned)
        seen = {c.id for c in cells}
        for cell in more:
            if cell.id in seen:
                problems.append(f"{BRANCH}: branch cell {cell.id} is listed twice (two blocks give the same branch)")
            seen.add(cell.id)
        if problems:
            raise ConfigError(problems)
        cells, plans = cells + more, plans + more_plans
    run = {name: getattr(settings, name) for name in GRID_FIELDS}
    run["backend"] = settings.effective_backend
    # A store as data root is read at <store>/datasets/<name>/, where `critbatch data stage` wrote it.
    run["data_root"] = settings.data_root or settings.store
    return Grid(**run, raw=data, source=source, _cells=cells, _plans=plans)


def _blocks(spec: Any, name: str, model: type, problems: list[str]) -> Iterator[tuple[str, Any]]:
    """Each block of a grid's ``name`` block (or list of blocks) that validates as ``model``, with its path; the
    others' errors go to ``problems``."""
    blocks = spec if isinstance(spec, list) else [spec]
    if not blocks:
        problems.append(f"{name}: list at least one block")
    for i, raw in enumerate(blocks):
        path = f"{name}[{i}]" if isinstance(spec, list) else name
        try:
            yield path, model.model_validate(raw)
        except ValidationError as err:
            problems.extend(error_lines(err, path, model))


def _expand_ramps(spec: Any, cells: list[Cell], problems: list[str]) -> list[Cell]:
    """The ramp cells of the grid's ``ramp`` block (or list of blocks): each grid cell whose batch_size is a
    block's first batch, with that ramp."""
    out: list[Cell] = []
    found: dict[str, None] = {}  # ordered set: a problem every base shares is reported once
    seen = {c.id for c in cells}
    for path, ramp in _blocks(spec, RAMP, RampSpec, problems):
        first = ramp.phases[0].batch
        bases = [c for c in cells if c.batch_size == first]
        if not bases:
            sizes = ", ".join(str(m) for m in sorted({c.batch_size for c in cells}))
            problems.append(f"{path}.phases[0].batch: {first} is the batch_size of no cell of the grid (a ramp starts "
                            f"from one); allowed: {sizes}")
            continue
        for base in bases:
            cell = base.model_copy(update={"ramp": ramp})
            lines = cell.problems("cell", world_size=None)
            for line in lines:
                head, sep, rest = line.partition(": ")
                head = path + head[len("cell.ramp"):] if head.startswith("cell.ramp") else head.removeprefix("cell.")
                found[f"{head}{sep}{rest}"] = None
            if lines:
                continue
            if cell.id in seen:
                problems.append(f"{path}: ramp cell {cell.id} is listed twice (two blocks give the same ramp)")
                continue
            seen.add(cell.id)
            out.append(cell)
    problems.extend(found)
    return out


def _expand_branches(spec: Any, bases: list[Cell], problems: list[str]) -> list[Cell]:
    """The branch cells of the grid's ``branch`` block (or list of blocks) over its sized cells ``bases``."""
    out: list[Cell] = []
    for path, block in _blocks(spec, BRANCH, BranchBlock, problems):
        chosen = _branch_bases(block, bases, path, problems)
        for base in chosen:
            if base.keep is None:
                problems.append(f"{path}.from: base cell {base.id} keeps no checkpoints; give it keep: {{at: [...]}}")
                continue
            if block.at is None and block.steps is None:  # every kept point of the base
                fractions, steps = base.keep.at, base.keep.steps
            else:
                fractions, steps = block.at or [], block.steps or []
            points = [("at", f) for f in fractions] + [("step", n) for n in steps]
            for (kind, value), k, seed in itertools.product(points, block.multipliers, block.seeds or [base.seed]):
                branch = {"base": base.id, kind: value, "multiplier": k, "rule": block.rule,
                          "length": block.length.model_dump(exclude_none=True), "seed": seed,
                          "base_accumulation": base.accumulation, "base_micro_batch": base.micro_batch}
                where = f"{path} (base {base.id}, {kind} {value:g}, multiplier {k}, seed {seed})"
                try:
                    cell = base.model_copy(update={"batch_size": base.batch_size * k, "branch": branch,
                                                   "accumulation": 1, "micro_batch": None})
                except ValidationError as err:
                    problems.extend(f"{where}: {line}" for line in error_lines(err, "cell", Cell))
                    continue
                found = cell.problems("cell", world_size=None)
                if found:
                    problems.extend(f"{where}: {line.removeprefix('cell.')}" for line in found)
                    continue
                out.append(cell)
    return out


def _branch_bases(block: BranchBlock, cells: list[Cell], path: str, problems: list[str]) -> list[Cell]:
    """The cells ``block.from_`` selects: the one of that id, those whose fields hold the given values, or (no
    ``from``) every cell with ``keep``."""
    if block.from_ is None:
        chosen = [c for c in cells if c.keep is not None]
        if not chosen:
            problems.append(f"{path}: no cell of the grid keeps checkpoints (set keep: {{at: [...]}}), and no from "
                            "names a base")
        return chosen
    if isinstance(block.from_, str):
        chosen = [c for c in cells if c.id == block.from_]
    else:
        chosen = [c for c in cells if _holds(c.to_dict(), block.from_)]
    if not chosen:
        ids = ", ".join(c.id for c in cells if c.keep is not None) or "none"
        problems.append(f"{path}.from: {shown(block.from_)} selects no cell of the grid; cells with keep: {ids}")
    return chosen


def _holds(data: Any, want: Any) -> bool:
    """``want``'s values are ``data``'s (mappings compared key by key, so a partial mapping selects)."""
    if isinstance(want, dict):
        return isinstance(data, dict) and all(k in data and _holds(data[k], v) for k, v in want.items())
    return data == want


def _size_cells(cells: list[Cell], resources: Resources, pinned: set[str]) -> tuple[list[Cell], list[CellPlan]]:
    """Each cell with the fields its plan sets (sizing.py), and the plans; ConfigError with every problem.

    ``pinned``: the fields the grid wrote itself (accumulation, micro_batch), which the plan keeps.
    With ``resources.sizing: fixed`` the accumulation is always the grid's.
    """
    budget = int(sizing.device_memory(resources)[0] * sizing.USABLE)
    keep_accumulation = "accumulation" in pinned or resources.sizing == "fixed"
    out_cells, plans, problems = [], [], {}
    first_of: dict[str, Cell] = {}
    fits: dict[str, sizing.Fit | None] = {}
    for cell in cells:
        key = sizing.fit_key(cell)
        if key not in fits:
            fits[key] = sizing.fit_of(cell)
        fit = fits[key]
        try:
            plan = sizing.plan_cell(cell, resources, budget, fit,
                                    accumulation=cell.accumulation if keep_accumulation else None,
                                    micro_batch=cell.micro_batch if "micro_batch" in pinned else None)
        except ConfigError as err:
            problems.update(dict.fromkeys(err.problems))
            continue
        problems.update(dict.fromkeys(sizing.sync_bn_problems(cell, plan, resources, fit)))
        fields = sizing.identity_fields(cell, plan, fit)
        if any(getattr(cell, k) != v for k, v in fields.items()):
            cell = Cell.model_construct(**{**{k: getattr(cell, k) for k in Cell.model_fields}, **fields})
        if cell.id in first_of:
            problems[f"grid: two cells are the same once sized (id {cell.id}): they differ only in "
                     f"micro_batch or accumulation, which this model's result does not depend on"] = None
            continue
        first_of[cell.id] = cell
        out_cells.append(cell)
        plans.append(plan)
    if problems:
        raise ConfigError(list(problems))
    return out_cells, plans


# ---- validation of the run settings ---------------------------------------------------------


def max_sweep_length(backend: str, nodes: int) -> int:
    """The longest sweep name that keeps ``critbatch-<sweep>-<cell-id>`` and every name the backend's
    controller derives from it (its name budget: pods' hostnames, Services) within 63 characters."""
    fixed = len(k8s.object_name("", "0123456789")) + backends.get(backend).name_budget(nodes, MAX_CELLS)
    return k8s.MAX_NAME - fixed


def _settings_problems(s: GridSettings) -> list[str]:
    """What the run settings' fields show only together: the backend against the nodes, the names' length."""
    out: list[str] = []
    backend, nodes = s.effective_backend, s.resources.nodes
    out.extend(backends.get(backend).render_problems(nodes=nodes, priority_class=None))
    if s.workload_priority_class and not s.queue:
        out.append(f"workload_priority_class: {s.workload_priority_class!r} is a Kueue WorkloadPriorityClass, which "
                   "only a queued object has; set queue (a Kueue LocalQueue) too, or unset it")
    limit = max_sweep_length(backend, nodes)
    if len(s.sweep) > limit:
        out.append(f"sweep: {s.sweep!r} is {len(s.sweep)} characters; at most {limit} keep "
                   f"critbatch-<sweep>-<cell-id> and the names derived from it within {k8s.MAX_NAME}")
    return out


# ---- expansion ---------------------------------------------------------------------------------


def _is_spec(tp: Any) -> bool:
    """A nested spec model (dataset, optimizer, ...): its fields are axes too."""
    return isinstance(tp, type) and issubclass(tp, BaseModel) or bool(_members(tp))


def _members(tp: Any) -> dict[str, type[BaseModel]]:
    """The models of a union chosen by name (the optimizer), by name; {} for any other type."""
    if get_origin(tp) is not Union:
        return {}
    models = [get_args(a)[0] if get_origin(a) is Annotated else a for a in get_args(tp)]
    if not all(isinstance(m, type) and issubclass(m, BaseModel) and "name" in m.model_fields for m in models):
        return {}
    return {m.model_fields["name"].default: m for m in models}


def _expand_named(data: dict, tp: Any, path: str, problems: list[str]) -> list[tuple[dict, dict[str, int]]]:
    """A mapping whose ``name`` picks its model (the optimizer): each name's fields expand as that model's axes;
    an unknown name is left whole for validation to report."""
    members = _members(tp)
    names = data.get("name", "sgd")
    out = []
    for name, choice in _expand_value(names, None, f"{path}.name", problems):
        if name not in members:
            out.append(({**data, "name": name}, choice))
            continue
        rest = {k: v for k, v in data.items() if k != "name"}
        out.extend(({"name": name, **v} if "name" in data else v, {**choice, **ch})
                   for v, ch in _expand_mapping(rest, members[name], path, problems))
    return out


def _expand_value(value: Any, tp: Any, path: str, problems: list[str]) -> list[tuple[Any, dict[str, int]]]:
    """Every value an axis takes, each with the list indices chosen on the way (spec path -> index)."""
    nested = _is_spec(tp)
    if _members(tp) and isinstance(value, dict):
        return _expand_named(value, tp, path, problems)
    if isinstance(value, list):
        if not value:
            problems.append(f"{path}: an axis must list at least one value")
            return []
        _duplicates(value, path, problems)
        out = []
        for i, item in enumerate(value):
            if nested and isinstance(item, dict):
                expand = _expand_named if _members(tp) else _expand_mapping
                out.extend((v, {path: i, **ch}) for v, ch in expand(item, tp, f"{path}[{i}]", problems))
            else:
                out.append((item, {path: i}))
        return out
    if nested and isinstance(value, dict):
        return _expand_mapping(value, tp, path, problems)
    return [(value, {})]


def _expand_mapping(data: dict, tp: type[BaseModel], path: str, problems: list[str]
                    ) -> list[tuple[dict, dict[str, int]]]:
    hints = {name: f.annotation for name, f in tp.model_fields.items()}
    keys = [name for name in hints if name in data] + [k for k in data if k not in hints]
    # An unknown key is not an axis: validation reports it once, by its own name.
    axes = [_expand_value(data[k], hints[k], f"{path}.{k}", problems) if k in hints else [(data[k], {})]
            for k in keys]
    out = []
    for combo in itertools.product(*axes):
        choices: dict[str, int] = {}
        for _, ch in combo:
            choices.update(ch)
        out.append(({k: v for k, (v, _) in zip(keys, combo)}, choices))
    return out


def _duplicates(values: list, path: str, problems: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, v in enumerate(values):
        key = json.dumps(v, sort_keys=True, default=str)
        if key in seen:
            problems.append(f"{path}[{i}]: {shown(v)} repeats {path}[{seen[key]}]")
        else:
            seen[key] = i


def _spec_path(field_path: str, choices: dict[str, int]) -> str:
    """``dataset.fraction`` -> ``dataset.fraction[1]`` for the cell that took the second fraction."""
    out = ""
    for part in field_path.split("."):
        out = f"{out}.{part}" if out else part
        if out in choices:
            out = f"{out}[{choices[out]}]"
    return out


_CELL_HINTS = {name: f.annotation for name, f in Cell.model_fields.items()}


def _expand_cells(spec: dict, sweep: str, problems: list[str]) -> list[Cell]:
    keys = [name for name in CELL_FIELDS if name in spec]
    axes = [_expand_value(spec[k], _CELL_HINTS[k], k, problems) for k in keys]
    total = 1
    for axis in axes:
        total *= len(axis)
    if total > MAX_CELLS:
        problems.append(f"grid: expands to {total} cells; at most {MAX_CELLS}")
        return []
    if total == 0:
        return []
    probed = _probe_axes(keys, axes, sweep)
    cells: list[Cell] = []
    cell_problems: dict[str, None] = {}  # ordered set: a bad value listed once is reported once
    first_of: dict[str, str] = {}
    for combo in itertools.product(*[range(len(a)) for a in axes]):
        choices: dict[str, int] = {}
        for axis, j in zip(axes, combo):
            choices.update(axis[j][1])
        if probed is None:  # some value is invalid: validate each cell, reporting with paths
            try:
                cell = Cell.model_validate({**{k: axis[j][0] for k, axis, j in zip(keys, axes, combo)},
                                            "sweep": sweep})
                found = cell.problems("cell", world_size=None)
            except ValidationError as err:
                found = error_lines(err, "cell", Cell)
        else:  # every value was validated by _probe_axes
            values, rest = probed
            cell = Cell.model_construct(**rest, **{k: values[i][j] for i, (k, j) in enumerate(zip(keys, combo))})
            found = cell.problems("cell", world_size=None)
        if found:
            for problem in found:
                cell_problems[_relocate(problem, choices)] = None
            continue
        where = ", ".join(f"{p}[{i}]" for p, i in choices.items()) or "the grid"
        if cell.id in first_of:
            cell_problems[f"grid: the cell at {where} is identical to the one at {first_of[cell.id]} "
                          f"(id {cell.id})"] = None
            continue
        first_of[cell.id] = where
        cells.append(cell)
    problems.extend(cell_problems)
    if not problems and not cells:
        problems.append("grid: expands to no cells")
    return cells


def _probe_axes(keys: list[str], axes: list[list[tuple[Any, dict]]], sweep: str
                ) -> tuple[list[list[Any]], dict[str, Any]] | None:
    """Each axis value validated and converted once, by validating one cell per value (not per combination).

    Returns the converted values per axis and the validated values of the other fields (defaults, the
    sweep), or None when any value is invalid: the caller then validates every combination, so each
    problem is reported with its path. With the validated values, a grid of 10,000 cells builds its
    cells directly instead of validating the same values 10,000 times.
    """
    base = {k: axis[0][0] for k, axis in zip(keys, axes)}
    values: list[list[Any]] = []
    try:
        first = Cell.model_validate({**base, "sweep": sweep})
        for k, axis in zip(keys, axes):
            values.append([getattr(Cell.model_validate({**base, k: value, "sweep": sweep}), k) for value, _ in axis])
    except ValidationError:
        return None
    return values, {name: getattr(first, name) for name in Cell.model_fields if name not in keys}


def _relocate(problem: str, choices: dict[str, int]) -> str:
    head, sep, rest = problem.partition(": ")
    if not head.startswith("cell."):
        return problem
    return f"{_spec_path(head[len('cell.'):], choices)}{sep}{rest}"


# ---- the JSON Schema of a grid spec ---------------------------------------------------------------


def _axes(tp: Any, cache: dict[type, type]) -> Any:
    """The type a grid writes for a cell field of type ``tp``: one value or a list of them (an axis).

    A nested spec becomes a model of the same fields, each an axis itself; a union chosen by name, the union of
    its members' axes.
    """
    if _members(tp):
        return Union[tuple(_axes(m, cache) for m in _members(tp).values())]
    if _is_spec(tp):
        if tp not in cache:
            cache[tp] = create_model(f"{tp.__name__}Axes", __config__=tp.model_config, __doc__=tp.__doc__,
                                     **_axis_fields(tp, tuple(tp.model_fields), cache))
        tp = cache[tp]
    return Union[tp, list[tp]]


def _axis_fields(model: type[BaseModel], names: tuple[str, ...], cache: dict[type, type]) -> dict[str, Any]:
    """``model``'s fields ``names`` as axes: each keeps its default and description; its constraints move
    onto each value of the axis (a Range bounds every batch size of a list, not the list)."""
    out = {}
    for name in names:
        info = model.model_fields[name]
        value_type = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        default = (Field(default_factory=info.default_factory, description=info.description)
                   if info.default_factory is not None else Field(info.default, description=info.description))
        out[name] = (_axes(value_type, cache), default)
    return out


def grid_schema() -> dict:
    """The JSON Schema of a grid spec: the run settings, and every cell field as an axis (a value or a list)."""
    spec = create_model("GridSpec", __base__=GridSettings, __doc__=__doc__.split("\n\n")[0],
                        **_axis_fields(Cell, CELL_FIELDS, {}),
                        ramp=(Union[RampSpec, list[RampSpec], None],
                              Field(None, description="batch-size ramps (docs/ramp.md): each adds, for every cell "
                                    "whose batch_size is its first batch, the same cell with the ramp; one block or "
                                    "a list of them")),
                        branch=(Union[BranchBlock, list[BranchBlock], None],
                                Field(None, description="branch cells from the kept checkpoints of base cells "
                                      "(docs/branches.md): one block or a list of them")))
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **spec.model_json_schema()}


# ---- commands ------------------------------------------------------------------------------------


def cli_presets(args: argparse.Namespace) -> int:
    """``critbatch presets``: every shipped preset with its one-line description."""
    names = preset_names()
    width = max((len(n) for n in names), default=0)
    for name in names:
        data = parse_yaml((preset_dir() / f"{name}.yaml").read_text(), f"preset {name}")
        description = data.get("description", "") if isinstance(data, dict) else ""
        first_line = " ".join(str(description).split())
        print(f"{name:<{width}}  {first_line}")
    installed = third_party_line()
    if installed:  # on stderr: the listing stays one preset per line
        print(installed, file=sys.stderr)
    return 0


def cli_cells(args: argparse.Namespace) -> int:
    """``critbatch cells GRID``: one line per cell, its id and its JSON (the ``--cell`` of ``critbatch train``),
    after the plan on stderr; ``--sweep-yaml``: the sweep.yaml the grid writes to the store instead."""
    grid = load_grid(args.grid)
    print(grid.plan_text(), file=sys.stderr)
    if getattr(args, "sweep_yaml", False):
        sys.stdout.write(grid.sweep_yaml())
        return 0
    for cell_id, cell_json in zip(grid.cell_ids(), grid.cell_jsons()):
        print(f"{cell_id}\t{cell_json}")
    return 0


def cli_schema(args: argparse.Namespace) -> int:
    """``critbatch schema``: the grid spec's JSON Schema (committed as jobs/sweep/grid.schema.json)."""
    print(json.dumps(grid_schema(), indent=2))
    return 0
