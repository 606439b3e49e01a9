"""Sweeps on a real Kubernetes control plane: the API server validates, the Job controller drives the Jobs,
the scheduler binds their pods to a node whose kubelet (tests/kube/kubelet.py) runs them as processes, the
cells write to the loopback S3 store, and the analysis Job writes the report.

    control plane      tests/kube/controlplane.py (binaries built once per machine by tests/kube/go/build.sh)
    node               tests/kube/kubelet.py: pods as processes, through the pod harness's Pod.start
    store              a SeaweedFS server of this module's own, behind a relay that a test can cut

What each test sees of the Job controller (its conditions in the order it set them) is asserted and, for
the record, written to ``$CRITBATCH_CLUSTER_RECORD`` when that is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from datafiles import write_cifar10
from relay import Link

from critbatch.jobs.cell.errors import ConfigError, ExitCode
from critbatch.jobs.cell.layout import cell_prefix
from critbatch.jobs.cell.logschema import ipc_to_table
from critbatch.jobs.local.s3server import S3Server
from critbatch.jobs.store import open_store
from critbatch.jobs import backends
from critbatch.jobs.backends import k8s
from critbatch.jobs.sweep import render
from critbatch.jobs.sweep.grid import load_grid, preset_names

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO.parent / "shared" / "schemas"
IMAGE = "registry.example/critbatch:test"
#: A linreg cell of a few seconds; batch sizes and steps are set per test.
SPEC = {
    "dataset": {"name": "linreg", "options": {"n": 64, "d": 128, "spikes": 2, "spike_var": 20.0}},
    "model": "linear", "strategy": "oracle", "base_lr": 1.0, "base_batch": 2, "epochs": 3,
    "batch_size": [4, 16], "seed": [0],
    "optimizer": {"name": "sgd", "momentum": 0.0, "weight_decay": 0.0},
    "eval": {"points": 6, "train_subset": None},
    "resources": {"gpus": 0, "cpu": 1, "memory": "1Gi", "shm": "64Mi", "grace_seconds": 30},
    "analysis": {"cpu": 1, "memory": "1Gi"},
    "image": IMAGE,
}


# ---- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS server of this module's own, reached by the pods through a relay that can be cut."""
    server = S3Server(tmp_path_factory.mktemp("seaweedfs-cluster"))
    server.start()
    link = Link(server.port)
    yield {"server": server, "link": link}
    link.cut()
    server.stop()


@pytest.fixture
def store_url(s3, monkeypatch):
    for key, value in s3["server"].env().items():
        monkeypatch.setenv(key, value)
    url = f"s3://k-{uuid.uuid4().hex[:10]}/runs"
    open_store(url).check()
    return url


@pytest.fixture
def ns(kube_namespace, kube_api, kube_node, s3, control_plane, monkeypatch):
    """A namespace set up as the README says (ServiceAccount and store Secret), with the admin's kube config."""
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    sa = yaml.safe_load((REPO / "k8s/serviceaccount.yaml").read_text())
    sa["metadata"]["namespace"] = kube_namespace
    core.create_namespaced_service_account(kube_namespace, sa)
    env = s3["server"].env()
    core.create_namespaced_secret(kube_namespace, {
        "metadata": {"name": k8s.DEFAULT_STORE_SECRET},
        "stringData": {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    return kube_namespace


#: Cells on a CIFAR-10-format set of 100 examples staged into the store (``staged``): batch 4 trains,
#: batch 128 is refused by the trainer when it loads the data (exit 2), which no render can see.
CIFAR = {"dataset": {"name": "cifar10"}, "model": "mobilenetv2", "model_options": {"width_mult": 0.25},
         "strategy": "blr", "base_lr": 0.01, "base_batch": 4, "epochs": 100, "max_steps": 4,
         "eval": {"points": 2, "train_subset": 8}}


@pytest.fixture
def staged(store_url, tmp_path):
    """The store with CIFAR-10 (100 examples) staged the README's way."""
    source = write_cifar10(tmp_path / "cifar10")
    done = critbatch("data", "stage", "cifar10", "--from", str(source), "--store", store_url)
    assert done.returncode == 0, done.stderr
    return store_url


def write_grid(tmp_path: Path, sweep: str, namespace: str, store: str, link: Link, **changes) -> Path:
    spec = {**SPEC, "sweep": sweep, "namespace": namespace, "store": store, "store_endpoint": link.url, **changes}
    path = tmp_path / f"{sweep}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def critbatch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # The test control plane's serving certificate is self-signed (its kube config skips verification): the
    # kubernetes client's warning about that is left out of what the tests read.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore:Unverified HTTPS request")
    return subprocess.run([sys.executable, "-m", "critbatch.jobs.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


class Watch:
    """What the API server says of a namespace's Jobs and pods, polled every 0.1 s in a thread: each Job's
    True conditions in the order they appeared (type and reason), and the most cell Jobs ever running at
    once (not suspended, not finished)."""

    def __init__(self, api, namespace: str):
        from kubernetes import client

        self.batch = client.BatchV1Api(api)
        self.namespace = namespace
        self.conditions: dict[str, list[tuple[str, str]]] = {}
        self.max_running = 0
        self.jobs: dict[str, dict] = {}
        self.error: BaseException | None = None

    def __enter__(self) -> "Watch":
        """Start watching (again: a Watch may be entered more than once, its record kept)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # the state at the end, whatever the last poll saw
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._poll()
                self._stop.wait(0.1)
        except BaseException as err:  # raised in the test's thread on exit
            self.error = err

    def _poll(self) -> None:
        jobs = self.batch.api_client.sanitize_for_serialization(
            self.batch.list_namespaced_job(self.namespace).items)
        running = 0
        for job in jobs:
            name = job["metadata"]["name"]
            self.jobs[name] = job
            seen = self.conditions.setdefault(name, [])
            for c in (job.get("status") or {}).get("conditions") or []:
                entry = (c["type"], c.get("reason", ""))
                if c["status"] == "True" and entry not in seen:
                    seen.append(entry)
            finished = any(t in ("Complete", "Failed") for t, _ in seen)
            if job["metadata"]["labels"].get(k8s.LABEL_COMPONENT) == k8s.COMPONENT_CELL and \
                    not job["spec"].get("suspend") and not finished:
                running += 1
        self.max_running = max(self.max_running, running)


def record(scenario: str, watch: Watch) -> None:
    """Append what the Job controller did in ``scenario`` to $CRITBATCH_CLUSTER_RECORD (JSON lines)."""
    path = os.environ.get("CRITBATCH_CLUSTER_RECORD")
    if path:
        with open(path, "a") as out:
            for name, seen in watch.conditions.items():
                status = watch.jobs.get(name, {}).get("status") or {}
                out.write(json.dumps({"scenario": scenario, "job": name, "conditions": seen,
                                      "failed": status.get("failed", 0), "succeeded": status.get("succeeded", 0),
                                      "completedIndexes": status.get("completedIndexes"),
                                      "failedIndexes": status.get("failedIndexes")}) + "\n")


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(poll)


def job_of(api, namespace: str, name: str) -> dict:
    from kubernetes import client

    batch = client.BatchV1Api(api)
    return batch.api_client.sanitize_for_serialization(batch.read_namespaced_job(name, namespace))


def true_conditions(job: dict) -> dict[str, str]:
    return {c["type"]: c.get("reason", "") for c in (job.get("status") or {}).get("conditions") or []
            if c["status"] == "True"}


def pods_of(api, namespace: str, job: str) -> list[dict]:
    from kubernetes import client

    core = client.CoreV1Api(api)
    pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job}").items
    return sorted(core.api_client.sanitize_for_serialization(pods), key=lambda p: p["metadata"]["creationTimestamp"])


def step_rows(store, prefix: str) -> list[int]:
    tables = [ipc_to_table(store.get_bytes(k)) for k in store.list(f"{prefix}/steps/")]
    return sorted(pa.concat_tables(tables).column("step").to_pylist()) if tables else []


def status_rows(grid_path: Path, *args: str) -> dict[str, dict[str, str]]:
    """``critbatch status``'s table, cell id -> column -> value."""
    done = critbatch("status", str(grid_path), *args)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    header = lines[0].split()
    rows = {}
    for line in lines[1:-1]:
        words = line.split(None, len(header) - 1)
        rows[words[0]] = dict(zip((h.lower() for h in header), words))
    return rows


# ---- server-side validation of everything critbatch renders ----------------------------------------------


@pytest.fixture(scope="module")
def crds(control_plane):
    """The PyTorchJob and TrainJob CRDs (read from shared/schemas), the ClusterTrainingRuntime CRD (from
    the build's cache: Kubeflow Trainer's Go module) and critbatch's ClusterTrainingRuntime, installed."""
    runtime_crd = control_plane.bindir / "crds" / "trainer.kubeflow.org_clustertrainingruntimes.yaml"
    for path in (SCHEMAS / "kubeflow.org_pytorchjobs.yaml", SCHEMAS / "trainer.kubeflow.org_trainjobs.yaml",
                 runtime_crd):
        assert path.is_file(), f"{path} is missing: shared/schemas beside the checkout, and tests/kube/go/build.sh"
        # The PyTorchJob CRD's last-applied annotation would pass 262144 bytes: a server-side apply.
        control_plane.kubectl("apply", "--server-side", "-f", str(path))
    for name in ("pytorchjobs.kubeflow.org", "trainjobs.trainer.kubeflow.org",
                 "clustertrainingruntimes.trainer.kubeflow.org"):
        control_plane.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    control_plane.kubectl("apply", "--validate=strict", "-f", str(REPO / "k8s/trainer/clustertrainingruntime.yaml"))


@pytest.mark.parametrize("backend", list(backends.NAMES))
def test_every_preset_passes_a_strict_server_side_dry_run(control_plane, crds, backend):
    """Every preset's cells and analysis Job (and a searched preset's controller) under ``backend``, applied with
    --dry-run=server and strict field validation in one stream: the API server's own checks (restartPolicy
    with a podFailurePolicy, backoffLimitPerIndex with Indexed completion, the CRDs' schemas and CEL rules)
    accept every object. A preset the backend refuses at render time (a priority class on a TrainJob) is
    left out, and counted."""
    control_plane.kubectl("create", "namespace", "critbatch", check=False)
    stream, refused = [], []
    for preset in preset_names():
        try:
            grid = load_grid(preset).with_overrides(image=IMAGE, backend=backend)
            docs = render.render_documents(grid, analysis=True)
        except ConfigError as err:
            refused.append(f"{preset}: {err}")
            continue
        if grid.search is not None:
            docs += render.render_search_documents(grid)
        stream.append(render.dump_stream(docs))
    text = "\n---\n".join(stream)
    count = sum(1 for d in yaml.safe_load_all(text) if d)
    applied = control_plane.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=text,
                                    check=False, timeout=600)
    assert applied.returncode == 0, f"under {backend}: {applied.stderr[-3000:]}"
    assert applied.stdout.count("(server dry run)") == count, applied.stdout[-2000:]
    assert count > 0 and len(refused) < len(preset_names()), refused
    print(f"{backend}: {count} objects accepted; refused at render: {refused}")


# ---- a sweep, end to end ------------------------------------------------------------------------------------


def test_submit_wait_runs_the_sweep_and_writes_the_report(ns, kube_api, store_url, s3, tmp_path):
    grid = write_grid(tmp_path, "e2e-submit", ns, store_url, s3["link"], batch_size=[4, 8, 16])
    with Watch(kube_api, ns) as watch:
        done = critbatch("submit", str(grid), "--max-active", "2", "--wait", "--poll-seconds", "1",
                         "--timeout", "480")
    assert done.returncode == 0, done.stderr[-4000:]
    cells = load_grid(yaml.safe_load(grid.read_text())).cell_ids()
    names = {k8s.object_name("e2e-submit", c) for c in cells}
    analysis = k8s.object_name("e2e-submit", k8s.ANALYSIS_SUFFIX)
    with watch:  # submit goes by the store: the Job controller may mark the last Job Complete a moment later
        for name in names | {analysis}:
            finished(kube_api, ns, name, timeout=120)
    record("submit --wait", watch)
    assert names <= set(watch.conditions)
    assert watch.max_running <= 2, "more cells ran at once than --max-active allows"
    for name in names:
        assert watch.conditions[name][-2:] == [("SuccessCriteriaMet", "CompletionsReached"),
                                               ("Complete", "CompletionsReached")], watch.conditions[name]
        assert ("Suspended", "JobSuspended") in watch.conditions[name] or \
            watch.jobs[name]["status"].get("startTime"), name
    assert true_conditions(job_of(kube_api, ns, analysis)).get("Complete") == "CompletionsReached"
    store = open_store(store_url)
    assert store.exists("e2e-submit/report/index.html")
    rows = status_rows(grid)
    assert {r["state"] for r in rows.values()} == {"done"} and len(rows) == len(cells), rows


def test_kubectl_apply_of_render_then_the_analysis(ns, kube_api, control_plane, store_url, s3, tmp_path):
    grid = write_grid(tmp_path, "e2e-apply", ns, store_url, s3["link"])
    store = open_store(store_url)
    g = load_grid(yaml.safe_load(grid.read_text()))
    store.put_text(f"{g.sweep}/sweep.yaml", g.sweep_yaml())
    rendered = critbatch("render", str(grid))
    assert rendered.returncode == 0, rendered.stderr
    control_plane.kubectl("apply", "-f", "-", input=rendered.stdout)
    names = [k8s.object_name(g.sweep, c) for c in g.cell_ids()]
    wait_until(lambda: all("Complete" in true_conditions(job_of(kube_api, ns, n)) for n in names), 300,
               "every cell Job Complete")
    analysis = critbatch("render", str(grid), "--analysis")
    assert analysis.returncode == 0, analysis.stderr
    control_plane.kubectl("apply", "-f", "-", input=analysis.stdout)
    name = k8s.object_name(g.sweep, k8s.ANALYSIS_SUFFIX)
    wait_until(lambda: true_conditions(job_of(kube_api, ns, name)).keys() & {"Complete", "Failed"}, 300,
               "the analysis Job finished")
    assert "Complete" in true_conditions(job_of(kube_api, ns, name))
    assert store.exists(f"{g.sweep}/report/index.html")
    assert {r["state"] for r in status_rows(grid).values()} == {"done"}


# ---- failures, as the Job controller handles them -------------------------------------------------------------


def test_a_bad_cell_fails_at_once_through_the_pod_failure_policy(ns, kube_api, kube_node, staged, s3, tmp_path):
    grid = write_grid(tmp_path, "e2e-bad", ns, staged, s3["link"], **CIFAR, batch_size=[128])
    with Watch(kube_api, ns) as watch:
        done = critbatch("submit", str(grid), "--wait", "--poll-seconds", "1", "--timeout", "240")
        (cell,) = load_grid(yaml.safe_load(grid.read_text())).cell_ids()
        name = k8s.object_name("e2e-bad", cell)
        finished(kube_api, ns, name, timeout=120)  # --wait goes by the store, a moment ahead of the controller
    record("bad cell (exit 2)", watch)
    assert done.returncode == 1, done.stderr
    assert watch.conditions[name][-2:] == [("FailureTarget", "PodFailurePolicy"), ("Failed", "PodFailurePolicy")]
    pods = pods_of(kube_api, ns, name)
    assert len(pods) == 1, "FailJob: no retry"
    assert pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == ExitCode.CONFIG
    row = status_rows(grid)[cell]
    assert row["state"] == "failed" and "PodFailurePolicy" in row["why"], row


def start_one_cell(tmp_path, ns, store_url, s3, sweep: str, **changes):
    """Submit a one-cell grid (no wait); the grid, its cell id and its Job's name."""
    grid = write_grid(tmp_path, sweep, ns, store_url, s3["link"], **{"batch_size": [4], **changes})
    done = critbatch("submit", str(grid))
    assert done.returncode == 0, done.stderr
    (cell,) = load_grid(yaml.safe_load(grid.read_text())).cell_ids()
    return grid, cell, k8s.object_name(sweep, cell)


def running_pod(api, namespace: str, job: str, node, after: int = 0) -> dict:
    """The Job's pod number ``after`` once its trainer has started training (its banner printed)."""
    def training():
        pods = pods_of(api, namespace, job)
        if len(pods) > after and pods[after]["status"].get("phase") == "Running":
            if "device cpu, precision" in node.output(namespace, pods[after]["metadata"]["name"]):
                return pods[after]
        return None
    return wait_until(training, 120, f"a training pod of {job}", poll=0.1)


def finished(api, namespace: str, job: str, timeout: float = 300) -> dict[str, str]:
    """The Job's True conditions once it is Complete or Failed; on a timeout, what it and its pods say."""
    try:
        return wait_until(lambda: (c := true_conditions(job_of(api, namespace, job))).keys() & {"Complete", "Failed"}
                          and c, timeout, f"{job} finished")
    except AssertionError as err:
        pods = [(p["metadata"]["name"], p["status"].get("phase"), p["metadata"].get("finalizers"),
                 p["status"].get("containerStatuses")) for p in pods_of(api, namespace, job)]
        raise AssertionError(f"{err}\njob status: {job_of(api, namespace, job).get('status')}\npods: {pods}") from None


#: Steps of the cells that are stopped part-way: long enough to be caught training.
LONG = {"epochs": 2000, "max_steps": 1500, "eval": {"points": 6, "train_subset": None}}


def test_a_deleted_pod_is_retried_and_resumes_every_step_logged_once(ns, kube_api, kube_node, store_url, s3,
                                                                     tmp_path):
    from kubernetes import client

    grid, cell, name = start_one_cell(tmp_path, ns, store_url, s3, "e2e-sigterm", **LONG)
    with Watch(kube_api, ns) as watch:
        pod = running_pod(kube_api, ns, name, kube_node)
        client.CoreV1Api(kube_api).delete_namespaced_pod(pod["metadata"]["name"], ns)  # SIGTERM, then 143
        conditions = finished(kube_api, ns, name)
    record("pod deleted mid-run (SIGTERM, exit 143)", watch)
    assert "Complete" in conditions, watch.conditions[name]
    pods = pods_of(kube_api, ns, name)
    first_name = pod["metadata"]["name"]
    assert "stopped at step " in kube_node.output(ns, first_name)
    stopped = int(kube_node.output(ns, first_name).split("stopped at step ")[1].split()[0])
    second = [p for p in pods if p["metadata"]["name"] != first_name][-1]["metadata"]["name"]
    assert f"resumed from the checkpoint at step {stopped}" in kube_node.output(ns, second)
    job = job_of(kube_api, ns, name)
    assert job["status"]["failed"] == 1, "a deleted pod (no DisruptionTarget) counts against the backoff limit"
    store = open_store(store_url)
    steps = step_rows(store, cell_prefix("e2e-sigterm", cell))
    assert steps == list(range(1, LONG["max_steps"] + 1)), "every step logged once"


def test_an_evicted_pod_is_retried_without_counting(ns, kube_api, kube_node, store_url, s3, tmp_path):
    grid, cell, name = start_one_cell(tmp_path, ns, store_url, s3, "e2e-evicted", **LONG)
    with Watch(kube_api, ns) as watch:
        pod = running_pod(kube_api, ns, name, kube_node)
        kube_node.evict(ns, pod["metadata"]["name"])  # DisruptionTarget, SIGTERM: exit 143
        conditions = finished(kube_api, ns, name)
    record("pod evicted (DisruptionTarget, exit 143)", watch)
    assert "Complete" in conditions, watch.conditions[name]
    pods = pods_of(kube_api, ns, name)
    evicted = next(p for p in pods if p["metadata"]["name"] == pod["metadata"]["name"])
    assert {c["type"] for c in evicted["status"]["conditions"] if c["status"] == "True"} >= {"DisruptionTarget"}
    assert evicted["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == ExitCode.PREEMPTED
    assert len(pods) == 2
    assert job_of(kube_api, ns, name)["status"].get("failed", 0) == 0, "podFailurePolicy Ignore: not counted"


def test_a_store_outage_is_retried(ns, kube_api, kube_node, store_url, s3, tmp_path):
    s3["link"].cut()
    try:
        grid, cell, name = start_one_cell(tmp_path, ns, store_url, s3, "e2e-outage")
        with Watch(kube_api, ns) as watch:
            first = wait_until(lambda: [p for p in pods_of(kube_api, ns, name)
                                        if p["status"].get("phase") == "Failed"], 300, "the first pod failed")
            s3["link"].restore()
            conditions = finished(kube_api, ns, name)
    finally:
        s3["link"].restore()
    record("store unreachable (exit 202)", watch)
    terminated = first[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == ExitCode.STORE_UNAVAILABLE, terminated
    assert "Complete" in conditions
    assert job_of(kube_api, ns, name)["status"]["failed"] >= 1


def test_the_indexed_backend_reads_completed_and_failed_indexes(ns, kube_api, kube_node, staged, s3, tmp_path):
    # Two cells in one resource class: batch 4 trains, batch 128 exceeds the 100 examples (exit 2: FailIndex).
    grid = write_grid(tmp_path, "e2e-indexed", ns, staged, s3["link"], **CIFAR, batch_size=[4, 128],
                      backend="indexed")
    with Watch(kube_api, ns) as watch:
        done = critbatch("submit", str(grid), "--wait", "--poll-seconds", "1", "--timeout", "300")
        (job,) = [j for n, j in watch.jobs.items()]
        # --wait reads the store: the good cell's _SUCCESS can land before the Job controller counts its pod.
        conditions = finished(kube_api, ns, job["metadata"]["name"], timeout=120)
    record("indexed: one good index, one bad", watch)
    assert done.returncode == 1, done.stderr
    status = job_of(kube_api, ns, job["metadata"]["name"])["status"]
    assert status.get("completedIndexes") == "0" and status.get("failedIndexes") == "1", status
    assert conditions.get("Failed") == "FailedIndexes", conditions
    g = load_grid(yaml.safe_load(grid.read_text()))
    rows = status_rows(grid)
    states = {c.batch_size: rows[c.id]["state"] for c in g.cells()}
    assert states == {4: "done", 128: "failed"}, rows


def test_a_failed_job_deleted_by_its_ttl_stays_failed(ns, kube_api, kube_node, staged, s3, tmp_path):
    """The grid's TTL is an hour, so that status sees the Failed Job first (and remembers it in the store);
    then the Job's ttlSecondsAfterFinished is cut to 1 s (a mutable field) and the TTL controller deletes it."""
    grid = write_grid(tmp_path, "e2e-ttl", ns, staged, s3["link"], **CIFAR, batch_size=[128],
                      resources={**SPEC["resources"], "ttl_seconds": 3600})
    g = load_grid(yaml.safe_load(grid.read_text()))
    (cell,) = g.cell_ids()
    name = k8s.object_name("e2e-ttl", cell)
    assert critbatch("submit", str(grid)).returncode == 0
    finished(kube_api, ns, name)
    assert status_rows(grid)[cell]["state"] == "failed"  # status sees the Failed Job and remembers it
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    jobs = client.BatchV1Api(kube_api)
    assert jobs.read_namespaced_job(name, ns).spec.ttl_seconds_after_finished == 3600
    jobs.patch_namespaced_job(name, ns, {"spec": {"ttlSecondsAfterFinished": 1}})

    def gone():
        try:
            client.BatchV1Api(kube_api).read_namespaced_job(name, ns)
        except ApiException as err:
            return err.status == 404
        return False
    wait_until(gone, 240, "the TTL controller deleted the Job")
    row = status_rows(grid)[cell]
    assert (row["cluster"], row["state"]) == ("absent", "failed"), row
    again = critbatch("submit", str(grid))
    assert "failed 1" in again.stderr and "created 0" in again.stderr, again.stderr


# ---- the two stalls a real API server showed ---------------------------------------------------------------


def test_submit_refuses_a_namespace_without_the_pods_service_account(kube_namespace, kube_api, control_plane, s3,
                                                                     store_url, tmp_path, monkeypatch):
    from kubernetes import client

    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    env = s3["server"].env()
    client.CoreV1Api(kube_api).create_namespaced_secret(kube_namespace, {
        "metadata": {"name": k8s.DEFAULT_STORE_SECRET},
        "stringData": {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})
    grid = write_grid(tmp_path, "e2e-nosa", kube_namespace, store_url, s3["link"])
    done = critbatch("submit", str(grid))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # one line
    assert f"no ServiceAccount 'critbatch' in namespace {kube_namespace}" in done.stderr, done.stderr
    assert f"kubectl -n {kube_namespace} create serviceaccount critbatch" in done.stderr, done.stderr
    assert client.BatchV1Api(kube_api).list_namespaced_job(kube_namespace).items == [], "nothing created"


def test_status_names_a_job_that_cannot_create_its_pods(kube_namespace, kube_api, kube_node, control_plane, s3,
                                                        store_url, tmp_path, monkeypatch):
    """Applied with kubectl where the ServiceAccount is missing: the Job controller records FailedCreate on the
    Job, no pod ever exists, and status says so instead of 'pending' with no reason."""
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    grid = write_grid(tmp_path, "e2e-nopods", kube_namespace, store_url, s3["link"], batch_size=[4])
    rendered = critbatch("render", str(grid))
    assert rendered.returncode == 0, rendered.stderr
    control_plane.kubectl("apply", "-f", "-", input=rendered.stdout)
    (cell,) = load_grid(yaml.safe_load(grid.read_text())).cell_ids()

    def named():
        row = status_rows(grid)[cell]
        return row if "FailedCreate" in row["why"] else None
    row = wait_until(named, 120, "status names the FailedCreate event")
    assert row["state"] == "pending" and 'serviceaccount "critbatch" not found' in row["why"], row
    assert pods_of(kube_api, kube_namespace, k8s.object_name("e2e-nopods", cell)) == []


def test_a_job_that_succeeded_without_writing_the_store_ends_the_wait(ns, kube_api, kube_node, store_url, s3,
                                                                      tmp_path):
    """The pods write to another S3 server than the one submit reads (a store endpoint that differs between
    the pods and the machine running submit): each Job succeeds, nothing reaches this store, and after the
    grace period (--lost-grace 10 here; a minute by default) the cell is 'lost' and submit --wait ends with
    exit 1 instead of waiting forever."""
    other = S3Server(tmp_path / "other-store")
    other.start()
    try:
        grid = write_grid(tmp_path, "e2e-lost", ns, store_url, s3["link"], batch_size=[4],
                          store_endpoint=other.endpoint)
        done = critbatch("submit", str(grid), "--wait", "--poll-seconds", "2", "--timeout", "400", "--lost-grace", "10")
    finally:
        other.stop()
    assert done.returncode == 1, done.stderr[-3000:]
    assert "lost" in done.stderr and "succeeded on the cluster, nothing in the store" in done.stderr
    (cell,) = load_grid(yaml.safe_load(grid.read_text())).cell_ids()
    assert status_rows(grid, "--lost-grace", "10")[cell]["state"] == "lost"
