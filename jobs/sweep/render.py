"""Render a grid to Kubernetes objects: one per cell, plus the analysis Job.

    critbatch render table1-cifar10-resnet34 | kubectl apply -f -
    critbatch render my-grid.yaml -o manifests/          # one file per object
    critbatch render my-grid.yaml --backend trainjob     # multi-node cells on Kubeflow Trainer

Each object comes from one template in ``k8s/templates`` (``<kind>-<purpose>.yaml.j2``; every one imports
the pod body they share, the macros of ``_pod.yaml.j2``, so the kinds cannot drift), rendered by Jinja
with ``StrictUndefined`` (a missing variable is an error, never an empty string) and every value passed
through ``|tojson``. The render functions load what they rendered and check it before returning it: names
and labels within Kubernetes' limits, the restricted security profile on every container, credentials only
by reference. Rendering is a pure function of the grid: re-rendering is byte-identical.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from .. import backends
from ..backends import Backend, k8s
from ..cell.spec import Cell
from ..cell.sweepfile import class_digest
from ..cell.errors import ConfigError, ExitCode
from ..cell.inputs import output_dir, shown
from .grid import Grid, load_grid
from .sizing import Placement, scale_quantity
from .space import sweep_space

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

#: Environment variables that may only come from a Secret, never as a literal value in a manifest.
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@functools.lru_cache(maxsize=None)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("critbatch.k8s", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # YAML, not HTML: values are escaped as JSON by |tojson
        keep_trailing_newline=True,
    )
    # JSON is YAML: a JSON string, list or mapping is a valid YAML scalar or flow collection. Jinja's own
    # tojson also HTML-escapes, which only makes the manifests harder to read.
    env.filters["tojson"] = _tojson
    # Every name comes from the render function: no Jinja global (range, namespace, ...) can stand in
    # for a missing variable called the same.
    env.globals.clear()
    return env


def _tojson(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True, default=_not_json)


def _not_json(value: Any) -> Any:
    # json.dumps never calls str() on a value, so StrictUndefined would pass silently without this.
    if isinstance(value, jinja2.Undefined):
        value._fail_with_undefined_error()
    raise TypeError(f"cannot render {type(value).__name__} as JSON")


@dataclass(frozen=True)
class Document:
    """One rendered object: the YAML text as the template wrote it, and the object it loads to."""

    text: str
    obj: dict


def _render(template: str, context: dict[str, Any]) -> Document:
    text = _environment().get_template(template).render(**context)
    try:
        obj = yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:  # a template bug, not bad input
        raise RuntimeError(f"{template} rendered invalid YAML: {err}") from err
    check_object(obj)
    return Document(text, obj)


# ---- the shared parts of every pod ------------------------------------------------------------------


def labels(grid: Grid, component: str, cell_id: str | None = None) -> dict[str, str]:
    out = {
        k8s.LABEL_NAME: k8s.APP_NAME,
        k8s.LABEL_COMPONENT: component,
        k8s.LABEL_PART_OF: k8s.APP_NAME,
        k8s.LABEL_MANAGED_BY: k8s.APP_NAME,
        k8s.LABEL_SWEEP: grid.sweep,
    }
    if cell_id is not None:
        out[k8s.LABEL_CELL] = cell_id
    return out


def _scratch() -> list[dict[str, str]]:
    return [{"name": name, "path": path} for name, path, _ in k8s.SCRATCH_DIRS]


def _env(grid: Grid) -> list[dict[str, str]]:
    """Plain variables: where the store is, where scratch goes. Credentials come from the Secret."""
    env = [{"name": "CRITBATCH_STORE", "value": grid.store}]
    if grid.store.startswith("s3://") and grid.store_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": grid.store_endpoint})
    env.append({"name": "PYTHONUNBUFFERED", "value": "1"})
    env.extend({"name": var, "value": path} for _, path, var in k8s.SCRATCH_DIRS)
    return env


def cell_json(cell: Cell) -> str:
    """The ``--cell`` argument: the cell's fields, sweep included, as compact JSON with sorted keys."""
    return cell.to_json()


def _train_args(grid: Grid, cell_arg: str | list[str]) -> list[str]:
    """``-m critbatch.jobs.cli train ...``: the training command every backend's launcher runs.

    ``cell_arg``: the ``--cell`` JSON, or the options that choose the cell instead (backend indexed).
    """
    return [
        "-m", "critbatch.jobs.cli", "train",
        *(["--cell", cell_arg] if isinstance(cell_arg, str) else cell_arg),
        "--store", grid.store,
        "--data-root", grid.data_root,
        "--checkpoint-seconds", _number(grid.checkpoint_seconds),
    ]


def _launch(torchrun_args: list[str], train_args: list[str], gpus: int) -> tuple[list[str], list[str]]:
    """A cell pod's command and args: the launcher, torchrun's options, the train command on the pod's device.

    The launcher (jobs/train/launch.py), not torchrun, which exits 1 whatever its worker returned: it runs a
    one-process pod's trainer itself and otherwise passes the first failed worker's code on, so every
    backend's failure policy sees the trainer's exit code. A GPU pod trains with ``--device cuda``, which
    exits 4 where torch sees no GPU rather than falling back to the CPU.
    """
    return list(k8s.LAUNCH_COMMAND), [*torchrun_args, *train_args, "--device", "cuda" if gpus > 0 else "cpu"]


def _cell_env(grid: Grid) -> list[dict[str, str]]:
    """A cell pod's variables: the shared ones, and how long the launcher lets workers checkpoint after SIGTERM."""
    shutdown = max(0, grid.resources.grace_seconds - k8s.SHUTDOWN_MARGIN_SECONDS)
    return _env(grid) + [{"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(shutdown)}]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _quantity(value: Any) -> str:
    return _number(value) if isinstance(value, (int, float)) else str(value)


def _pod_context(grid: Grid, cell_id: str | None, placement: Placement) -> dict[str, Any]:
    """What the pods of a cell share, or (``cell_id`` None) those of a resource class's Indexed Job.

    ``placement``: the pods' GPUs. A pod of fewer GPUs than the grid's ``resources.gpus`` asks for the same
    share of its cpu, memory and shm.
    """
    res = grid.resources
    share = placement.gpus / res.gpus if res.gpus else 1.0
    node_selector = dict(res.node_selector)
    if res.gpu_type:
        node_selector["nvidia.com/gpu.product"] = res.gpu_type
    obj_labels = labels(grid, k8s.COMPONENT_CELL, cell_id)
    if cell_id is None:
        obj_labels[k8s.LABEL_RESOURCE_CLASS] = placement.name
    pod_labels = dict(obj_labels)
    if grid.queue:
        obj_labels[k8s.LABEL_QUEUE] = grid.queue
    if grid.workload_priority_class:
        obj_labels[k8s.LABEL_WORKLOAD_PRIORITY] = grid.workload_priority_class
    return {
        "name": k8s.object_name(grid.sweep, cell_id or placement.name),
        "namespace": grid.namespace,
        "labels": obj_labels,
        "pod_labels": pod_labels,
        "image": grid.image,
        "image_pull_policy": grid.image_pull_policy,
        "env": _cell_env(grid),
        "store_secret": grid.store_secret,
        "scratch": _scratch(),
        "shm_size": _quantity(scale_quantity(res.shm, share, cpu=False)),
        "cpu": _quantity(scale_quantity(res.cpu, share, cpu=True)),
        "memory": _quantity(scale_quantity(res.memory, share, cpu=False)),
        "gpus": placement.gpus,
        "gpu_resource": res.gpu_resource,
        "node_selector": node_selector,
        "tolerations": res.effective_tolerations(),
        "service_account": grid.service_account,
        "priority_class": res.priority_class,
        "run_as_user": k8s.RUN_AS_USER,
        "run_as_group": k8s.RUN_AS_GROUP,
        "backoff_limit": res.backoff_limit,
        "deadline_seconds": res.deadline_seconds,
        "ttl_seconds": res.ttl_seconds,
        "grace_seconds": res.grace_seconds,
        "exit_codes_permanent": list(k8s.EXIT_CODES_PERMANENT),
    }


# ---- one render function per object -----------------------------------------------------------------


def _cell_object(backend: Backend, grid: Grid, cell_id: str, cell_arg: str, placement: Placement) -> Document:
    """One cell as an object of a per-cell ``backend``: the pod body, the backend's own variables, its template."""
    problems = backend.render_problems(nodes=grid.resources.nodes, priority_class=grid.resources.priority_class)
    if problems:
        raise ConfigError(problems)
    ctx = _pod_context(grid, cell_id, placement)
    ctx.update(backend.context(placement))
    ctx["command"], ctx["args"] = _launch(backend.torchrun_args(placement), _train_args(grid, cell_arg),
                                          placement.gpus)
    return _render(backend.template, ctx)


def _indexed_document(grid: Grid, placement: Placement, cells: list[Cell], parallelism: int) -> Document:
    """The cells of one resource class as an Indexed Job; index i trains ``cells[i]``, read from sweep.yaml."""
    backend = backends.INDEXED
    problems = backend.render_problems(nodes=grid.resources.nodes, priority_class=grid.resources.priority_class)
    if problems:
        raise ConfigError(problems)
    ctx = _pod_context(grid, None, placement)
    ctx.update(backend.context(placement))
    source = ["--cell-from-sweep", grid.sweep, "--resource-class", placement.name,
              "--sweep-digest", class_digest([c.id for c in cells])]
    ctx["command"], ctx["args"] = _launch(backend.torchrun_args(placement), _train_args(grid, source), placement.gpus)
    ctx["completions"] = len(cells)
    ctx["parallelism"] = min(parallelism, len(cells)) if parallelism else len(cells)
    # The deadline covers the whole Job: a cell's deadline for each wave of `parallelism` cells.
    ctx["deadline_seconds"] *= -(-len(cells) // ctx["parallelism"])
    failed = grid.resources.max_failed_cells or max(1, len(cells) // 10)
    ctx["max_failed"] = min(failed, len(cells))
    return _render(backend.template, ctx)


def render_indexed(grid: Grid, *, parallelism: int | None = None) -> list[Document]:
    """One Indexed Job per resource class (backend indexed), in the order the classes first appear.

    ``parallelism``: cells of each class running at once (default: the grid's max_active; 0: all).
    """
    cap = grid.max_active if parallelism is None else parallelism
    return [_indexed_document(grid, placement, cells, cap) for placement, cells in grid.resource_classes().values()]


def render_analysis_job(grid: Grid) -> dict:
    """``critbatch analyze --store S --sweep NAME`` as a batch/v1 Job, which starts when created.

    Not suspended: a suspend flag in a manifest is reset by every re-apply of it, which would stop a running
    analysis; so the Job is created only when every cell has finished (by submit, or ``render --analysis``).
    """
    return render_analysis_document(grid).obj


def render_analysis_document(grid: Grid) -> Document:
    a = grid.analysis
    obj_labels = labels(grid, k8s.COMPONENT_ANALYSIS)
    ctx = {
        "name": k8s.object_name(grid.sweep, k8s.ANALYSIS_SUFFIX),
        "namespace": grid.namespace,
        "labels": obj_labels,
        "container_name": k8s.CONTAINER_NAME,
        "image": grid.image,
        "image_pull_policy": grid.image_pull_policy,
        "args": ["analyze", "--store", grid.store, "--sweep", grid.sweep, "--strict"] + list(a.args),
        "env": _env(grid),
        "store_secret": grid.store_secret,
        "scratch": _scratch(),
        "cpu": _quantity(a.cpu),
        "memory": _quantity(a.memory),
        "service_account": grid.service_account,
        "run_as_user": k8s.RUN_AS_USER,
        "run_as_group": k8s.RUN_AS_GROUP,
        "backoff_limit": a.backoff_limit,
        "deadline_seconds": a.deadline_seconds,
        "ttl_seconds": grid.resources.ttl_seconds,
        "grace_seconds": grid.resources.grace_seconds,
        "exit_code_config": int(ExitCode.CONFIG),
    }
    return _render("job-analysis.yaml.j2", ctx)


#: The kinds critbatch renders that hold no pod: the search controller's identity and its rights.
_PODLESS = ("ServiceAccount", "Role", "RoleBinding")


def render_search_documents(grid: Grid, *, poll_seconds: float = 30.0) -> list[Document]:
    """The search controller (``critbatch search GRID --cluster`` in a pod): its ServiceAccount, a Role on the
    cells' objects, their pods and the events that say why a controller made no pod (list) in the grid's
    namespace, the RoleBinding, and the Job, which starts when applied.

    The grid travels inside the Job as JSON (its spec as written, the overrides applied), so the pod needs no
    file; rendering stays a pure function of the grid.
    """
    name = k8s.object_name(grid.sweep, k8s.SEARCH_SUFFIX)
    meta = {"name": name, "namespace": grid.namespace, "labels": labels(grid, k8s.COMPONENT_SEARCH)}
    backend = backends.get(grid.backend)
    rules = [{"apiGroups": [backend.group], "resources": [backend.plural],
              "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
             {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
             {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]}]
    a = grid.analysis
    job = {
        **meta,
        "container_name": k8s.CONTAINER_NAME,
        "image": grid.image,
        "image_pull_policy": grid.image_pull_policy,
        "args": ["search", json.dumps(grid.raw, sort_keys=True, separators=(",", ":"), default=str), "--cluster",
                 "--poll-seconds", _number(poll_seconds)],
        "env": _env(grid),
        "store_secret": grid.store_secret,
        "scratch": _scratch(),
        "cpu": _quantity(a.cpu),
        "memory": _quantity(a.memory),
        "run_as_user": k8s.RUN_AS_USER,
        "run_as_group": k8s.RUN_AS_GROUP,
        "backoff_limit": grid.resources.backoff_limit,
        "deadline_seconds": grid.resources.deadline_seconds,
        "ttl_seconds": grid.resources.ttl_seconds,
        "grace_seconds": grid.resources.grace_seconds,
        "exit_code_config": int(ExitCode.CONFIG),
    }
    return [_render("serviceaccount-search.yaml.j2", meta), _render("role-search.yaml.j2", {**meta, "rules": rules}),
            _render("rolebinding-search.yaml.j2", meta), _render("job-search.yaml.j2", job)]


def render_cell(grid: Grid, cell: Cell, backend: str | None = None) -> dict:
    """One cell as an object of ``backend`` (default: the grid's): a batch/v1 Job on one node
    (``torchrun --standalone``), a Kubeflow Trainer v2 TrainJob on the critbatch runtime (k8s/trainer) or a
    kubeflow.org/v1 PyTorchJob (Master + nodes-1 Workers), on the devices of the cell's plan."""
    make = cell_renderer(grid, backend or grid.backend)
    return make(grid, cell.id, cell_json(cell), grid.plan(cell).placement).obj


def cell_renderer(grid: Grid, name: str):
    """``(grid, cell id, --cell argument, placement) -> Document`` for the per-cell backend ``name``."""
    backend = backends.get(name)
    if not backend.per_cell:
        per_cell = [b.name for b in backends.REGISTRY.values() if b.per_cell]
        raise ConfigError(f"backend: {name!r} renders one Job per resource class, not one object per cell; "
                          f"per-cell backends: {', '.join(per_cell)}")
    return functools.partial(_cell_object, backend)


# Stand-ins for the only two values that differ between the cells of a grid. The id token has a cell id's
# length, so the prototype's name is checked at its real length.
_ID_TOKEN = "zqcellidzq"
_JSON_TOKEN = "zq-critbatch-cell-json-zq"


def render_documents(grid: Grid, *, backend: str | None = None, analysis: bool = True) -> list[Document]:
    """Every cell's object (text and loaded), in the grid's cell order, then the analysis Job; backend
    ``indexed``: one Indexed Job per resource class instead of the cells' objects.

    The cells of one resource class (sizing.py) differ only in their id and their ``--cell`` JSON, and
    every value reaches the YAML through ``|tojson``. So the template is rendered and loaded once per
    class, with stand-ins for those two values, and each cell's document is that one with the stand-ins
    replaced - in the text by the values JSON-escaped, in the object by the values themselves: exactly
    what rendering and loading each cell would give (tests/test_render.py checks that), at a fraction of
    the cost for 10,000 cells.
    """
    backend = backend or grid.backend
    if not backends.get(backend).per_cell:
        return render_indexed(grid) + ([render_analysis_document(grid)] if analysis else [])
    make = cell_renderer(grid, backend)
    cells = grid.cells()
    placements = [p.placement for p in grid.plans()]
    docs: list[Document] = []
    raw = json.dumps(grid.raw, default=str)
    if _ID_TOKEN in raw or _JSON_TOKEN in raw:  # pragma: no cover - a grid that spells a stand-in
        docs = [make(grid, cell.id, cell_json(cell), placement) for cell, placement in zip(cells, placements)]
    elif cells:
        protos: dict[Placement, Document] = {}  # one per resource class
        for cell_id, arg, placement in zip(grid.cell_ids(), grid.cell_jsons(), placements):
            if placement not in protos:
                protos[placement] = make(grid, _ID_TOKEN, _JSON_TOKEN, placement)
            proto = protos[placement]
            text = proto.text.replace(_ID_TOKEN, cell_id).replace(_JSON_TOKEN, json.dumps(arg)[1:-1])
            obj = _substitute(proto.obj, cell_id, arg)
            check_object(obj)
            docs.append(Document(text, obj))
    if analysis:
        ctx_doc = render_analysis_document(grid)
        docs.append(ctx_doc)
    return docs


def _substitute(node: Any, cell_id: str, arg: str) -> Any:
    if isinstance(node, str):
        if node == _JSON_TOKEN:
            return arg
        return node.replace(_ID_TOKEN, cell_id) if _ID_TOKEN in node else node
    if isinstance(node, dict):
        return {k: _substitute(v, cell_id, arg) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, cell_id, arg) for v in node]
    return node


def render_grid(grid: Grid, *, backend: str | None = None, analysis: bool = True) -> list[dict]:
    """Every cell's object, in the grid's cell order, then the analysis Job."""
    return [doc.obj for doc in render_documents(grid, backend=backend, analysis=analysis)]


# ---- checks on what was rendered ------------------------------------------------------------------------


def pod_specs(obj: dict) -> list[dict]:
    """The pod specs (or pod spec patches) inside an object of any kind critbatch renders."""
    kind = obj.get("kind")
    if kind in _PODLESS:
        return []
    try:
        return backends.by_kind(kind).pod_specs(obj)
    except KeyError:
        raise ValueError(f"unexpected kind {kind!r}") from None


def env_lists(obj: dict) -> list[list[dict]]:
    if obj.get("kind") in _PODLESS:
        return []
    return backends.by_kind(obj["kind"]).env_lists(obj)


def check_object(obj: Any) -> None:
    """What must hold for every rendered object; a failure is a bug in a template, hence RuntimeError."""
    problems: list[str] = []
    if not isinstance(obj, dict) or "kind" not in obj:
        raise RuntimeError("a template rendered something that is not a Kubernetes object")
    meta = obj["metadata"]
    name = meta["name"]
    where = f"{obj['kind']} {name}"
    if len(name) > k8s.MAX_NAME or not k8s.DNS_LABEL.match(name):
        problems.append(f"name {name!r} is not a DNS-1123 label of at most {k8s.MAX_NAME} characters")
    for key, value in meta.get("labels", {}).items():
        if not isinstance(value, str) or len(value) > k8s.MAX_LABEL_VALUE or not k8s.LABEL_VALUE.match(value):
            problems.append(f"label {key}={value!r} is not a valid label value")
    for pod in pod_specs(obj):
        ctx = pod.get("securityContext", {})
        if ctx.get("runAsNonRoot") is not True or ctx.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append("pod security context is not restricted (runAsNonRoot, seccomp RuntimeDefault)")
        for container in pod.get("containers", []):
            sc = container.get("securityContext", {})
            if (sc.get("allowPrivilegeEscalation") is not False or sc.get("readOnlyRootFilesystem") is not True
                    or sc.get("capabilities", {}).get("drop") != ["ALL"]):
                problems.append(f"container {container.get('name')} is not restricted")
    for env in env_lists(obj):
        for var in env:
            if var["name"] in CREDENTIAL_VARS and ("value" in var or "secretKeyRef" not in var.get("valueFrom", {})):
                problems.append(f"{var['name']} must come from a secretKeyRef")
    if problems:
        raise RuntimeError(f"{where}: " + "; ".join(problems))


# ---- output -----------------------------------------------------------------------------------------------------


def dump_stream(docs: list[Document]) -> str:
    """A multi-document stream for ``kubectl apply -f -``: each document as its template wrote it."""
    return "".join(f"---\n{doc.text}" for doc in docs)


def object_filename(obj: dict) -> str:
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def write_directory(docs: list[Document], directory: str | Path) -> list[Path]:
    """One file per object; a file whose content is unchanged is not rewritten (its mtime stays)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for doc in docs:
        path = out / object_filename(doc.obj)
        paths.append(path)
        if path.is_file() and path.read_text() == doc.text:
            continue
        tmp = path.with_suffix(".tmp")
        tmp.write_text(doc.text)
        tmp.replace(path)
    return paths


def grid_for_command(args: argparse.Namespace, *, cluster_store: bool = False) -> Grid:
    """The grid named on the command line, with the run settings its options override.

    ``cluster_store``: the store must be one pods can reach (S3), not a local directory.
    """
    grid = load_grid(args.grid)
    overrides = {k: getattr(args, k, None) for k in ("store", "image", "namespace", "backend")}
    if any(v is not None for v in overrides.values()):
        grid = grid.with_overrides(**overrides)
    if cluster_store and not grid.store.startswith("s3://"):
        raise ConfigError(f"store: {shown(grid.store)} is a path on this machine, which pods cannot reach; "
                          "use s3://BUCKET/PREFIX (the grid's store, or --store)")
    return grid


def cli_render(args: argparse.Namespace) -> int:
    grid = grid_for_command(args, cluster_store=True)
    # Everything rendered before anything is written. The cells' stream leaves the analysis Job out: it runs
    # as soon as it exists, so it is applied (`--analysis`) or created by submit once every cell has finished.
    docs = [render_analysis_document(grid)] if args.analysis else render_documents(grid, analysis=False)
    to_stdout = args.output in ("-", "")
    if not to_stdout:
        output_dir(args.output, "--output")
    if not args.analysis:
        print(grid.plan_text(), file=sys.stderr)  # the cells' plan, before anything is written
        print(sweep_space(grid.cells(), grid.max_active), file=sys.stderr)
    if to_stdout:
        sys.stdout.write(dump_stream(docs))
        return 0
    paths = write_directory(docs, args.output)
    print(f"wrote {len(paths)} objects to {args.output}", file=sys.stderr)
    return 0
