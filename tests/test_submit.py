"""`submit` and `status` against the real `kubernetes` client, its HTTP calls answered on loopback.

The API server is tests/fakeapi.py's (its fixtures ``api_server`` and ``cluster`` in conftest.py): the
REST endpoints submit and status use, with the API server's status codes, selectors and the faults a real
one gives under load. Everything above the HTTP layer is the real client: request building,
serialisation, ApiException on errors, urllib3's connection handling. The store is the real loopback S3
server or a local directory. What a controller would do (a Job completing, failing, its pods stuck) the
tests write into the objects.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import pytest
import yaml

from critbatch.jobs import cli
from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.cell.layout import cell_prefix, failed_key, success_key
from critbatch.jobs.store import open_store
from critbatch.jobs.store.local import LocalStore
from critbatch.jobs.backends import k8s
from critbatch.jobs.cluster import client as api, status, submit
from critbatch.jobs.sweep.grid import load_grid
from critbatch.jobs.cluster.markers import MarkerBook
from fakeapi import EVENTS, JOBS, NAMESPACES, SECRETS

SPEC = {
    "sweep": "sub",
    "description": "submit test",
    "dataset": {"name": "digits"},
    "model": "digits_cnn",
    "strategy": ["blr", "lsr"],
    "base_lr": 0.1,
    "base_batch": 16,
    "epochs": 1,
    "batch_size": [16, 32, 64],
    "resources": {"gpus": 0, "cpu": 1, "memory": "1Gi", "shm": "64Mi"},
    "store": "s3://critbatch/runs",
    "image": "registry.example/critbatch:1.0",
}


def grid(**changes):
    return load_grid({**SPEC, **changes})


def cell_jobs(api_server):
    return {n: o for n, o in api_server.jobs().items() if o["metadata"]["labels"][k8s.LABEL_COMPONENT] == "cell"}


def by_cell(objects):
    return {o["metadata"]["labels"][k8s.LABEL_CELL]: o for o in objects.values()}


def mark(obj, state, reason=""):
    """Give an object the status its controller would."""
    if state == "running":
        obj["status"] = {"active": 1}
    elif state in ("Complete", "Failed"):
        obj["status"] = {"conditions": [{"type": state, "status": "True", "reason": reason,
                                         "message": f"the controller's words for {reason}"}]}


def finish_in_store(store, g, cell_id, status="done"):
    """A finished cell as the trainer leaves it: its cell.json, then a _SUCCESS summary with its status and
    step count."""
    (cell,) = [c for c in g.cells() if c.id == cell_id]
    store.put_text(f"{cell_prefix(g.sweep, cell_id)}/cell.json", cell.to_json())
    store.put_text(success_key(g.sweep, cell_id), json.dumps({"status": status, "steps": 10}))


def kubeconfig(tmp_path, monkeypatch, api_server):
    path = tmp_path / "config"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api_server.host}}],
        "users": [{"name": "u", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(path))


# ---- submit: creating, capping, resuming -----------------------------------------------------------------


def test_submit_creates_every_cell_running_and_no_analysis_job_yet(api_server, cluster, store):
    g = grid()
    report = submit.submit_once(g, cluster, store)
    assert sorted(report.created) == sorted(report.started) == sorted(g.cell_ids())
    jobs = cell_jobs(api_server)
    assert len(jobs) == 6 and {o["spec"]["suspend"] for o in jobs.values()} == {False}
    assert "critbatch-sub-analysis" not in api_server.jobs() and report.analysis == ""
    # Nothing rendered for kubectl carries the flag: a re-applied stream never suspends or resumes a cell.
    assert "suspend" not in submit.render_cell(g, g.cells()[0])["spec"]


def test_submit_is_idempotent(api_server, cluster, store):
    g = grid()
    submit.submit_once(g, cluster, store)
    creates = len(api_server.creates())
    report = submit.submit_once(g, cluster, store)
    assert report.created == [] and len(report.already_existed) == 6
    assert len(api_server.creates()) == creates  # the second pass lists, finds everything, creates nothing


def test_already_exists_counts_as_done(api_server, cluster, store):
    g = grid()
    racing = k8s.object_name("sub", g.cell_ids()[2])
    api_server.conflict_on_create.add(racing)  # created by someone else between our list and our create
    report = submit.submit_once(g, cluster, store)
    assert g.cell_ids()[2] in report.already_existed
    assert len(report.created) == 5


def test_a_refusal_is_one_config_error_and_not_retried(api_server, cluster, store, sleeps):
    api_server.faults.append(("POST", JOBS, 403, {}))
    with pytest.raises(ConfigError, match="create Job critbatch-sub-.* in namespace critbatch: 403 Forbidden"):
        submit.submit_once(grid(), cluster, store)
    assert len(api_server.creates()) == 1 and sleeps == []


def test_cells_finished_in_the_store_are_skipped(api_server, cluster, store):
    g = grid()
    finish_in_store(store, g, g.cell_ids()[0])
    finish_in_store(store, g, g.cell_ids()[1], "diverged")
    report = submit.submit_once(g, cluster, store)
    assert sorted(report.skipped_done) == sorted(g.cell_ids()[:2])
    names = set(cell_jobs(api_server))
    assert k8s.object_name("sub", g.cell_ids()[0]) not in names and len(names) == 4


def test_cap_creates_the_rest_suspended_and_resumes_as_cells_finish(api_server, cluster, store):
    g = grid()
    report = submit.submit_once(g, cluster, store, max_active=2)
    assert len(report.created) == 6 and len(report.started) == 2 and len(report.waiting) == 4
    jobs = by_cell(cell_jobs(api_server))
    assert sorted(c for c, o in jobs.items() if not o["spec"]["suspend"]) == sorted(report.started)
    # Nothing finished: a second pass creates and resumes nothing.
    report = submit.submit_once(g, cluster, store, max_active=2)
    assert report.created == [] and report.started == [] and len(report.waiting) == 4
    # One cell completes (its marker is in the store), one is still running: one slot frees up, and the
    # first suspended cell in the grid's order is resumed by a merge patch.
    first, second = report.already_existed
    mark(jobs[first], "Complete")
    finish_in_store(store, g, first)
    mark(jobs[second], "running")
    report = submit.submit_once(g, cluster, store, max_active=2)
    resumed = [c for c in g.cell_ids() if c not in (first, second)][0]
    assert report.started == [resumed] and len(report.waiting) == 3
    assert jobs[resumed]["spec"]["suspend"] is False
    assert ("PATCH", f"{JOBS}/{k8s.object_name('sub', resumed)}") in api_server.requests
    # Jobs of another sweep do not count against this one's cap.
    report = submit.submit_once(grid(sweep="other"), cluster, store, max_active=2)
    assert len(report.started) == 2


def test_with_a_kueue_queue_every_cell_waits_for_admission(api_server, cluster, store):
    g = grid(queue="team-a")
    report = submit.submit_once(g, cluster, store, max_active=2)
    assert len(report.created) == 6 and report.started == [] and len(report.waiting) == 6
    jobs = cell_jobs(api_server).values()
    assert {o["spec"]["suspend"] for o in jobs} == {True}
    assert {o["metadata"]["labels"][k8s.LABEL_QUEUE] for o in jobs} == {"team-a"}
    submit.submit_once(g, cluster, store, max_active=2)
    assert not [r for r in api_server.requests if r[0] == "PATCH"]  # resuming is Kueue's admission


def test_store_markers_are_read_with_one_list_per_pass(api_server, cluster, tmp_path):
    calls = []

    class Counting(LocalStore):
        def list(self, prefix):
            calls.append(("list", prefix))
            return super().list(prefix)

        def exists(self, key):
            calls.append(("exists", key))
            return super().exists(key)

    store = Counting(tmp_path)
    g = grid()
    finish_in_store(store, g, g.cell_ids()[0])
    book = MarkerBook(store, g.sweep)
    for _ in range(3):
        submit.submit_once(g, cluster, store, book=book)
    assert calls == [("list", "sub/cells/")] * 3


# ---- failed cells --------------------------------------------------------------------------------------------


def test_a_failed_cell_is_remembered_in_the_store_and_not_recreated(api_server, cluster, store):
    g = grid()
    submit.submit_once(g, cluster, store)
    jobs = by_cell(cell_jobs(api_server))
    bad = g.cell_ids()[3]
    mark(jobs[bad], "Failed", "PodFailurePolicy")
    report = submit.submit_once(g, cluster, store)
    assert report.failed == {bad: "PodFailurePolicy: the controller's words for PodFailurePolicy"}
    marker = json.loads(store.get_text(failed_key("sub", bad)))
    assert marker["reason"] == report.failed[bad] and marker["by"] == "submit" and marker["kind"] == "Job"
    # The Job's TTL deletes it: the next pass reports the cell failed from the store and creates nothing.
    del api_server.jobs()[k8s.object_name("sub", bad)]
    creates = len(api_server.creates())
    report = submit.submit_once(g, cluster, store)
    assert report.failed == {bad: marker["reason"]} and len(api_server.creates()) == creates
    # Every other cell finishes: the sweep is finished, and the analysis held back, saying why.
    for cell_id, obj in jobs.items():
        if cell_id != bad:
            mark(obj, "Complete")
            finish_in_store(store, g, cell_id)
    report = submit.submit_once(g, cluster, store)
    assert report.finished and report.analysis.startswith("held: 1 cells failed")
    assert "critbatch-sub-analysis" not in api_server.jobs()


def test_retry_failed_deletes_the_object_and_the_marker_and_creates_the_cell_anew(api_server, cluster, store):
    g = grid()
    submit.submit_once(g, cluster, store)
    jobs = by_cell(cell_jobs(api_server))
    bad, gone = g.cell_ids()[1], g.cell_ids()[4]
    mark(jobs[bad], "Failed", "BackoffLimitExceeded")
    mark(jobs[gone], "Failed", "DeadlineExceeded")
    submit.submit_once(g, cluster, store)
    del api_server.jobs()[k8s.object_name("sub", gone)]  # deleted by its TTL; only the marker is left
    report = submit.submit_once(g, cluster, store, retry_failed=True)
    assert sorted(report.retried) == sorted([bad, gone]) and sorted(report.created) == sorted([bad, gone])
    assert ("DELETE", f"{JOBS}/{k8s.object_name('sub', bad)}") in api_server.requests
    assert not store.exists(failed_key("sub", bad)) and not store.exists(failed_key("sub", gone))
    fresh = by_cell(cell_jobs(api_server))
    assert "status" not in fresh[bad] and "status" not in fresh[gone]


# ---- the --wait loop ------------------------------------------------------------------------------------------


def complete_everything(api_server, store, g):
    for obj in cell_jobs(api_server).values():
        mark(obj, "Complete")
        finish_in_store(store, g, obj["metadata"]["labels"][k8s.LABEL_CELL])


def complete_analysis(api_server):
    """The analysis Job, once created, as its controller leaves it after the report is written."""
    for obj in api_server.jobs().values():
        if obj["metadata"]["labels"][k8s.LABEL_COMPONENT] == k8s.COMPONENT_ANALYSIS:
            mark(obj, "Complete")


def test_wait_keeps_submitting_then_creates_the_analysis(api_server, cluster, store):
    g = grid()
    polls = []

    def sleep(seconds):
        # Between polls the cluster runs what was resumed: each running cell finishes and writes _SUCCESS;
        # once created, the analysis Job runs and completes by the next poll.
        polls.append(seconds)
        for obj in cell_jobs(api_server).values():
            if not obj["spec"]["suspend"]:
                mark(obj, "Complete")
                finish_in_store(store, g, obj["metadata"]["labels"][k8s.LABEL_CELL])
        if "critbatch-sub-analysis" in api_server.jobs():
            created.append(dict(api_server.jobs()["critbatch-sub-analysis"]["spec"]))
            mark(api_server.jobs()["critbatch-sub-analysis"], "Complete")

    created = []
    report = submit.submit(g, cluster, store, max_active=4, wait=True, poll_seconds=0.5, sleep=sleep)
    # Two polls until every cell is done (the analysis Job created), one more until the analysis completes.
    assert report.finished and polls == [0.5, 0.5, 0.5]
    assert len(created) == 1 and "suspend" not in created[0]
    assert report.analysis == "succeeded" and report.settled


def test_wait_ends_non_zero_when_the_analysis_fails(api_server, cluster, store):
    g = grid()
    for cell_id in g.cell_ids():
        finish_in_store(store, g, cell_id)

    def sleep(seconds):
        mark(api_server.jobs()["critbatch-sub-analysis"], "Failed", "BackoffLimitExceeded")

    report = submit.submit(g, cluster, store, wait=True, poll_seconds=0.5, sleep=sleep)
    assert report.analysis == "failed" and report.settled


def test_wait_times_out(api_server, cluster, store):
    with pytest.raises(TimeoutError, match="still unfinished"):
        submit.submit(grid(), cluster, store, wait=True, poll_seconds=1.0, timeout=1.5, sleep=lambda s: None)


# ---- transient API errors ----------------------------------------------------------------------------------


def test_429_waits_at_least_what_retry_after_asks(api_server, cluster, store, sleeps):
    api_server.faults.append(("POST", JOBS, 429, {"Retry-After": "3"}))
    report = submit.submit_once(grid(), cluster, store)
    assert len(report.created) == 6
    assert len(sleeps) == 1 and 3 <= sleeps[0] <= 4  # Retry-After plus at most a second of jitter
    assert len(api_server.creates()) == 7  # the throttled create, sent again


def test_retry_after_as_an_http_date_and_capped():
    from kubernetes.client.exceptions import ApiException

    err = ApiException(status=429)
    err.headers = {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}  # in the past: no wait
    assert api.retry_after(err) == 0.0
    err.headers = {"Retry-After": "86400"}
    state = type("State", (), {"outcome": type("O", (), {"exception": lambda self: err})()})()
    assert api.MAX_RETRY_AFTER <= api.wait_retry_after(None)(state) <= api.MAX_RETRY_AFTER + 1


def test_500s_back_off_exponentially_then_succeed(api_server, cluster, store, sleeps):
    api_server.faults += [("GET", JOBS, 500, {}), ("GET", JOBS, 503, {}), ("GET", JOBS, 502, {})]
    report = submit.submit_once(grid(), cluster, store)
    assert len(report.created) == 6
    assert len(sleeps) == 3 and all(0 <= s <= 2 ** i for i, s in enumerate(sleeps))  # jittered: below 1, 2, 4 s
    assert [r for r in api_server.requests if r == ("GET", JOBS)][:4] == [("GET", JOBS)] * 4


def test_an_outage_past_the_retries_is_cluster_unavailable(api_server, cluster, store, sleeps):
    api_server.faults += [("GET", JOBS, 503, {})] * cluster.attempts
    with pytest.raises(api.ClusterUnavailable, match=fr"list Jobs: 503 Service Unavailable \(after {cluster.attempts} tries\)"):
        submit.submit_once(grid(), cluster, store)
    assert len(sleeps) == cluster.attempts - 1 and api_server.creates() == []


def test_wait_survives_the_api_server_going_away(api_server, cluster, store):
    g = grid()
    lines, polls = [], []

    def sleep(seconds):
        polls.append(seconds)
        if len(polls) == 1:
            api_server.stop()  # connections refused through the whole next pass
        elif len(polls) == 2:
            api_server.start()
            complete_everything(api_server, store, g)
        else:
            complete_analysis(api_server)

    report = submit.submit(g, cluster, store, wait=True, poll_seconds=5, sleep=sleep, log=lines.append)
    assert report.finished and report.analysis == "succeeded" and polls == [5, 5, 5]
    assert lines[0].startswith("created 6, started 6")
    assert lines[1].startswith("this poll failed (kubernetes: list Jobs: MaxRetryError") and "trying again in 5 s" in lines[1]
    assert lines[2].startswith("created 0") and lines[2].endswith("analysis job created")
    assert lines[3].endswith("analysis job succeeded")


def test_a_store_outage_mid_wait_is_one_line_too(api_server, cluster, tmp_path):
    from critbatch.jobs.cell.errors import StoreUnavailable

    class Flaky(LocalStore):
        down = False

        def list(self, prefix):
            if self.down:
                raise StoreUnavailable("s3 unreachable")
            return super().list(prefix)

    store, g, lines = Flaky(tmp_path), grid(), []

    def sleep(seconds):
        store.down = not store.down
        if not store.down:
            complete_everything(api_server, store, g)
            complete_analysis(api_server)

    report = submit.submit(g, cluster, store, wait=True, poll_seconds=1, sleep=sleep, log=lines.append)
    assert report.finished and lines[1] == "this poll failed (s3 unreachable); trying again in 1 s"


# ---- stuck pods --------------------------------------------------------------------------------------------------


STUCK = [
    ("ImagePullBackOff", 'Back-off pulling image "registry.example/critbatch:1.0"', None),
    ("CreateContainerConfigError", 'secret "critbatch-store" not found', None),
    ("Unschedulable", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.", "unschedulable"),
]


def test_stuck_pods_are_reported_per_cell_by_submit_and_status(api_server, cluster, store):
    g = grid()
    submit.submit_once(g, cluster, store)
    ids = g.cell_ids()
    for i, (reason, message, how) in enumerate(STUCK):
        if how:
            api_server.add_pod(ids[i], f"pod-{i}", unschedulable=message)
        else:
            api_server.add_pod(ids[i], f"pod-{i}", waiting=(reason, message))
        mark(by_cell(cell_jobs(api_server))[ids[i]], "running")  # a Job counts a pending pod as active
    api_server.add_pod(ids[3], "pod-3", waiting=("ContainerCreating", ""))  # on its normal way: not stuck
    api_server.add_pod(ids[4], "pod-4a", waiting=("ImagePullBackOff", "old"))  # an earlier pod, now replaced
    api_server.add_pod(ids[4], "pod-4b", phase="Running")
    for i in (3, 4):
        mark(by_cell(cell_jobs(api_server))[ids[i]], "running")
    report = submit.submit_once(g, cluster, store)
    assert report.stuck == {ids[i]: (reason, message, f"pod-{i}") for i, (reason, message, _) in enumerate(STUCK)}
    assert "stuck: 1 CreateContainerConfigError, 1 ImagePullBackOff, 1 Unschedulable" in report.summary()
    objects = {o["metadata"]["name"]: o for o in cluster.list("Job", k8s.cell_selector("sub"))}
    pods = api.pods_by_cell(cluster.list("Pod", k8s.cell_selector("sub")))
    rows = {r["cell"]: r for r in status.cell_states(g, MarkerBook(store, "sub").read(), objects, pods)}
    for i, (reason, message, _) in enumerate(STUCK):
        assert rows[ids[i]]["state"] == "pending" and rows[ids[i]]["why"] == f"{reason}: {message}"
    assert rows[ids[4]]["state"] == "running" and rows[ids[3]]["why"] == "-"


# ---- objects whose controller creates no pod ----------------------------------------------------------------------


def no_account(pod_prefix):
    """The Job controller's words when the pods' ServiceAccount is missing (an event on the Job; no pod exists)."""
    return (f'pods "{pod_prefix}-" is forbidden: error looking up service account critbatch/critbatch: '
            'serviceaccount "critbatch" not found')


def test_a_job_that_creates_no_pod_is_named_with_its_event(api_server, cluster, store):
    g = grid()
    report = submit.submit_once(g, cluster, store, max_active=2)
    started = sorted(report.started)
    names = {c: k8s.object_name("sub", c) for c in started}
    for cell_id, name in names.items():
        api_server.add_event("Job", name, "FailedCreate", "an older refusal", when="2026-12-01T09:00:00Z")
        api_server.add_event("Job", name, "FailedCreate", no_account(name))
        api_server.add_event("Job", name, "SuccessfulCreate", "Created pod: x", type_="Normal",
                             when="2026-12-01T11:00:00Z")  # not a Warning: not read
    api_server.add_event("Job", "critbatch-other-0123456789", "FailedCreate", "another sweep's Job")
    before = len(api_server.requests)
    report = submit.submit_once(g, cluster, store, max_active=2)
    assert report.stalled == {c: ("FailedCreate", no_account(names[c]), f"Job {names[c]}") for c in started}
    assert report.stuck == {} and "; stuck: 2 FailedCreate" in report.summary() and not report.finished
    # One LIST of the namespace's Warning events about Jobs for the whole pass, never one call per Job.
    lists = [r for r in api_server.requests[before:] if r[1].startswith(EVENTS)]
    assert lists == [("GET", EVENTS)]
    objects = {o["metadata"]["name"]: o for o in cluster.list("Job", k8s.cell_selector("sub"))}
    failures = api.create_failures(cluster.warnings("Job"))
    rows = {r["cell"]: r for r in status.cell_states(g, MarkerBook(store, "sub").read(), objects, {}, failures)}
    for cell_id in started:
        assert (rows[cell_id]["state"], rows[cell_id]["why"]) == ("pending", f"FailedCreate: {no_account(names[cell_id])}")
    assert {rows[c]["why"] for c in rows if c not in started} == {"suspended: held by the cap or queued"}
    # Once the ServiceAccount is there, the Job makes its pod: the pod, not the old event, says how it goes.
    api_server.add_pod(started[0], "pod-0", phase="Running")
    mark(by_cell(cell_jobs(api_server))[started[0]], "running")
    report = submit.submit_once(g, cluster, store, max_active=2)
    assert list(report.stalled) == [started[1]]


def test_no_event_list_while_every_cell_has_a_pod(api_server, cluster, store):
    g = grid(batch_size=[16])
    report = submit.submit_once(g, cluster, store)
    for i, cell_id in enumerate(report.started):
        api_server.add_pod(cell_id, f"pod-{i}", phase="Running")
        mark(by_cell(cell_jobs(api_server))[cell_id], "running")
    submit.submit_once(g, cluster, store)
    assert not [r for r in api_server.requests if r[1].startswith(EVENTS)]


def test_events_a_client_may_not_list_are_not_an_error(api_server, cluster, store):
    g = grid(batch_size=[16])
    submit.submit_once(g, cluster, store)
    api_server.faults.append(("GET", EVENTS, 403, {}))  # RBAC without list on events
    report = submit.submit_once(g, cluster, store)
    assert report.stalled == {} and len(report.already_existed) == 2


def test_a_trainjob_that_creates_no_pod_is_named_from_its_node_job(api_server, cluster, store):
    g = grid(backend="trainjob", resources={"gpus": 0, "nodes": 2, "cpu": 1, "memory": "1Gi"})
    submit.submit_once(g, cluster, store)
    cell_id = g.cell_ids()[0]
    node_job = f"{k8s.object_name('sub', cell_id)}-node-0"  # the JobSet's Job, which creates the pods
    api_server.add_event("Job", node_job, "FailedCreate", no_account(node_job))
    report = submit.submit_once(g, cluster, store)
    assert report.stalled == {cell_id: ("FailedCreate", no_account(node_job), f"Job {node_job}")}


# ---- succeeded on the cluster, nothing in the store -----------------------------------------------------------------


def ago(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds))


def test_succeeded_without_its_success_is_lost_after_the_grace(api_server, cluster, store):
    g = grid()
    submit.submit_once(g, cluster, store)
    jobs = by_cell(cell_jobs(api_server))
    lost, uploading, *rest = g.cell_ids()
    for cell_id, obj in jobs.items():
        mark(obj, "Complete")
        if cell_id in rest:
            finish_in_store(store, g, cell_id)
    jobs[lost]["status"]["completionTime"] = ago(submit.LOST_GRACE_SECONDS + 60)
    jobs[uploading]["status"]["completionTime"] = ago(5)
    report = submit.submit_once(g, cluster, store)
    assert report.lost == {lost: submit.lost_why(g)} and report.uploading == [uploading] and not report.finished
    assert report.lost[lost].startswith("succeeded on the cluster, nothing in the store: do the pods write to "
                                        "another store? (theirs: s3://critbatch/runs at http://critbatch-s3:8333")
    assert ", lost 1" in report.summary()
    objects = {o["metadata"]["name"]: o for o in cluster.list("Job", k8s.cell_selector("sub"))}
    rows = {r["cell"]: r for r in status.cell_states(g, MarkerBook(store, "sub").read(), objects, {})}
    assert (rows[lost]["cluster"], rows[lost]["state"], rows[lost]["why"]) == ("succeeded", "lost", submit.lost_why(g))
    assert (rows[uploading]["state"], rows[uploading]["why"]) == ("running", "succeeded on the cluster; its _SUCCESS "
                                                                               "on the way")
    assert status.format_table(list(rows.values())).splitlines()[-1].endswith("failed 0  lost 1  (total 6)")
    # The last upload arrives within the grace: that cell is done; the lost one holds the analysis back.
    finish_in_store(store, g, uploading)
    report = submit.submit_once(g, cluster, store)
    assert report.finished and report.analysis == "held: 1 cells lost (succeeded on the cluster, nothing in the store)"
    assert "critbatch-sub-analysis" not in api_server.jobs()


def test_without_a_completion_time_the_grace_runs_from_the_first_poll_that_saw_it(api_server, cluster, store):
    g = grid(batch_size=[16])
    submit.submit_once(g, cluster, store)
    first, second = g.cell_ids()
    for cell_id, obj in by_cell(cell_jobs(api_server)).items():
        mark(obj, "Complete")  # a condition without lastTransitionTime, no completionTime
    finish_in_store(store, g, second)
    now, seen = [1000.0], {}

    def poll():
        return submit.submit_once(g, cluster, store, seen=seen, clock=lambda: now[0])

    assert poll().uploading == [first]
    now[0] += submit.LOST_GRACE_SECONDS / 2
    assert poll().uploading == [first]
    now[0] += submit.LOST_GRACE_SECONDS / 2
    report = poll()
    assert list(report.lost) == [first] and report.finished


def submitted_one_lost(api_server, tmp_path, monkeypatch, s3_url) -> tuple[Path, str]:
    """Two cells submitted through the CLI, both Jobs succeeded ten minutes ago, one _SUCCESS in the store:
    the grid file and the other cell's id."""
    kubeconfig(tmp_path, monkeypatch, api_server)
    api_server.add_kit()
    spec = tmp_path / "g.json"
    spec.write_text(json.dumps({**SPEC, "batch_size": [16]}))
    assert cli.main(["submit", str(spec), "--store", s3_url]) == 0
    g = grid(batch_size=[16])
    lost, done = g.cell_ids()
    for obj in by_cell(cell_jobs(api_server)).values():
        mark(obj, "Complete")
        obj["status"]["completionTime"] = ago(600)
    finish_in_store(open_store(s3_url), g, done)
    return spec, lost


def test_submit_wait_ends_on_a_lost_cell_with_exit_1(api_server, tmp_path, monkeypatch, capsys, s3_url):
    spec, lost = submitted_one_lost(api_server, tmp_path, monkeypatch, s3_url)
    capsys.readouterr()
    assert cli.main(["submit", str(spec), "--store", s3_url, "--wait", "--poll-seconds", "0.01", "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert f"sub: lost: {k8s.object_name('sub', lost)}: succeeded on the cluster, nothing in the store" in err
    assert "held: 1 cells lost" in err and "critbatch-sub-analysis" not in api_server.jobs()


def test_lost_grace_sets_how_long_a_succeeded_cell_may_wait_for_its_success(api_server, tmp_path, monkeypatch,
                                                                             capsys, s3_url):
    """A Job that succeeded ten minutes ago without its _SUCCESS: lost by default, still uploading with
    --lost-grace 900 for submit and status alike; a grace that is not a positive number is refused."""
    spec, _ = submitted_one_lost(api_server, tmp_path, monkeypatch, s3_url)
    capsys.readouterr()
    assert cli.main(["submit", str(spec), "--store", s3_url]) == 1  # a lost cell: exit 1, as with --wait
    assert ", lost 1" in capsys.readouterr().err
    assert cli.main(["submit", str(spec), "--store", s3_url, "--lost-grace", "900"]) == 0
    assert "lost" not in capsys.readouterr().err
    assert cli.main(["status", str(spec), "--store", s3_url, "--lost-grace", "900"]) == 0
    assert "its _SUCCESS on the way" in capsys.readouterr().out
    assert cli.main(["status", str(spec), "--store", s3_url]) == 0
    assert "lost 1" in capsys.readouterr().out
    for command in ("submit", "status"):
        assert cli.main([command, str(spec), "--store", s3_url, "--lost-grace", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"critbatch {command}: error: --lost-grace: must be > 0 seconds, got 0"], err


# ---- checks before anything is created -----------------------------------------------------------------------------


@pytest.mark.parametrize("missing,problem,fix", [
    ("namespace", "namespace: no namespace 'critbatch' on the cluster", "kubectl apply -f k8s/namespace.yaml, then "
                                                                        "kubectl apply -k k8s/"),
    ("account", "service_account: no ServiceAccount 'critbatch' in namespace critbatch: the Job controller could "
                "create no pod (FailedCreate)", "create it: kubectl apply -k k8s/"),
])
def test_submit_checks_the_namespace_and_service_account_first(api_server, tmp_path, monkeypatch, capsys, s3_url,
                                                                missing, problem, fix):
    kubeconfig(tmp_path, monkeypatch, api_server)
    api_server.add_kit(**{missing: False})
    spec = tmp_path / "g.json"
    spec.write_text(json.dumps(SPEC))
    assert cli.main(["submit", str(spec), "--store", s3_url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"critbatch submit: error: {problem}") and fix in err[0]
    assert api_server.creates() == []


def test_another_namespace_is_told_its_own_commands(api_server, cluster, store):
    g = grid(namespace="ml", service_account="trainer")
    api_server.add_kit()
    with pytest.raises(ConfigError, match="^namespace: no namespace 'ml' on the cluster; create it: kubectl create "
                                          "namespace ml, then its ServiceAccount 'trainer'"):
        submit.check_cluster(g, cluster, print)
    g = grid(service_account="trainer")
    with pytest.raises(ConfigError, match=r"^service_account: no ServiceAccount 'trainer' .* create it: kubectl -n "
                                          "critbatch create serviceaccount trainer$"):
        submit.check_cluster(g, cluster, print)


def test_what_submit_may_not_read_is_not_checked(api_server, tmp_path, monkeypatch, capsys, s3_url):
    kubeconfig(tmp_path, monkeypatch, api_server)
    api_server.add_kit(namespace=False)
    api_server.faults.append(("GET", NAMESPACES, 403, {}))  # no right to read namespaces (cluster-scoped)
    spec = tmp_path / "g.json"
    spec.write_text(json.dumps(SPEC))
    assert cli.main(["submit", str(spec), "--store", s3_url]) == 0
    assert "cannot read Namespace critbatch (403 Forbidden): not checked" in capsys.readouterr().err
    assert len(cell_jobs(api_server)) == 6


def test_status_command_names_the_missing_service_account(api_server, tmp_path, monkeypatch, capsys, s3_url):
    kubeconfig(tmp_path, monkeypatch, api_server)
    api_server.add_kit()
    spec = tmp_path / "g.json"
    spec.write_text(json.dumps({**SPEC, "batch_size": [16]}))
    assert cli.main(["submit", str(spec), "--store", s3_url]) == 0
    for name in cell_jobs(api_server):
        api_server.add_event("Job", name, "FailedCreate", no_account(name))
    capsys.readouterr()
    assert cli.main(["status", str(spec), "--store", s3_url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert sum('pending  FailedCreate: pods "critbatch-sub-' in line and 'serviceaccount "critbatch" not found' in line
               for line in table) == 2
    assert table[-1] == "done 0  diverged 0  damaged 0  running 0  pending 2  failed 0  lost 0  (total 2)"


# ---- status ------------------------------------------------------------------------------------------------------


def test_status_joins_cluster_and_store(api_server, cluster, store):
    g = grid()
    submit.submit_once(g, cluster, store, max_active=4)
    jobs = by_cell(cell_jobs(api_server))
    started = [c for c in g.cell_ids() if not jobs[c]["spec"]["suspend"]]
    mark(jobs[started[0]], "Complete")
    finish_in_store(store, g, started[0])
    mark(jobs[started[1]], "Complete")
    finish_in_store(store, g, started[1], "diverged")
    mark(jobs[started[2]], "Failed", "BackoffLimitExceeded")
    mark(jobs[started[3]], "running")
    objects = {o["metadata"]["name"]: o for o in cluster.list("Job", k8s.cell_selector(g.sweep))}
    rows = status.cell_states(g, MarkerBook(store, g.sweep).read(), objects, {})
    by_id = {r["cell"]: r for r in rows}
    assert by_id[started[0]]["state"] == "done" and by_id[started[1]]["state"] == "diverged"
    assert by_id[started[2]]["state"] == "failed" and by_id[started[2]]["why"].startswith("BackoffLimitExceeded")
    assert by_id[started[3]]["cluster"] == "running" and by_id[started[3]]["state"] == "running"
    held = [r for r in rows if r["cluster"] == "suspended"]
    assert len(held) == 2 and {r["state"] for r in held} == {"pending"}
    table = status.format_table(rows)
    assert table.splitlines()[0].split()[:3] == ["CELL", "DATASET", "MODEL"]
    assert table.splitlines()[-1] == "done 1  diverged 1  damaged 0  running 1  pending 2  failed 1  lost 0  (total 6)"


TRAINJOB = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")


@pytest.mark.parametrize("trainjob_status,suspend,expected", [
    # Kubeflow Trainer has no Running condition: a TrainJob runs while a child Job has active pods.
    ({"jobsStatus": [{"name": "node", "active": 1, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0}]},
     False, ("running", "running")),
    ({"jobsStatus": [{"name": "node", "active": 0, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 1}],
      "conditions": [{"type": "Suspended", "status": "True", "reason": "Suspended", "message": ""}]},
     True, ("suspended", "pending")),
    ({"conditions": [{"type": "Suspended", "status": "False", "reason": "Resumed", "message": ""}]},
     False, ("created", "pending")),
    ({"conditions": [{"type": "Complete", "status": "True", "reason": "JobsCompleted", "message": ""}]},
     False, ("succeeded", "running")),
    ({"conditions": [{"type": "Failed", "status": "True", "reason": "FailedJobs", "message": "node failed"}]},
     False, ("failed", "failed")),
])
def test_status_reads_trainjob_conditions(api_server, cluster, store, trainjob_status, suspend, expected):
    g = grid(backend="trainjob", resources={"gpus": 0, "nodes": 2, "cpu": 1, "memory": "1Gi"})
    submit.submit_once(g, cluster, store)
    obj = by_cell(api_server.custom(*TRAINJOB))[g.cell_ids()[0]]
    obj["spec"]["suspend"] = suspend
    obj["status"] = trainjob_status
    objects = {o["metadata"]["name"]: o for o in cluster.list("TrainJob", k8s.cell_selector(g.sweep))}
    row = status.cell_states(g, MarkerBook(store, g.sweep).read(), objects, {})[0]
    assert (row["cluster"], row["state"]) == expected
    if expected[1] == "failed":
        assert row["why"] == "FailedJobs: node failed"


@pytest.mark.parametrize("backend,kind,group,version,plural,suspend_path", [
    ("pytorchjob", "PyTorchJob", "kubeflow.org", "v1", "pytorchjobs", ("spec", "runPolicy", "suspend")),
    ("trainjob", "TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", ("spec", "suspend")),
])
def test_custom_objects_for_multi_node_backends(api_server, cluster, store, backend, kind, group, version, plural,
                                                suspend_path):
    def suspended(obj):
        for key in suspend_path:
            obj = obj[key]
        return obj

    g = grid(backend=backend, resources={"gpus": 0, "nodes": 2, "cpu": 1, "memory": "1Gi"})
    report = submit.submit_once(g, cluster, store, max_active=1)
    objs = api_server.custom(group, version, plural)
    assert len(objs) == 6 and {o["kind"] for o in objs.values()} == {kind}
    assert sorted(suspended(o) for o in objs.values()) == [False] + [True] * 5
    first = by_cell(objs)[report.started[0]]
    first["status"] = {"conditions": [{"type": "Succeeded" if kind == "PyTorchJob" else "Complete", "status": "True"}]}
    report = submit.submit_once(g, cluster, store, max_active=1)
    assert report.created == [] and len(report.started) == 1
    assert suspended(by_cell(objs)[report.started[0]]) is False  # resumed through the kind's own flag


def test_dry_run_creates_nothing(api_server, cluster, store):
    report = submit.submit_once(grid(), cluster, store, dry_run=True)
    assert len(report.created) == 6 and api_server.creates() == []


# ---- the commands ----------------------------------------------------------------------------------------------


def test_status_command_without_cluster(tmp_path, capsys):
    store_dir = tmp_path / "store"
    g = grid(store=str(store_dir))
    store = open_store(str(store_dir))
    finish_in_store(store, g, g.cell_ids()[0])
    MarkerBook(store, g.sweep).record_failure(g.cell_ids()[1], kind="Job", name="x", reason="DeadlineExceeded",
                                              by="status")
    spec = tmp_path / "g.json"
    spec.write_text(json.dumps({**SPEC, "store": str(store_dir)}))
    assert cli.main(["status", str(spec), "--no-cluster"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "done 1  diverged 0  damaged 0  running 0  pending 4  failed 1  lost 0  (total 6)"
    assert len(out) == 1 + 6 + 1 and "DeadlineExceeded" in out[2]


def test_submit_without_any_cluster_config_is_one_clear_error(tmp_path, monkeypatch, capsys, s3_url):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nothing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["submit", "table1-wikitext2-lstm", "--store", s3_url, "--image", "reg/cb:1", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no kube config found" in err[0]


def test_submit_refuses_a_local_store(capsys, tmp_path):
    assert cli.main(["submit", "table1-wikitext2-lstm", "--store", str(tmp_path), "--image", "reg/cb:1"]) == 2
    assert "pods cannot reach" in capsys.readouterr().err


def test_submit_refuses_the_placeholder_image(api_server, tmp_path, monkeypatch, capsys, s3_url):
    kubeconfig(tmp_path, monkeypatch, api_server)
    assert cli.main(["submit", "table1-wikitext2-lstm", "--store", s3_url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image: 'critbatch:latest' is the placeholder" in err[0] and "--image" in err[0]
    assert api_server.requests == []


@pytest.mark.parametrize("keys,problem", [
    (None, "store_secret: no Secret 'critbatch-store' in namespace critbatch"),
    (("AWS_ACCESS_KEY_ID",), "store_secret: Secret 'critbatch-store' in namespace critbatch lacks AWS_SECRET_ACCESS_KEY"),
])
def test_submit_checks_the_store_secret_first(api_server, tmp_path, monkeypatch, capsys, s3_url, keys, problem):
    kubeconfig(tmp_path, monkeypatch, api_server)
    api_server.add_kit(secret=False)
    if keys:
        api_server.add_secret(keys=keys)
    spec = tmp_path / "g.json"
    spec.write_text(json.dumps(SPEC))
    assert cli.main(["submit", str(spec), "--store", s3_url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"critbatch submit: error: {problem}")
    assert api_server.creates() == []


def test_a_secret_submit_may_not_read_is_not_checked(api_server, tmp_path, monkeypatch, capsys, s3_url):
    kubeconfig(tmp_path, monkeypatch, api_server)
    api_server.add_kit(secret=False)
    api_server.faults.append(("GET", SECRETS, 403, {}))  # RBAC without get on Secrets
    spec = tmp_path / "g.json"
    spec.write_text(json.dumps(SPEC))
    assert cli.main(["submit", str(spec), "--store", s3_url]) == 0
    assert "cannot read Secret critbatch-store (403 Forbidden): not checked" in capsys.readouterr().err
    assert len(cell_jobs(api_server)) == 6


def test_submit_and_status_commands_through_a_kubeconfig(api_server, tmp_path, monkeypatch, capsys, s3_url):
    kubeconfig(tmp_path, monkeypatch, api_server)
    api_server.add_kit()
    spec = tmp_path / "g.yaml"
    spec.write_text(json.dumps({**SPEC, "image": "critbatch:latest"}))
    assert cli.main(["submit", str(spec), "--store", s3_url, "--max-active", "4", "--image", "reg/cb:2",
                     "--backend", "job"]) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 6 and all(line.startswith("created critbatch-sub-") for line in out.out.splitlines())
    assert "created 6, started 4, already there 0, done in store 0, held by the cap 2" in out.err
    assert {o["spec"]["template"]["spec"]["containers"][0]["image"] for o in cell_jobs(api_server).values()} == {"reg/cb:2"}
    assert yaml.safe_load(open_store(s3_url).get_text("sub/sweep.yaml"))["spec"]["sweep"] == "sub"
    jobs = by_cell(cell_jobs(api_server))
    failed = next(c for c, o in jobs.items() if not o["spec"]["suspend"])
    mark(jobs[failed], "Failed", "PodFailurePolicy")
    assert cli.main(["status", str(spec), "--store", s3_url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-1] == "done 0  diverged 0  damaged 0  running 0  pending 5  failed 1  lost 0  (total 6)"
    assert sum(" suspended " in line for line in table) == 2
    # status wrote what it saw into the store: the failure outlives the Job.
    assert json.loads(open_store(s3_url).get_text(failed_key("sub", failed)))["by"] == "status"


def test_status_with_the_api_server_down_shows_the_store(api_server, tmp_path, monkeypatch, capsys, s3_url):
    kubeconfig(tmp_path, monkeypatch, api_server)
    api_server.stop()
    monkeypatch.setattr(api.Cluster, "__init__", functools.partialmethod(api.Cluster.__init__, sleep=lambda s: None))
    spec = tmp_path / "g.yaml"
    spec.write_text(json.dumps(SPEC))
    assert cli.main(["status", str(spec), "--store", s3_url]) == 0
    out = capsys.readouterr()
    assert "showing the store alone" in out.err and out.out.splitlines()[-1].endswith("(total 6)")
    api_server.start()


def test_a_broken_kubeconfig_is_named(tmp_path, monkeypatch):
    bad = tmp_path / "config"
    bad.write_text("apiVersion: v1\nkind: Config\ncurrent-context: nowhere\n")
    monkeypatch.setenv("KUBECONFIG", str(bad))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match=f"cannot use the kube config {bad}"):
        api.api_client()
