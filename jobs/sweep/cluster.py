"""Create a grid's objects on a cluster, and report where every cell stands.

    critbatch submit table1-cifar10-resnet34                    # create what is missing, once
    critbatch submit GRID --max-active 8 --wait                 # keep 8 cells running until all finish,
                                                                # then start the analysis Job
    critbatch status GRID                                       # one table: cluster state + store markers
    critbatch status GRID --no-cluster                          # the store alone

``submit`` is idempotent: it renders the grid, skips every cell whose ``_SUCCESS`` is in the store and
every object that already exists, and treats "409 AlreadyExists" as success (another submit got there
first). Failed objects are left for a person to look at: delete one and submit again to retry it. The
analysis Job is created suspended and resumed once every cell has finished.

Talks to the cluster with the ``kubernetes`` client: the current kube config context, else the pod's
in-cluster service account.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from . import k8s
from critbatch.jobs.cell.errors import ConfigError, StoreUnavailable
from .grid import Grid
from .render import grid_for_command, render_analysis_job, render_cell
from critbatch.jobs.store import Store, open_store
from critbatch.jobs.cell.layout import success_key

#: What ``status`` calls a cell, in the order of its counts line.
STATES = ("done", "diverged", "running", "pending", "failed")


def api_client():
    """A configured ``kubernetes.client.ApiClient``: kube config first, then in-cluster."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    # KUBECONFIG is read here, not when the kubernetes package was imported (it caches the variable then).
    path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    try:
        config.load_kube_config(config_file=path)
    except (ConfigException, OSError, TypeError) as err:
        try:
            config.load_incluster_config()
        except ConfigException:
            if any(os.path.isfile(p) for p in path.split(os.pathsep)):
                raise ConfigError(f"kubernetes: cannot use the kube config {path}: {err}") from None
            raise ConfigError("kubernetes: no kube config found (~/.kube/config or KUBECONFIG) and not running "
                              "in a cluster; point KUBECONFIG at a cluster, or use `critbatch render` and "
                              "kubectl") from None
    return client.ApiClient()


class Cluster:
    """The few API calls submit and status make, per backend kind, on plain dicts."""

    def __init__(self, api, namespace: str):
        from kubernetes import client

        self.api = api
        self.namespace = namespace
        self.batch = client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    _CRDS = {
        "PyTorchJob": (k8s.PYTORCHJOB_GROUP, k8s.PYTORCHJOB_VERSION, k8s.PYTORCHJOB_PLURAL),
        "TrainJob": (k8s.TRAINJOB_GROUP, k8s.TRAINJOB_VERSION, k8s.TRAINJOB_PLURAL),
    }

    def list(self, kind: str, selector: str) -> list[dict]:
        if kind == "Job":
            result = self.batch.list_namespaced_job(self.namespace, label_selector=selector)
            return self.api.sanitize_for_serialization(result).get("items", [])
        group, version, plural = self._CRDS[kind]
        result = self.custom.list_namespaced_custom_object(group, version, self.namespace, plural,
                                                           label_selector=selector)
        return list(result.get("items", []))

    def create(self, obj: dict) -> bool:
        """Create ``obj``; False when it already exists (409), which counts as done."""
        from kubernetes.client.exceptions import ApiException

        try:
            if obj["kind"] == "Job":
                self.batch.create_namespaced_job(self.namespace, obj)
            else:
                group, version, plural = self._CRDS[obj["kind"]]
                self.custom.create_namespaced_custom_object(group, version, self.namespace, plural, obj)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        return True

    def resume_job(self, name: str) -> None:
        self.batch.patch_namespaced_job(name, self.namespace, {"spec": {"suspend": False}},
                                        _content_type="application/merge-patch+json")


# ---- state of one object ------------------------------------------------------------------------------------


def _true_conditions(obj: dict) -> set[str]:
    return {c.get("type") for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def object_state(obj: dict) -> str:
    """succeeded | failed | running | suspended | created: one word for any of the kinds rendered."""
    conditions = _true_conditions(obj)
    status = obj.get("status") or {}
    if conditions & {"Complete", "Succeeded"}:
        return "succeeded"
    if "Failed" in conditions:
        return "failed"
    if (obj.get("spec") or {}).get("suspend") or "Suspended" in conditions:
        return "suspended"
    if status.get("active") or conditions & {"Running", "Restarting"}:
        return "running"
    return "created"


def is_finished(obj: dict) -> bool:
    return object_state(obj) in ("succeeded", "failed")


# ---- submit ---------------------------------------------------------------------------------------------------


@dataclass
class SubmitReport:
    created: list[str] = field(default_factory=list)
    already_existed: list[str] = field(default_factory=list)  # seen in the listing, or a 409 on create
    skipped_done: list[str] = field(default_factory=list)  # _SUCCESS in the store
    waiting: list[str] = field(default_factory=list)  # held back by the concurrency cap
    failed: list[str] = field(default_factory=list)
    analysis: str = ""  # created | exists | resumed | ""
    finished: bool = False  # every cell done or failed

    def summary(self) -> str:
        return (f"created {len(self.created)}, already there {len(self.already_existed)}, "
                f"done in store {len(self.skipped_done)}, held by the cap {len(self.waiting)}, "
                f"failed {len(self.failed)}" + (f"; analysis job {self.analysis}" if self.analysis else ""))


def cell_kind(grid: Grid) -> str:
    return {"job": "Job", "pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}[grid.backend]


def finished_cells(grid: Grid, store: Store | None) -> dict[str, dict]:
    """Cell id -> its _SUCCESS summary, for every cell whose marker is in the store."""
    out: dict[str, dict] = {}
    if store is None:
        return out
    for cell in grid.cells():
        key = success_key(grid.sweep, cell.id)
        if store.exists(key):
            try:
                out[cell.id] = json.loads(store.get_text(key))
            except (ValueError, UnicodeDecodeError):
                out[cell.id] = {"status": "done"}
    return out


def submit_once(grid: Grid, cluster: Cluster, store: Store | None, *, max_active: int = 0,
                dry_run: bool = False, analysis: bool = True) -> SubmitReport:
    """One pass: create every missing cell object (within the cap) and the analysis Job."""
    report = SubmitReport()
    done = finished_cells(grid, store)
    kind = cell_kind(grid)
    existing = {o["metadata"]["name"]: o for o in cluster.list(kind, k8s.cell_selector(grid.sweep))}
    active = sum(1 for o in existing.values() if not is_finished(o))
    cell_ids = {c.id for c in grid.cells()}
    for cell in grid.cells():
        name = k8s.object_name(grid.sweep, cell.id)
        if cell.id in done:
            report.skipped_done.append(cell.id)
            continue
        if name in existing:
            (report.failed if object_state(existing[name]) == "failed" else report.already_existed).append(cell.id)
            continue
        if max_active and active >= max_active:
            report.waiting.append(cell.id)
            continue
        if dry_run:
            report.created.append(cell.id)
            active += 1
            continue
        if cluster.create(render_cell(grid, cell)):
            report.created.append(cell.id)
            active += 1
        else:
            report.already_existed.append(cell.id)
    succeeded = {o["metadata"]["labels"].get(k8s.LABEL_CELL) for o in existing.values()
                 if object_state(o) == "succeeded"}
    report.finished = all(c in done or c in succeeded or c in report.failed for c in cell_ids)
    if analysis:
        report.analysis = _ensure_analysis(grid, cluster, dry_run, start=report.finished and not report.failed)
    return report


def _ensure_analysis(grid: Grid, cluster: Cluster, dry_run: bool, start: bool) -> str:
    obj = render_analysis_job(grid)
    name = obj["metadata"]["name"]
    selector = f"{k8s.LABEL_SWEEP}={grid.sweep},{k8s.LABEL_COMPONENT}={k8s.COMPONENT_ANALYSIS}"
    found = {o["metadata"]["name"]: o for o in cluster.list("Job", selector)}
    state = "exists"
    if name not in found:
        state = "created (suspended)"
        if not dry_run:
            cluster.create(obj)
    elif object_state(found[name]) != "suspended":
        return object_state(found[name])
    if start:
        if not dry_run:
            cluster.resume_job(name)
        state = "resumed"
    return state


def submit(grid: Grid, cluster: Cluster, store: Store | None, *, max_active: int = 0, wait: bool = False,
           poll_seconds: float = 30.0, timeout: float = 0.0, dry_run: bool = False,
           log: Callable[[str], None] = lambda s: None, sleep: Callable[[float], None] = time.sleep) -> SubmitReport:
    """``submit_once``, repeated every ``poll_seconds`` with ``wait`` until every cell has finished."""
    started = time.monotonic()
    while True:
        report = submit_once(grid, cluster, store, max_active=max_active, dry_run=dry_run)
        log(report.summary())
        if not wait or dry_run or report.finished:
            return report
        if timeout and time.monotonic() - started + poll_seconds > timeout:
            raise TimeoutError(f"cells still unfinished after {timeout:g} s: {report.summary()}")
        sleep(poll_seconds)


def _store_for(grid: Grid, url: str | None) -> Store:
    store = open_store(url or grid.store, retries=2)
    store.check()
    return store


def cli_submit(args: argparse.Namespace) -> int:
    grid = grid_for_command(args, cluster_store=True)
    if args.max_active < 0:
        raise ConfigError(f"--max-active: must be >= 0 (0 = no cap), got {args.max_active}")
    max_active = args.max_active or grid.max_active
    store = _store_for(grid, None)
    cluster = Cluster(api_client(), grid.namespace)
    if not args.dry_run:
        key = f"{grid.sweep}/sweep.yaml"
        text = grid.sweep_yaml()
        if not store.exists(key) or store.get_text(key) != text:
            store.put_text(key, text)
    try:
        report = submit(grid, cluster, store, max_active=max_active, wait=args.wait, poll_seconds=args.poll_seconds,
                        timeout=args.timeout, dry_run=args.dry_run,
                        log=lambda s: print(f"{grid.sweep}: {s}", file=sys.stderr))
    except TimeoutError as err:
        print(f"critbatch submit: {err}", file=sys.stderr)
        return 1
    verb = "would create" if args.dry_run else "created"
    for cell_id in report.created:
        print(f"{verb} {k8s.object_name(grid.sweep, cell_id)}")
    return 1 if report.failed and report.finished else 0


# ---- status ----------------------------------------------------------------------------------------------------


def cell_states(grid: Grid, store: Store | None, objects: dict[str, dict] | None) -> list[dict[str, Any]]:
    """One row per cell: its id, axes, the object's state on the cluster, the store's marker, the verdict."""
    done = finished_cells(grid, store)
    rows = []
    for cell in grid.cells():
        name = k8s.object_name(grid.sweep, cell.id)
        marker = done.get(cell.id)
        store_state = str(marker.get("status", "done")) if marker else "-"
        if objects is None:
            cluster_state = "?"
        else:
            cluster_state = object_state(objects[name]) if name in objects else "absent"
        if store_state in ("done", "diverged"):
            state = store_state
        elif cluster_state == "failed":
            state = "failed"
        elif cluster_state in ("running", "succeeded"):
            state = "running"  # succeeded on the cluster but no marker yet: still uploading, or lost
        else:
            state = "pending"
        rows.append({"cell": cell.id, "dataset": cell.dataset.name, "model": cell.model, "strategy": cell.strategy,
                     "batch": cell.batch_size, "seed": cell.seed, "cluster": cluster_state, "store": store_state,
                     "state": state})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip()]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip() for r in rows]
    counts = Counter(r["state"] for r in rows)
    lines.append("  ".join(f"{s} {counts.get(s, 0)}" for s in STATES) + f"  (total {len(rows)})")
    return "\n".join(lines)


def cli_status(args: argparse.Namespace) -> int:
    grid = grid_for_command(args)
    try:
        store = _store_for(grid, None)
    except StoreUnavailable as err:
        print(f"critbatch status: store unreachable ({err}); showing the cluster alone", file=sys.stderr)
        store = None
    objects = None
    if not args.no_cluster:
        cluster = Cluster(api_client(), grid.namespace)
        objects = {o["metadata"]["name"]: o for o in cluster.list(cell_kind(grid), k8s.cell_selector(grid.sweep))}
    print(format_table(cell_states(grid, store, objects)))
    return 0
