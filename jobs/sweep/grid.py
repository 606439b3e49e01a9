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

Everything is validated before anything is rendered, written or run, and every
problem is reported at once with its path in the spec (``batch_size[3]: ...``,
``dataset.fraction[1]: ...``) as one :class:`ConfigError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field, fields
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from . import k8s
from critbatch.jobs.cell.spec import Cell, build
from critbatch.jobs.cell.errors import ConfigError

#: Cell fields a grid may set (the sweep is the grid's own name).
CELL_FIELDS = tuple(f.name for f in fields(Cell) if f.name != "sweep")
#: Upper bound on one grid's cells: a typo such as a 1000-value axis should fail, not render 10^7 objects.
MAX_CELLS = 100_000

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_TOLERATION_KEYS = ("key", "operator", "value", "effect", "tolerationSeconds")


@dataclass
class Resources:
    """What one cell asks of the cluster. ``gpus`` is per node; the world size is gpus x nodes."""

    gpus: int = 1
    nodes: int = 1
    cpu: Any = 8  # a Kubernetes quantity: 8, "7500m"
    memory: str = "32Gi"
    shm: str = "8Gi"  # /dev/shm size limit (DataLoader workers, NCCL)
    gpu_resource: str = "nvidia.com/gpu"
    gpu_type: str | None = None  # nodeSelector nvidia.com/gpu.product, e.g. NVIDIA-A100-SXM4-80GB
    tolerations: list | None = None  # default: tolerate the GPU taint when gpus > 0
    node_selector: dict = field(default_factory=dict)
    priority_class: str | None = None
    deadline_seconds: int = 7 * 24 * 3600  # activeDeadlineSeconds of the whole Job, retries included
    backoff_limit: int = 6  # retries; each one resumes from the newest checkpoint
    ttl_seconds: int = 3 * 24 * 3600  # ttlSecondsAfterFinished: the logs are in the store, not the pod
    grace_seconds: int = 120  # terminationGracePeriodSeconds: longer than a checkpoint takes

    @property
    def procs_per_node(self) -> int:
        """Processes torchrun starts per node: one per GPU, one on a CPU-only node."""
        return max(1, self.gpus)

    @property
    def world_size(self) -> int:
        return self.procs_per_node * self.nodes

    def effective_tolerations(self) -> list[dict]:
        if self.tolerations is not None:
            return list(self.tolerations)
        if self.gpus > 0:
            return [{"key": self.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
        return []


@dataclass
class AnalysisSpec:
    """The analysis Job that runs ``critbatch analyze`` on the sweep once its cells are done."""

    cpu: Any = 2
    memory: str = "8Gi"
    deadline_seconds: int = 6 * 3600
    backoff_limit: int = 2
    args: list = field(default_factory=list)  # extra `critbatch analyze` options, e.g. [--efficiency, "0.8"]


@dataclass
class _Settings:
    """The grid fields that are not cell fields (where and how the cells run)."""

    sweep: str
    description: str = ""
    reproduces: str = ""  # which figure or table of the paper
    resources: Resources = field(default_factory=Resources)
    analysis: AnalysisSpec = field(default_factory=AnalysisSpec)
    image: str = k8s.DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    store: str = k8s.DEFAULT_STORE
    store_secret: str = k8s.DEFAULT_STORE_SECRET
    store_endpoint: str | None = k8s.DEFAULT_STORE_ENDPOINT
    data_root: str | None = None  # default: <store>/datasets, where `critbatch data stage` puts datasets
    backend: str | None = None  # job | pytorchjob | trainjob; default job for one node, else pytorchjob
    namespace: str = k8s.DEFAULT_NAMESPACE
    queue: str | None = None  # Kueue LocalQueue
    max_active: int = 0  # cap on cells running at once (clusters without Kueue); 0 = none
    service_account: str = k8s.DEFAULT_SERVICE_ACCOUNT
    checkpoint_seconds: float = 300.0


GRID_FIELDS = tuple(f.name for f in fields(_Settings))


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
    store_secret: str
    store_endpoint: str | None
    data_root: str
    backend: str
    namespace: str
    queue: str | None
    max_active: int
    service_account: str
    checkpoint_seconds: float
    description: str = ""
    reproduces: str = ""
    source: str = "<dict>"
    _cells: list[Cell] = field(default_factory=list, repr=False)
    _ids: list[str] = field(default_factory=list, repr=False)
    _jsons: list[str] = field(default_factory=list, repr=False)

    def cells(self) -> list[Cell]:
        """Every cell, in a fixed order (the spec's axes in the cell's field order); ``sweep`` set."""
        return list(self._cells)

    def cell_ids(self) -> list[str]:
        """``[c.id for c in cells()]``, computed once when the grid was loaded."""
        return list(self._ids)

    def cell_jsons(self) -> list[str]:
        """Each cell's JSON with sorted keys, sweep included: the ``--cell`` argument of ``critbatch train``."""
        return list(self._jsons)

    @property
    def world_size(self) -> int:
        return self.resources.world_size

    def sweep_yaml(self) -> str:
        """``<store>/<sweep>/sweep.yaml``: the spec as written plus every cell it expanded to."""
        doc = {
            "spec": self.raw,
            "cells": [{"id": i, "cell": json.loads(j)} for i, j in zip(self._ids, self._jsons)],
        }
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)

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
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(err).split())})") from None


def load_grid(spec: str | Path | dict) -> Grid:
    """A grid from a YAML path, a preset name (``critbatch presets``) or an already parsed mapping.

    Raises :class:`ConfigError` with every problem, each with its path in the spec.
    """
    if isinstance(spec, dict):
        return grid_from_dict(spec)
    text, source = _read_spec(str(spec))
    return grid_from_dict(parse_yaml(text, source), source=source)


def _read_spec(spec: str) -> tuple[str, str]:
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text(), str(path)
    looks_like_path = spec.endswith((".yaml", ".yml")) or "/" in spec
    if not looks_like_path:
        preset = preset_dir() / f"{spec}.yaml"
        if preset.is_file():
            return preset.read_text(), f"preset {spec}"
    names = ", ".join(preset_names())
    raise ConfigError(f"grid: no file {spec!r} and no preset of that name; presets: {names}")


def grid_from_dict(data: Any, source: str = "<dict>") -> Grid:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a grid spec must be a mapping, got {type(data).__name__}")
    problems: list[str] = []
    for key in data:
        if key not in GRID_FIELDS and key not in CELL_FIELDS:
            problems.append(f"{key}: unknown field; allowed: {', '.join(GRID_FIELDS + CELL_FIELDS)}")
    settings = build(_Settings, {k: v for k, v in data.items() if k in GRID_FIELDS}, "grid", problems)
    problems[:] = [p.replace("grid.", "", 1) if p.startswith("grid.") else p for p in problems]
    if isinstance(settings, _Settings):
        problems.extend(_settings_problems(settings))
    cell_spec = {k: v for k, v in data.items() if k in CELL_FIELDS}
    world = settings.resources.world_size if isinstance(settings, _Settings) else 1
    sweep = settings.sweep if isinstance(settings, _Settings) else "invalid"
    expanded = _expand_cells(cell_spec, sweep, world, problems)
    if problems:
        raise ConfigError(problems)
    res = settings.resources
    backend = settings.backend or ("job" if res.nodes == 1 else "pytorchjob")
    data_root = settings.data_root or f"{settings.store.rstrip('/')}/datasets"
    return Grid(
        sweep=settings.sweep, raw=data, resources=res, analysis=settings.analysis, image=settings.image,
        image_pull_policy=settings.image_pull_policy, store=settings.store, store_secret=settings.store_secret,
        store_endpoint=settings.store_endpoint, data_root=data_root, backend=backend,
        namespace=settings.namespace, queue=settings.queue, max_active=settings.max_active,
        service_account=settings.service_account, checkpoint_seconds=settings.checkpoint_seconds,
        description=settings.description, reproduces=settings.reproduces, source=source,
        _cells=expanded.cells, _ids=expanded.ids, _jsons=expanded.jsons,
    )


# ---- validation of the run settings ---------------------------------------------------------


def name_budget(backend: str, nodes: int) -> int:
    """Characters the longest derived name adds after ``critbatch-<sweep>-<cell-id>``.

    A Job's pods keep the Job name as hostname; PyTorchJob makes a Service per
    replica (``<name>-worker-<i>``) and a TrainJob's JobSet names pods
    ``<name>-node-0-<i>``: each must stay a DNS label of at most 63 characters.
    """
    if backend == "pytorchjob" and nodes > 1:
        return len(f"-worker-{nodes - 2}")
    if backend == "trainjob":
        return len(f"-node-0-{nodes - 1}")
    return 0


def max_sweep_length(backend: str, nodes: int) -> int:
    fixed = len(k8s.object_name("", "0123456789")) + name_budget(backend, nodes)
    return k8s.MAX_NAME - fixed


def _settings_problems(s: _Settings) -> list[str]:
    out: list[str] = []
    res = s.resources
    backend = s.backend or ("job" if res.nodes == 1 else "pytorchjob")
    if s.backend is not None and s.backend not in k8s.BACKENDS:
        out.append(f"backend: unknown backend {s.backend!r}; allowed: {', '.join(k8s.BACKENDS)}")
    elif backend == "job" and res.nodes != 1:
        out.append(f"backend: 'job' runs on one node, but resources.nodes is {res.nodes}; "
                   "use pytorchjob or trainjob")
    if not _DNS_LABEL.match(s.sweep):
        out.append(f"sweep: {s.sweep!r} is not a DNS-1123 label (lower-case letters, digits and '-', "
                   "starting and ending with a letter or digit)")
    limit = max_sweep_length(backend if backend in k8s.BACKENDS else "job", max(res.nodes, 1))
    if len(s.sweep) > limit:
        out.append(f"sweep: {s.sweep!r} is {len(s.sweep)} characters; at most {limit} keep "
                   f"critbatch-<sweep>-<cell-id> and the names derived from it within {k8s.MAX_NAME}")
    for name in ("namespace",):
        value = getattr(s, name)
        if not (_DNS_LABEL.match(value) and len(value) <= 63):
            out.append(f"{name}: {value!r} is not a DNS-1123 label")
    for name in ("store_secret", "service_account", "priority_class"):
        value = getattr(res if name == "priority_class" else s, name)
        if value is not None and not (_DNS_SUBDOMAIN.match(value) and len(value) <= 253):
            where = f"resources.{name}" if name == "priority_class" else name
            out.append(f"{where}: {value!r} is not a DNS-1123 subdomain")
    if s.queue is not None and not (_LABEL_VALUE.match(s.queue) and 0 < len(s.queue) <= 63):
        out.append(f"queue: {s.queue!r} is not a valid label value (Kueue LocalQueue name)")
    if not s.image.strip() or any(c.isspace() for c in s.image):
        out.append(f"image: {s.image!r} is not an image reference")
    if s.image_pull_policy not in _PULL_POLICIES:
        out.append(f"image_pull_policy: {s.image_pull_policy!r}; allowed: {', '.join(_PULL_POLICIES)}")
    if s.store.startswith("s3://"):
        if not s.store[len("s3://"):].split("/")[0]:
            out.append(f"store: {s.store!r} names no bucket; expected s3://BUCKET[/PREFIX]")
        if not s.store_secret:
            out.append("store_secret: an s3:// store needs the Secret that holds its credentials")
    elif "://" in s.store and not s.store.startswith("file://"):
        out.append(f"store: unsupported scheme in {s.store!r}; allowed: s3://BUCKET/PREFIX, file://DIR or a path")
    if s.max_active < 0:
        out.append(f"max_active: must be >= 0 (0 = no cap), got {s.max_active}")
    if not s.checkpoint_seconds > 0:
        out.append(f"checkpoint_seconds: must be positive, got {s.checkpoint_seconds}")
    out.extend(_resources_problems(res, "resources"))
    a = s.analysis
    for name in ("cpu", "memory"):
        if not _is_quantity(getattr(a, name)):
            out.append(f"analysis.{name}: {getattr(a, name)!r} is not a Kubernetes quantity")
    if a.deadline_seconds < 1:
        out.append(f"analysis.deadline_seconds: must be positive, got {a.deadline_seconds}")
    if a.backoff_limit < 0:
        out.append(f"analysis.backoff_limit: must be >= 0, got {a.backoff_limit}")
    if not all(isinstance(x, str) for x in a.args):
        out.append("analysis.args: must be a list of strings")
    return out


def _is_quantity(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value > 0
    return isinstance(value, str) and bool(_QUANTITY.match(value)) and float(re.sub(r"[a-zA-Z]+$", "", value)) > 0


def _resources_problems(res: Resources, path: str) -> list[str]:
    out: list[str] = []
    if res.gpus < 0:
        out.append(f"{path}.gpus: must be >= 0 (per node), got {res.gpus}")
    if res.nodes < 1:
        out.append(f"{path}.nodes: must be >= 1, got {res.nodes}")
    for name in ("cpu", "memory", "shm"):
        if not _is_quantity(getattr(res, name)):
            out.append(f"{path}.{name}: {getattr(res, name)!r} is not a Kubernetes quantity (e.g. 8, 7500m, 32Gi)")
    if not _DNS_SUBDOMAIN.match(res.gpu_resource.split("/")[0]) or res.gpu_resource.count("/") != 1:
        out.append(f"{path}.gpu_resource: {res.gpu_resource!r} is not an extended resource name (vendor/name)")
    if res.gpu_type is not None and not _LABEL_VALUE.match(res.gpu_type):
        out.append(f"{path}.gpu_type: {res.gpu_type!r} is not a valid label value")
    if res.tolerations is not None:
        if not isinstance(res.tolerations, list):
            out.append(f"{path}.tolerations: must be a list of tolerations")
        else:
            for i, tol in enumerate(res.tolerations):
                if not isinstance(tol, dict):
                    out.append(f"{path}.tolerations[{i}]: must be a mapping")
                    continue
                for key in tol:
                    if key not in _TOLERATION_KEYS:
                        out.append(f"{path}.tolerations[{i}].{key}: unknown field; "
                                   f"allowed: {', '.join(_TOLERATION_KEYS)}")
    for key, value in res.node_selector.items():
        if not isinstance(value, str):
            out.append(f"{path}.node_selector.{key}: must be a string, got {value!r}")
    for name, low in (("deadline_seconds", 1), ("backoff_limit", 0), ("ttl_seconds", 0), ("grace_seconds", 0)):
        if getattr(res, name) < low:
            out.append(f"{path}.{name}: must be >= {low}, got {getattr(res, name)}")
    return out


# ---- expansion ---------------------------------------------------------------------------------

_CELL_HINTS = get_type_hints(Cell)


def _expand_value(value: Any, tp: Any, path: str, problems: list[str]) -> list[tuple[Any, dict[str, int]]]:
    """Every value an axis takes, each with the list indices chosen on the way (spec path -> index)."""
    nested = dataclasses.is_dataclass(tp) and isinstance(tp, type)
    if isinstance(value, list):
        if not value:
            problems.append(f"{path}: an axis must list at least one value")
            return []
        _duplicates(value, path, problems)
        out = []
        for i, item in enumerate(value):
            if nested and isinstance(item, dict):
                out.extend((v, {path: i, **ch}) for v, ch in _expand_mapping(item, tp, f"{path}[{i}]", problems))
            else:
                out.append((item, {path: i}))
        return out
    if nested and isinstance(value, dict):
        return _expand_mapping(value, tp, path, problems)
    return [(value, {})]


def _expand_mapping(data: dict, tp: type, path: str, problems: list[str]) -> list[tuple[dict, dict[str, int]]]:
    hints = get_type_hints(tp)
    keys = [f.name for f in fields(tp) if f.name in data] + [k for k in data if k not in hints]
    # An unknown key is not an axis: build() reports it once, by its own name.
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
            problems.append(f"{path}[{i}]: {v!r} repeats {path}[{seen[key]}]")
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


@dataclass
class _Expanded:
    """The cells of a grid with their ids and ``--cell`` JSON, computed once."""

    cells: list[Cell]
    ids: list[str]
    jsons: list[str]


def _expand_cells(spec: dict, sweep: str, world: int, problems: list[str]) -> _Expanded:
    keys = [name for name in CELL_FIELDS if name in spec]
    axes = [_expand_value(spec[k], _CELL_HINTS[k], k, problems) for k in keys]
    total = 1
    for axis in axes:
        total *= len(axis)
    if total > MAX_CELLS:
        problems.append(f"grid: expands to {total} cells; at most {MAX_CELLS}")
        return _Expanded([], [], [])
    if total == 0:
        return _Expanded([], [], [])
    values = _probe_axes(keys, axes, sweep)
    combos = []
    for combo in itertools.product(*[range(len(a)) for a in axes]):
        choices: dict[str, int] = {}
        for axis, j in zip(axes, combo):
            choices.update(axis[j][1])
        combos.append((combo, choices))
    out = _Expanded([], [], [])
    cell_problems: dict[str, None] = {}  # ordered set: a bad value listed once is reported once
    first_of: dict[str, str] = {}
    memo: dict[int, dict] = {}
    for combo, choices in combos:
        if values is None:  # some value has the wrong type: build each cell, reporting with paths
            data = {k: axis[j][0] for k, axis, j in zip(keys, axes, combo)}
            data["sweep"] = sweep
            found: list[str] = []
            cell = build(Cell, data, "cell", found)
        else:
            cell = Cell(sweep=sweep, **{k: values[i][j] for i, (k, j) in enumerate(zip(keys, combo))})
            found = []
        if not found:
            found = cell.problems("cell", world)
        if found:
            for problem in found:
                cell_problems[_relocate(problem, choices)] = None
            continue
        cell_id, cell_json = _identity(cell, memo)
        where = ", ".join(f"{p}[{i}]" for p, i in choices.items()) or "the grid"
        if cell_id in first_of:
            cell_problems[f"grid: the cell at {where} is identical to the one at {first_of[cell_id]} "
                          f"(id {cell_id})"] = None
            continue
        first_of[cell_id] = where
        out.cells.append(cell)
        out.ids.append(cell_id)
        out.jsons.append(cell_json)
    problems.extend(cell_problems)
    if out.cells and out.ids[0] != out.cells[0].id:  # pragma: no cover - the cell's id rule changed
        out.ids = [c.id for c in out.cells]
        out.jsons = [json.dumps(c.to_dict(), sort_keys=True, separators=(",", ":")) for c in out.cells]
    if not problems and not out.cells:
        problems.append("grid: expands to no cells")
    return out


def _probe_axes(keys: list[str], axes: list[list[tuple[Any, dict]]], sweep: str) -> list[list[Any]] | None:
    """Each axis value checked and converted once, by building one cell per value (not per combination).

    Returns the converted values per axis, or None when any value fails to build: the caller then builds
    every combination, so each problem is reported with its path. With the checked values, a grid of
    10,000 cells builds its cells directly instead of re-checking the same values 10,000 times.
    """
    base = {k: axis[0][0] for k, axis in zip(keys, axes)}
    values: list[list[Any]] = []
    for k, axis in zip(keys, axes):
        column = []
        for value, _ in axis:
            found: list[str] = []
            probe = build(Cell, {**base, k: value, "sweep": sweep}, "cell", found)
            if found:
                return None
            column.append(getattr(probe, k))
        values.append(column)
    return values


def _identity(cell: Cell, memo: dict[int, dict]) -> tuple[str, str]:
    """The cell's id (as :attr:`Cell.id` computes it) and its ``--cell`` JSON (sweep included).

    Cells built from the same checked axis values share their nested specs, so each of those is turned
    into a dict once (``memo``, by object identity) rather than once per cell.
    """
    data: dict[str, Any] = {}
    for f in _CELL_FIELD_NAMES:
        value = getattr(cell, f)
        if dataclasses.is_dataclass(value):
            d = memo.get(id(value))
            if d is None:
                d = memo[id(value)] = dataclasses.asdict(value)
            value = d
        data[f] = value
    full = json.dumps(data, sort_keys=True, separators=(",", ":"))
    del data["sweep"]
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10], full


_CELL_FIELD_NAMES = tuple(f.name for f in fields(Cell))


def _relocate(problem: str, choices: dict[str, int]) -> str:
    head, sep, rest = problem.partition(": ")
    if not head.startswith("cell."):
        return problem
    return f"{_spec_path(head[len('cell.'):], choices)}{sep}{rest}"


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
    return 0


def cli_cells(args: argparse.Namespace) -> int:
    """``critbatch cells GRID``: one line per cell, its id and its JSON (the ``--cell`` of ``critbatch train``)."""
    grid = load_grid(args.grid)
    for cell_id, cell_json in zip(grid.cell_ids(), grid.cell_jsons()):
        print(f"{cell_id}\t{cell_json}")
    return 0
