"""Where every cell of a grid stands: one table joining the cluster and the store.

    critbatch status GRID                 # cluster state, store marker, verdict and why, per cell; then counts
    critbatch status GRID --no-cluster    # the store alone

One LIST of the store's markers, one of the cell objects (backend indexed: of the resource classes'
Indexed Jobs, whose completedIndexes and failedIndexes say each cell's state), one of their pods and, when
a cell has no pod, one of the namespace's Warning events. The verdict:
``done``/``diverged`` from ``_SUCCESS``, ``damaged`` when it is unreadable or its log parts are not the ones
it lists (the cell's next trainer trains it again); ``failed`` from a Failed object or, after the Job's TTL has
deleted it, from the ``_FAILED`` marker (status writes that marker when it sees a Failed object, as submit
does); ``lost`` when its object succeeded over a minute ago and its ``_SUCCESS`` is not in the store
(the pods wrote to another store, or did nothing); ``running`` while a pod runs or the last upload is on
its way; otherwise ``pending``, with the reason when a pod is stuck (ImagePullBackOff,
CreateContainerConfigError: a missing Secret or key, Unschedulable: the scheduler's message) or when the
controller could create no pod at all (FailedCreate: e.g. a missing ServiceAccount, from the object's
events), so a cell that can never start does not pass for one that is running. A branch cell
(docs/branches.md) that is not running yet is ``waiting`` while its base's kept checkpoint is not in the
store (its pods exit 197 and are retried until it is).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import Any

from .client import Cluster, ClusterUnavailable, api_client, cell_problem, cell_stall, create_failures, pods_by_cell
from .indexed import index_views
from .markers import MarkerBook, Markers
from .submit import LOST_GRACE_SECONDS, backend_of, grace_seconds, lost_why, store_for, upload_age
from ..backends import k8s
from ..cell.errors import StoreUnavailable
from ..cell.spec import branch_start
from ..sweep.grid import Grid
from ..sweep.render import grid_for_command

#: What ``status`` calls a cell, in the order of its counts line (``waiting``, a branch on its base, only when
#: a cell is).
STATES = ("done", "diverged", "damaged", "running", "pending", "failed", "lost")
WAITING = "waiting"


def cell_states(grid: Grid, marks: Markers, objects: dict[str, dict] | None,
                pods: dict[str, list[dict]] | None = None, failures: dict[str, tuple[str, str]] | None = None,
                now: float | None = None, lost_grace: float = LOST_GRACE_SECONDS) -> list[dict[str, Any]]:
    """One row per cell: id, axes, the object's state on the cluster, the store's marker, the verdict, why.

    ``failures``: the namespace's create failures by object name (client.create_failures), for the cells
    without pods; ``now``: the time a succeeded object's age is measured at (default: now); ``lost_grace``: the
    age past which a succeeded object without its ``_SUCCESS`` is lost."""
    backend = backend_of(grid)
    now = time.time() if now is None else now
    rows = []
    for cell in grid.cells():
        name = k8s.object_name(grid.sweep, cell.id)
        obj = (objects or {}).get(name)
        done, failed = marks.done.get(cell.id), marks.failed.get(cell.id)
        store_state = str(done.get("status", "done")) if done else "failed" if failed else "-"
        cluster_state = "?" if objects is None else backend.state(obj) if obj else "absent"
        problem = None if obj is None or cluster_state in ("succeeded", "failed") else cell_problem(
            (pods or {}).get(cell.id, []))
        why = "-"
        if cell.id in marks.damaged:  # its _SUCCESS unreadable, or its parts not what it lists: not done
            state = store_state = "damaged"
            why = "; ".join(marks.damaged[cell.id])
        elif store_state in ("done", "diverged"):
            state = store_state
        elif cluster_state == "failed" or (store_state == "failed" and cluster_state in ("absent", "?")):
            state = "failed"
            why = backend.failure(obj) if cluster_state == "failed" else failed.get("reason", "")
        elif problem:
            state, why = "pending", f"{problem[0]}: {problem[1]}" if problem[1] else problem[0]
        elif cluster_state == "succeeded":  # no marker: its last upload on the way, or written elsewhere
            age = upload_age(backend, obj, cell.id, now, None)
            state, why = ("lost", lost_why(grid)) if age >= lost_grace else (
                "running", "succeeded on the cluster; its _SUCCESS on the way")
        elif cluster_state in ("created", "running") and (stall := cell_stall(
                backend, obj, (pods or {}).get(cell.id, []), failures or {})):
            state, why = "pending", f"{stall[0]}: {stall[1]}" if stall[1] else stall[0]
        elif (waits := _waits_on(cell, marks)) is not None:  # its pod, if any, waits inside `critbatch train`
            state, why = WAITING, waits
        elif cluster_state == "running":
            state = "running"
        else:
            state = "pending"
            why = "suspended: held by the cap or queued" if cluster_state == "suspended" else "-"
        rows.append({"cell": cell.id, "dataset": cell.dataset.name, "model": cell.model, "strategy": cell.strategy,
                     "batch": cell.batch_size, "seed": cell.seed, "cluster": cluster_state, "store": store_state,
                     "state": state, "why": why})
    return rows


def _waits_on(cell: Any, marks: Markers) -> str | None:
    """Why a branch cannot start yet (its base's kept checkpoint is not in the store), or None."""
    if cell.branch is None:
        return None
    base, size = cell.branch.base, cell.train_size()
    step = branch_start(cell, size) if size is not None else None
    if step is not None and step in marks.checkpoints.get(base, ()):
        return None
    if step is None and base in marks.done:
        return None
    point = f"step {step}" if step is not None else cell.branch.point
    return f"on base {base}: its checkpoint at {point} is not in the store yet"


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip()]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip() for r in rows]
    counts = Counter(r["state"] for r in rows)
    shown = STATES if not counts.get(WAITING) else (*STATES[:5], WAITING, *STATES[5:])
    lines.append("  ".join(f"{s} {counts.get(s, 0)}" for s in shown) + f"  (total {len(rows)})")
    return "\n".join(lines)


def record_failures(grid: Grid, book: MarkerBook, marks: Markers, objects: dict[str, dict]) -> None:
    """Write ``_FAILED`` for every Failed cell object the store does not know about yet. (The kind is the
    backend's: the API server leaves ``kind`` out of a LIST's items.)"""
    backend = backend_of(grid)
    for cell_id in grid.cell_ids():
        name = k8s.object_name(grid.sweep, cell_id)
        obj = objects.get(name)
        if obj and cell_id not in marks.failed and cell_id not in marks.done and backend.state(obj) == "failed":
            marks.failed[cell_id] = book.record_failure(cell_id, kind=backend.kind, name=name,
                                                        reason=backend.failure(obj), by="status")


def cli_status(args: argparse.Namespace) -> int:
    grid = grid_for_command(args)
    grace = grace_seconds(args.lost_grace)
    try:
        store = store_for(grid)
    except StoreUnavailable as err:
        print(f"critbatch status: store unreachable ({err}); showing the cluster alone", file=sys.stderr)
        store = None
    book = MarkerBook(store, grid.sweep)
    marks = book.read()
    objects = pods = failures = None
    if not args.no_cluster:
        cluster = Cluster(api_client(), grid.namespace)
        selector = k8s.cell_selector(grid.sweep)
        backend = backend_of(grid)
        try:
            objects = {o["metadata"]["name"]: o for o in cluster.list(backend.kind, selector)}
            pod_list = cluster.list("Pod", selector) if objects else []
            if not backend.per_cell:  # the cells' states from their class's Indexed Job
                objects, pods = index_views(grid, list(objects.values()), pod_list)
            else:
                pods = pods_by_cell(pod_list)
            prefix = k8s.object_name(grid.sweep, "")
            if any(backend.state(o) in ("created", "running") and not pods.get(name.removeprefix(prefix))
                   for name, o in objects.items()):  # one LIST of the events: why their controller made no pod
                failures = create_failures(cluster.warnings(backend.event_kind))
        except ClusterUnavailable as err:
            print(f"critbatch status: {err}; showing the store alone", file=sys.stderr)
            objects = None
        else:
            record_failures(grid, book, marks, objects)
    print(format_table(cell_states(grid, marks, objects, pods, failures, lost_grace=grace)))
    return 0
