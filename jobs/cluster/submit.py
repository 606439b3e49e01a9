"""Create a grid's objects on a cluster and keep them going until every cell has finished.

    critbatch submit table1-cifar10-resnet34 --image REGISTRY/critbatch:TAG     # create what is missing, once
    critbatch submit GRID --image IMG --max-active 8 --wait     # 8 cells running at a time until all finish,
                                                                # then the analysis Job
    critbatch submit GRID --image IMG --retry-failed            # give failed cells another go

Each pass (``--wait`` repeats one every ``--poll-seconds``) reads the store's markers with one LIST and
the sweep's objects and pods with one LIST each, then:

- skips every cell whose ``_SUCCESS`` is in the store;
- creates every missing cell **suspended** and resumes as many as the cap allows (``--max-active`` or the
  grid's ``max_active``; 0 = all). A suspended Job's ``activeDeadlineSeconds`` does not run, so the last
  cells of a big sweep cannot time out before they start. With a Kueue ``queue`` Kueue resumes them
  (admission) and the cap is Kueue's quota. "409 AlreadyExists" counts as done: another submit got there first;
- writes ``_FAILED`` (the reason) into the store for a cell whose object failed, so the failure is
  remembered after the Job's TTL deletes it; such a cell is reported, never silently created again, until
  ``--retry-failed`` deletes the failed object and the marker and creates it anew;
- creates the analysis Job (it runs at once) when every cell is done, and no cell has failed;
- reports cells whose pods are stuck: ImagePullBackOff, CreateContainerConfigError (a missing Secret or
  key), Unschedulable; and cells without any pod whose controller says why it made none (a Warning event
  such as FailedCreate for a missing ServiceAccount: one LIST of the namespace's events per pass);
- calls a cell *lost* when its object succeeded more than LOST_GRACE_SECONDS ago and its ``_SUCCESS`` is
  still not in the store (its pods wrote to another store, or did nothing): the sweep ends without it.

Before the first pass a cluster submit refuses the placeholder image ``critbatch:latest`` (no registry
serves it: every pod would sit in ImagePullBackOff, which never fails a Job) and checks that the
namespace, the pods' ServiceAccount (without it the Job controller creates no pod at all) and the store
Secret with both keys (a pod would sit in CreateContainerConfigError) exist. A transient API or store
error inside ``--wait`` is one line in the log, and the next poll tries again.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from .client import (
    Cluster,
    ClusterUnavailable,
    api_client,
    cell_problem,
    cell_stall,
    create_failures,
    describe,
    pods_by_cell,
)
from .indexed import index_views
from .markers import MarkerBook
from .. import backends
from ..backends import Backend, k8s
from ..cell.errors import ConfigError, StoreUnavailable
from ..store import Store, open_store
from ..sweep.grid import Grid
from ..sweep.render import grid_for_command, render_analysis_job, render_cell, render_indexed

#: The Secret keys every pod reads (k8s/store-secret.example.yaml).
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
#: How long after its object succeeded a cell's ``_SUCCESS`` may still be on its way (the trainer's last
#: upload) before the cell is called lost: two of submit's default polls.
LOST_GRACE_SECONDS = 60.0


def grace_seconds(seconds: float | None) -> float:
    """``--lost-grace``: LOST_GRACE_SECONDS when not given."""
    if seconds is None:
        return LOST_GRACE_SECONDS
    if not seconds > 0:
        raise ConfigError(f"--lost-grace: must be > 0 seconds, got {seconds:g}")
    return seconds


def lost_why(grid: Grid) -> str:
    where = grid.store + (f" at {grid.store_endpoint}" if grid.store.startswith("s3://") and grid.store_endpoint else "")
    return (f"succeeded on the cluster, nothing in the store: do the pods write to another store? (theirs: {where}; "
            "this machine reads the AWS_* variables)")


def _seconds(rfc3339: str | None) -> float | None:
    if not rfc3339:
        return None
    try:
        return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def upload_age(backend: Backend, obj: dict, cell_id: str, now: float, seen: dict[str, float] | None) -> float:
    """Seconds since a cell's object succeeded: by its completion time, else since this process first saw it
    succeeded (``seen``, kept across polls; without it, 0)."""
    first = seen.setdefault(cell_id, now) if seen is not None else now
    done = _seconds(backend.completion_time(obj))
    return now - (done if done is not None else first)


@dataclass
class SubmitReport:
    """What one pass did and found; each list holds cell ids."""

    created: list[str] = field(default_factory=list)  # new objects, suspended unless started at once
    started: list[str] = field(default_factory=list)  # created running, or resumed
    already_existed: list[str] = field(default_factory=list)  # running or queued already, or a 409 on create
    skipped_done: list[str] = field(default_factory=list)  # _SUCCESS in the store
    waiting: list[str] = field(default_factory=list)  # suspended: held by the cap, or queued in Kueue
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> why (on the cluster, or remembered)
    retried: list[str] = field(default_factory=list)  # failed cells deleted and created anew
    stuck: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # cell id -> (reason, message, pod)
    # cell id -> (reason, message, object) for a cell without pods whose controller says why it made none
    stalled: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    uploading: list[str] = field(default_factory=list)  # succeeded on the cluster, _SUCCESS on its way
    damaged: list[str] = field(default_factory=list)  # succeeded on the cluster, its _SUCCESS damaged (status says)
    lost: dict[str, str] = field(default_factory=dict)  # succeeded on the cluster long ago, nothing in the store
    analysis: str = ""
    finished: bool = False  # every cell done, failed or lost

    def summary(self) -> str:
        text = (f"created {len(self.created)}, started {len(self.started)}, already there {len(self.already_existed)}, "
                f"done in store {len(self.skipped_done)}, held by the cap {len(self.waiting)}, "
                f"failed {len(self.failed)}")
        if self.retried:
            text += f" ({len(self.retried)} retried)"
        if self.lost:
            text += f", lost {len(self.lost)}"
        if self.stuck or self.stalled:
            reasons = Counter(reason for reason, _, _ in (*self.stuck.values(), *self.stalled.values()))
            text += "; stuck: " + ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
        return text + (f"; analysis job {self.analysis}" if self.analysis else "")

    @property
    def settled(self) -> bool:
        """Nothing more to wait for: every cell finished, and the analysis Job finished or is held."""
        return self.finished and (self.analysis in ("succeeded", "failed") or self.analysis.startswith("held"))


def backend_of(grid: Grid) -> Backend:
    """The backend the grid's cells run as."""
    return backends.get(grid.backend)


class _Warnings:
    """The namespace's create failures, listed at most once per pass and only when a cell has no pod."""

    def __init__(self, cluster: Cluster, backend: Backend):
        self.cluster, self.backend = cluster, backend
        self._failures: dict[str, tuple[str, str]] | None = None

    def stall(self, obj: dict, pods: list[dict]) -> tuple[str, str, str] | None:
        if pods:
            return None
        if self._failures is None:
            self._failures = create_failures(self.cluster.warnings(self.backend.event_kind))
        return cell_stall(self.backend, obj, pods, self._failures)


def submit_once(grid: Grid, cluster: Cluster, store: Store | None, *, max_active: int = 0, dry_run: bool = False,
                analysis: bool = True, retry_failed: bool = False, book: MarkerBook | None = None,
                seen: dict[str, float] | None = None, clock: Callable[[], float] = time.time,
                lost_grace: float = LOST_GRACE_SECONDS) -> SubmitReport:
    """One pass: create every missing cell (suspended), resume within the cap, remember failures, and
    create the analysis Job once every cell is done. ``seen``: when each cell was first seen succeeded on
    the cluster without its ``_SUCCESS`` (kept across the passes of one submit); ``lost_grace``: how long
    after that a cell is called lost."""
    report = SubmitReport()
    book = book or MarkerBook(store, grid.sweep)
    backend = backend_of(grid)
    if not backend.per_cell:
        return _submit_indexed_once(grid, cluster, book, max_active=max_active, dry_run=dry_run, analysis=analysis,
                                    retry_failed=retry_failed, seen=seen, clock=clock, lost_grace=lost_grace)
    now = clock()
    warnings = _Warnings(cluster, backend)
    marks = book.read()
    kind = backend.kind
    selector = k8s.cell_selector(grid.sweep)
    objects = {o["metadata"]["name"]: o for o in cluster.list(kind, selector)}
    pods = pods_by_cell(cluster.list("Pod", selector)) if objects else {}
    states = {name: backend.state(o) for name, o in objects.items()}
    kueue = bool(grid.queue)  # Kueue admits (resumes) queued cells; submit resumes nothing itself
    active = sum(1 for s in states.values() if s not in ("succeeded", "failed", "suspended", "deleting"))
    suspended: list[tuple[str, str]] = []
    for cell in grid.cells():
        name = k8s.object_name(grid.sweep, cell.id)
        state = states.get(name)
        if cell.id in marks.done:
            report.skipped_done.append(cell.id)
            continue
        if state == "failed" or (state is None and cell.id in marks.failed):
            if not retry_failed:
                if cell.id not in marks.failed and not dry_run:
                    book.record_failure(cell.id, kind=kind, name=name, reason=backend.failure(objects[name]),
                                        by="submit")
                report.failed[cell.id] = (backend.failure(objects[name]) if state
                                          else marks.failed[cell.id].get("reason", ""))
                continue
            report.retried.append(cell.id)
            if not dry_run:
                if state:
                    cluster.delete(kind, name)
                if cell.id in marks.failed:
                    book.forget_failure(cell.id)
            state = None
        if state == "succeeded":  # no _SUCCESS yet: its last upload is on the way, or lost
            if cell.id in marks.damaged:
                report.damaged.append(cell.id)
            elif upload_age(backend, objects[name], cell.id, now, seen) >= lost_grace:
                report.lost[cell.id] = lost_why(grid)
                continue
            else:
                report.uploading.append(cell.id)
        if state == "suspended":
            suspended.append((cell.id, name))
            continue
        if state is not None:
            report.already_existed.append(cell.id)
            if state not in ("succeeded", "deleting"):
                cell_pods = pods.get(cell.id, [])
                if problem := cell_problem(cell_pods):
                    report.stuck[cell.id] = problem
                elif stall := warnings.stall(objects[name], cell_pods):
                    report.stalled[cell.id] = stall
            continue
        start = not kueue and (not max_active or active < max_active)
        if dry_run or cluster.create(backend.set_suspend(render_cell(grid, cell), not start)):
            report.created.append(cell.id)
            (report.started if start else report.waiting).append(cell.id)
            active += start
        else:
            report.already_existed.append(cell.id)
    for cell_id, name in suspended:
        if kueue or (max_active and active >= max_active):
            report.waiting.append(cell_id)
            continue
        if dry_run or cluster.set_suspended(kind, name, False):
            report.started.append(cell_id)
            active += 1
    report.finished = _finished(grid, marks, report)
    if analysis:
        report.analysis = _ensure_analysis(grid, cluster, dry_run, report)
    return report


def _submit_indexed_once(grid: Grid, cluster: Cluster, book: MarkerBook, *, max_active: int, dry_run: bool,
                         analysis: bool, retry_failed: bool, seen: dict[str, float] | None,
                         clock: Callable[[], float], lost_grace: float) -> SubmitReport:
    """Backend indexed: one Indexed Job per resource class, created once; every cell read from the Jobs'
    completed and failed indexes (indexed.py).

    The cap is the Jobs' parallelism, kept by the Job controller; with a Kueue queue a Job is created
    suspended and Kueue admits it as one Workload. A class whose Job is gone (its TTL) is created again
    only while some of its cells are neither done nor remembered failed; its failed cells then run again
    too, since an Indexed Job runs every index. ``retry_failed`` deletes a Job with failed indexes, and
    their markers, and creates it anew (its finished cells end at once: their ``_SUCCESS`` exists).
    ``report.created`` holds the resource classes whose Job was created.
    """
    report = SubmitReport()
    backend = backends.INDEXED
    marks = book.read()
    selector = k8s.cell_selector(grid.sweep)
    jobs = {o["metadata"]["name"]: o for o in cluster.list(backend.kind, selector)}
    views, pods = index_views(grid, list(jobs.values()), cluster.list("Pod", selector) if jobs else [])
    classes = grid.resource_classes()
    for doc in render_indexed(grid, parallelism=max_active):
        name, class_name = doc.obj["metadata"]["name"], doc.obj["metadata"]["labels"][k8s.LABEL_RESOURCE_CLASS]
        ids = [c.id for c in classes[class_name][1]]
        failed = [c for c in ids if c in marks.failed
                  or backend.state(views.get(k8s.object_name(grid.sweep, c), {})) == "failed"]
        if name in jobs and retry_failed and failed:
            report.retried.extend(failed)
            if not dry_run:
                cluster.delete(backend.kind, name)
                for cell_id in failed:
                    if cell_id in marks.failed:
                        book.forget_failure(cell_id)
            for cell_id in failed:
                marks.failed.pop(cell_id, None)
                views.pop(k8s.object_name(grid.sweep, cell_id), None)
            jobs.pop(name)
        if name not in jobs and any(c not in marks.done and c not in marks.failed for c in ids):
            if dry_run or cluster.create(backend.set_suspend(doc.obj, bool(grid.queue))):
                report.created.append(class_name)
    now = clock()
    warnings = _Warnings(cluster, backend)
    for cell in grid.cells():
        name = k8s.object_name(grid.sweep, cell.id)
        view = views.get(name)
        state = backend.state(view) if view else None
        if cell.id in marks.done:
            report.skipped_done.append(cell.id)
        elif state == "failed" or (state is None and cell.id in marks.failed):
            if cell.id not in marks.failed and not dry_run:
                book.record_failure(cell.id, kind=backend.kind, name=name, reason=backend.failure(view), by="submit")
            report.failed[cell.id] = backend.failure(view) if state else marks.failed[cell.id].get("reason", "")
        elif state == "succeeded":
            if cell.id in marks.damaged:
                report.damaged.append(cell.id)
            elif upload_age(backend, view, cell.id, now, seen) >= lost_grace:
                report.lost[cell.id] = lost_why(grid)
            else:
                report.uploading.append(cell.id)
        elif state == "suspended":
            report.waiting.append(cell.id)
        elif state is not None:
            report.already_existed.append(cell.id)
            if problem := cell_problem(pods.get(cell.id, [])):
                report.stuck[cell.id] = problem
            elif stall := warnings.stall(view, pods.get(cell.id, [])):
                report.stalled[cell.id] = stall
    report.finished = _finished(grid, marks, report)
    if analysis:
        report.analysis = _ensure_analysis(grid, cluster, dry_run, report)
    return report


def _finished(grid: Grid, marks, report: SubmitReport) -> bool:
    """Every cell done, failed, lost, or succeeded with a damaged ``_SUCCESS`` (which status shows)."""
    ended = set(marks.done) | set(report.failed) | set(report.lost) | set(report.damaged)
    return all(c in ended for c in grid.cell_ids())


def _ensure_analysis(grid: Grid, cluster: Cluster, dry_run: bool, report: SubmitReport) -> str:
    """The analysis Job's state; created (it runs at once) when every cell is done and none failed."""
    selector = f"{k8s.LABEL_SWEEP}={grid.sweep},{k8s.LABEL_COMPONENT}={k8s.COMPONENT_ANALYSIS}"
    found = cluster.list(backends.JOB.kind, selector)
    if found:
        return backends.JOB.state(found[0])
    if not report.finished:
        return ""
    if report.failed:
        return f"held: {len(report.failed)} cells failed (--retry-failed, or delete them from the grid)"
    if report.lost:
        return f"held: {len(report.lost)} cells lost (succeeded on the cluster, nothing in the store)"
    if not dry_run:
        cluster.create(render_analysis_job(grid))
    return "created"


def submit(grid: Grid, cluster: Cluster, store: Store | None, *, max_active: int = 0, wait: bool = False,
           poll_seconds: float = 30.0, timeout: float = 0.0, dry_run: bool = False, retry_failed: bool = False,
           lost_grace: float = LOST_GRACE_SECONDS, log: Callable[[str], None] = lambda s: None,
           sleep: Callable[[float], None] = time.sleep) -> SubmitReport:
    """``submit_once``, repeated every ``poll_seconds`` with ``wait`` until every cell has finished and the
    analysis Job it then creates has finished too (the report is in the store), or is held by failed cells.

    With ``wait``, a pass that the cluster or the store fails (past the retries of each call) is logged
    and the next poll tries again; ``--retry-failed`` applies to the first pass only (a cell that fails
    again is reported, not retried forever)."""
    started = time.monotonic()
    book = MarkerBook(store, grid.sweep)
    seen: dict[str, float] = {}
    report = SubmitReport()
    while True:
        try:
            report = submit_once(grid, cluster, store, max_active=max_active, dry_run=dry_run, book=book,
                                 retry_failed=retry_failed, seen=seen, lost_grace=lost_grace)
        except (ClusterUnavailable, StoreUnavailable) as err:
            if not wait or dry_run:
                raise
            log(f"this poll failed ({err}); trying again in {poll_seconds:g} s")
        else:
            retry_failed = False
            log(report.summary())
            if not wait or dry_run or report.settled:
                return report
        if timeout and time.monotonic() - started + poll_seconds > timeout:
            what = "the analysis Job still unfinished" if report.finished else "cells still unfinished"
            raise TimeoutError(f"{what} after {timeout:g} s: {report.summary()}")
        sleep(poll_seconds)


# ---- checks before the first pass ------------------------------------------------------------------------


def check_image(grid: Grid) -> None:
    if grid.image == k8s.DEFAULT_IMAGE:
        raise ConfigError(f"image: {grid.image!r} is the placeholder default, which no registry serves (every pod "
                          "would wait in ImagePullBackOff); build and push the image (images/build.sh), then pass "
                          "--image REGISTRY/critbatch:TAG or set image: in the grid")


def check_cluster(grid: Grid, cluster: Cluster, log: Callable[[str], None]) -> None:
    """What the pods need before any is created: the namespace, their ServiceAccount and the store Secret.

    Without the ServiceAccount the Job controller cannot create a single pod (``FailedCreate: ... error
    looking up service account``, an event on the Job), and the sweep would wait forever. What this client
    may not read (403) is logged and not checked."""
    from kubernetes.client.exceptions import ApiException

    kit = grid.namespace == k8s.DEFAULT_NAMESPACE
    checks = [
        ("Namespace", grid.namespace, "namespace",
         f"no namespace {grid.namespace!r} on the cluster; create it: " + (
             "kubectl apply -f k8s/namespace.yaml, then kubectl apply -k k8s/ (its ServiceAccount and store)" if kit
             else f"kubectl create namespace {grid.namespace}, then its ServiceAccount {grid.service_account!r} "
                  "and the store Secret")),
        ("ServiceAccount", grid.service_account, "service_account",
         f"no ServiceAccount {grid.service_account!r} in namespace {grid.namespace}: the Job controller could "
         "create no pod (FailedCreate) and every cell would wait forever; create it: " + (
             "kubectl apply -k k8s/" if kit and grid.service_account == k8s.DEFAULT_SERVICE_ACCOUNT
             else f"kubectl -n {grid.namespace} create serviceaccount {grid.service_account}")),
    ]
    for kind, name, field_name, problem in checks:
        try:
            if not cluster.found(kind, name):
                raise ConfigError(f"{field_name}: {problem}")
        except ApiException as err:
            log(f"cannot read {kind} {name} ({describe(err)}): not checked")
    check_secret(grid, cluster, log)


def check_secret(grid: Grid, cluster: Cluster, log: Callable[[str], None]) -> None:
    """The store Secret exists with both keys; else a pod would wait in CreateContainerConfigError."""
    from kubernetes.client.exceptions import ApiException

    if not grid.store_secret:
        return  # workload identity: the pods' service account brings the credentials
    try:
        keys = cluster.secret_keys(grid.store_secret)
    except ApiException as err:
        log(f"cannot read Secret {grid.store_secret} ({describe(err)}): not checked")
        return
    if keys is None:
        raise ConfigError(f"store_secret: no Secret {grid.store_secret!r} in namespace {grid.namespace}: every pod "
                          "would wait in CreateContainerConfigError; create it (k8s/store-secret.example.yaml, or "
                          f"kubectl -n {grid.namespace} create secret generic {grid.store_secret} "
                          "--from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...)")
    missing = [k for k in SECRET_KEYS if k not in keys]
    if missing:
        raise ConfigError(f"store_secret: Secret {grid.store_secret!r} in namespace {grid.namespace} lacks "
                          f"{', '.join(missing)} (it has: {', '.join(sorted(keys)) or 'no keys'})")


def store_for(grid: Grid) -> Store:
    store = open_store(grid.store, retries=2)
    store.check()
    return store


def cli_submit(args: argparse.Namespace) -> int:
    grid = grid_for_command(args, cluster_store=True)
    check_image(grid)
    if args.max_active < 0:
        raise ConfigError(f"--max-active: must be >= 0 (0 = no cap), got {args.max_active}")
    if args.poll_seconds <= 0:
        raise ConfigError(f"--poll-seconds: must be > 0, got {args.poll_seconds:g}")
    grace = grace_seconds(args.lost_grace)
    max_active = args.max_active or grid.max_active
    store = store_for(grid)

    def log(line: str) -> None:
        print(f"{grid.sweep}: {line}", file=sys.stderr)

    try:
        cluster = Cluster(api_client(), grid.namespace)
        check_cluster(grid, cluster, log)
        if not args.dry_run:
            key = f"{grid.sweep}/sweep.yaml"
            text = grid.sweep_yaml()
            if not store.exists(key) or store.get_text(key) != text:
                store.put_text(key, text)
        report = submit(grid, cluster, store, max_active=max_active, wait=args.wait, poll_seconds=args.poll_seconds,
                        timeout=args.timeout, dry_run=args.dry_run, retry_failed=args.retry_failed,
                        lost_grace=grace, log=log)
    except ClusterUnavailable as err:
        print(f"critbatch submit: error: {err}; nothing more was done, run it again later", file=sys.stderr)
        return 1
    except TimeoutError as err:
        print(f"critbatch submit: {err}", file=sys.stderr)
        return 1
    verb = "would create" if args.dry_run else "created"
    for cell_id in report.created:  # a resource class, backend indexed
        print(f"{verb} {k8s.object_name(grid.sweep, cell_id)}")
    for cell_id, (reason, message, pod) in sorted(report.stuck.items()):
        log(f"stuck: {k8s.object_name(grid.sweep, cell_id)}: pod {pod}: {reason}: {message}")
    for cell_id, (reason, message, obj) in sorted(report.stalled.items()):
        log(f"stuck: {k8s.object_name(grid.sweep, cell_id)}: {obj} creates no pod: {reason}: {message}")
    for cell_id, reason in sorted(report.failed.items()):
        log(f"failed: {k8s.object_name(grid.sweep, cell_id)}: {reason}")
    for cell_id, why in sorted(report.lost.items()):
        log(f"lost: {k8s.object_name(grid.sweep, cell_id)}: {why}")
    if report.analysis == "failed":
        log(f"failed: the analysis Job {k8s.object_name(grid.sweep, k8s.ANALYSIS_SUFFIX)}: "
            f"kubectl -n {grid.namespace} logs job/{k8s.object_name(grid.sweep, k8s.ANALYSIS_SUFFIX)}")
    return 1 if ((report.failed or report.lost) and report.finished) or report.analysis == "failed" else 0
