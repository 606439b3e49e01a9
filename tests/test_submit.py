"""`submit` and `status` against the real `kubernetes` client, its HTTP calls answered on loopback.

No Kubernetes API server can run on these machines (no Kubernetes binaries are reachable), so a small
http.server plays the few REST endpoints submit and status use - list/create/patch of batch/v1 Jobs and
list/create of custom objects - with the API server's status codes (201 Created, 409 AlreadyExists as a
Status object) and label selectors. Everything above the HTTP layer is the real client: request building,
serialisation, ApiException on errors. The store is the real loopback S3 server or a local directory.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from critbatch.jobs import cli
from critbatch.jobs.sweep import cluster as submit, k8s
from critbatch.jobs.sweep.grid import load_grid
from critbatch.jobs.store import open_store
from critbatch.jobs.cell.layout import success_key

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
}


class FakeApiServer:
    """Objects by (path prefix, name); each request recorded as (method, path)."""

    def __init__(self):
        self.objects: dict[str, dict[str, dict]] = {}
        self.requests: list[tuple[str, str]] = []
        self.conflict_on_create: set[str] = set()  # names whose create answers 409 though never listed
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self):
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                fake.requests.append(("GET", url.path))
                query = urllib.parse.parse_qs(url.query)
                selector = dict(kv.split("=", 1) for kv in query.get("labelSelector", [""])[0].split(",") if kv)
                items = [o for o in fake.objects.get(url.path, {}).values()
                         if all(o["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]
                self._send(200, {"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items})

            def do_POST(self):
                path = urllib.parse.urlsplit(self.path).path
                fake.requests.append(("POST", path))
                obj = self._body()
                name = obj["metadata"]["name"]
                bucket = fake.objects.setdefault(path, {})
                if name in bucket or name in fake.conflict_on_create:
                    self._send(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 409,
                                     "reason": "AlreadyExists", "message": f'"{name}" already exists'})
                    return
                obj.setdefault("metadata", {})["uid"] = f"uid-{len(fake.requests)}"
                bucket[name] = obj
                self._send(201, obj)

            def do_PATCH(self):
                path = urllib.parse.urlsplit(self.path).path
                fake.requests.append(("PATCH", path))
                assert self.headers["Content-Type"] == "application/merge-patch+json"
                prefix, _, name = path.rpartition("/")
                obj = fake.objects.get(prefix, {}).get(name)
                if obj is None:
                    self._send(404, {"kind": "Status", "apiVersion": "v1", "code": 404, "reason": "NotFound"})
                    return
                obj["spec"].update(self._body().get("spec", {}))
                self._send(200, obj)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def host(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def jobs(self, namespace="critbatch") -> dict[str, dict]:
        return self.objects.get(f"/apis/batch/v1/namespaces/{namespace}/jobs", {})

    def custom(self, group, version, plural, namespace="critbatch") -> dict[str, dict]:
        return self.objects.get(f"/apis/{group}/{version}/namespaces/{namespace}/{plural}", {})

    def creates(self):
        return [r for r in self.requests if r[0] == "POST"]


@pytest.fixture
def api_server():
    server = FakeApiServer()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def cluster(api_server):
    configuration = client.Configuration(host=api_server.host)
    return submit.Cluster(client.ApiClient(configuration), "critbatch")


@pytest.fixture
def store(s3_url):
    return open_store(s3_url)


def grid(**changes):
    return load_grid({**SPEC, **changes})


def cell_jobs(api_server):
    return {n: o for n, o in api_server.jobs().items() if o["metadata"]["labels"][k8s.LABEL_COMPONENT] == "cell"}


def mark(obj, state):
    """Give an object the status the Job controller would."""
    if state == "running":
        obj["status"] = {"active": 1}
    elif state in ("Complete", "Failed"):
        obj["status"] = {"conditions": [{"type": state, "status": "True"}]}


def finish_in_store(store, g, cell, status="done"):
    store.put_text(success_key(g.sweep, cell.id), json.dumps({"status": status}))


# ---- submit --------------------------------------------------------------------------------------------------


def test_submit_creates_every_cell_and_a_suspended_analysis_job(api_server, cluster, store):
    g = grid()
    report = submit.submit_once(g, cluster, store)
    assert sorted(report.created) == sorted(c.id for c in g.cells())
    jobs = api_server.jobs()
    assert len(cell_jobs(api_server)) == 6
    analysis = jobs["critbatch-sub-analysis"]
    assert analysis["spec"]["suspend"] is True and report.analysis == "created (suspended)"
    sent = jobs[k8s.object_name("sub", g.cells()[0].id)]
    assert sent["spec"]["template"]["spec"]["containers"][0]["command"] == ["torchrun"]


def test_submit_is_idempotent(api_server, cluster, store):
    g = grid()
    submit.submit_once(g, cluster, store)
    creates = len(api_server.creates())
    report = submit.submit_once(g, cluster, store)
    assert report.created == [] and len(report.already_existed) == 6
    assert len(api_server.creates()) == creates  # the second pass lists, finds everything, creates nothing


def test_already_exists_counts_as_done(api_server, cluster, store):
    g = grid()
    racing = k8s.object_name("sub", g.cells()[2].id)
    api_server.conflict_on_create.add(racing)  # created by someone else between our list and our create
    report = submit.submit_once(g, cluster, store)
    assert g.cells()[2].id in report.already_existed
    assert len(report.created) == 5
    assert ("POST", "/apis/batch/v1/namespaces/critbatch/jobs") in api_server.creates()


def test_other_api_errors_are_raised(api_server, cluster, store):
    from kubernetes.client.exceptions import ApiException

    g = grid(namespace="missing")
    cluster.namespace = "missing"
    api_server.server.RequestHandlerClass.do_POST = lambda self: self._send(403, {"kind": "Status", "code": 403})
    with pytest.raises(ApiException) as info:
        submit.submit_once(g, cluster, store)
    assert info.value.status == 403


def test_cells_finished_in_the_store_are_skipped(api_server, cluster, store):
    g = grid()
    finish_in_store(store, g, g.cells()[0])
    finish_in_store(store, g, g.cells()[1], "diverged")
    report = submit.submit_once(g, cluster, store)
    assert sorted(report.skipped_done) == sorted([g.cells()[0].id, g.cells()[1].id])
    names = set(cell_jobs(api_server))
    assert k8s.object_name("sub", g.cells()[0].id) not in names and len(names) == 4


def test_concurrency_cap_counts_active_jobs_of_the_sweep(api_server, cluster, store):
    g = grid()
    report = submit.submit_once(g, cluster, store, max_active=2)
    assert len(report.created) == 2 and len(report.waiting) == 4
    # Nothing finished: a second pass creates nothing more.
    report = submit.submit_once(g, cluster, store, max_active=2)
    assert report.created == [] and len(report.waiting) == 4
    # One Job completes (its marker is in the store), one is still running: one slot frees up.
    first, second = cell_jobs(api_server).values()
    mark(first, "Complete")
    mark(second, "running")
    report = submit.submit_once(g, cluster, store, max_active=2)
    assert len(report.created) == 1 and len(report.waiting) == 3
    # Jobs of another sweep do not count against this one's cap.
    other = grid(sweep="other")
    report = submit.submit_once(other, cluster, store, max_active=2)
    assert len(report.created) == 2


def test_the_grid_cap_applies_and_failed_cells_are_not_recreated(api_server, cluster, store):
    g = grid(max_active=3)
    submit.submit_once(g, cluster, store, max_active=g.max_active)
    assert len(cell_jobs(api_server)) == 3
    for obj in cell_jobs(api_server).values():
        mark(obj, "Failed")
    report = submit.submit_once(g, cluster, store, max_active=g.max_active)
    assert len(report.failed) == 3 and len(report.created) == 3


def test_wait_keeps_submitting_then_starts_the_analysis(api_server, cluster, store):
    g = grid()
    polls = []

    def sleep(seconds):
        # Between polls the cluster runs what was created: each running cell finishes and writes _SUCCESS.
        polls.append(seconds)
        for obj in cell_jobs(api_server).values():
            mark(obj, "Complete")
            cell_id = obj["metadata"]["labels"][k8s.LABEL_CELL]
            finish_in_store(store, g, next(c for c in g.cells() if c.id == cell_id))

    report = submit.submit(g, cluster, store, max_active=4, wait=True, poll_seconds=0.5, sleep=sleep)
    assert report.finished and polls == [0.5, 0.5]
    assert len(cell_jobs(api_server)) == 6
    assert api_server.jobs()["critbatch-sub-analysis"]["spec"]["suspend"] is False
    assert report.analysis == "resumed"
    assert ("PATCH", "/apis/batch/v1/namespaces/critbatch/jobs/critbatch-sub-analysis") in api_server.requests


def test_wait_times_out(api_server, cluster, store):
    with pytest.raises(TimeoutError, match="still unfinished"):
        submit.submit(grid(), cluster, store, wait=True, poll_seconds=1.0, timeout=1.5, sleep=lambda s: None)


@pytest.mark.parametrize("backend,kind,group,version,plural", [
    ("pytorchjob", "PyTorchJob", "kubeflow.org", "v1", "pytorchjobs"),
    ("trainjob", "TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs"),
])
def test_custom_objects_for_multi_node_backends(api_server, cluster, store, backend, kind, group, version, plural):
    g = grid(backend=backend, resources={"gpus": 0, "nodes": 2, "cpu": 1, "memory": "1Gi"})
    report = submit.submit_once(g, cluster, store)
    objs = api_server.custom(group, version, plural)
    assert len(objs) == 6 and {o["kind"] for o in objs.values()} == {kind}
    assert len(report.created) == 6
    report = submit.submit_once(g, cluster, store)
    assert report.created == [] and len(report.already_existed) == 6


def test_dry_run_creates_nothing(api_server, cluster, store):
    report = submit.submit_once(grid(), cluster, store, dry_run=True)
    assert len(report.created) == 6 and api_server.creates() == []


# ---- status ---------------------------------------------------------------------------------------------------


def test_status_joins_cluster_and_store(api_server, cluster, store):
    g = grid()
    cells = g.cells()
    submit.submit_once(g, cluster, store, max_active=4)
    jobs = {o["metadata"]["labels"][k8s.LABEL_CELL]: o for o in cell_jobs(api_server).values()}
    created = [c for c in cells if c.id in jobs]
    mark(jobs[created[0].id], "Complete")
    finish_in_store(store, g, created[0])
    mark(jobs[created[1].id], "Complete")
    finish_in_store(store, g, created[1], "diverged")
    mark(jobs[created[2].id], "Failed")
    mark(jobs[created[3].id], "running")
    objects = {o["metadata"]["name"]: o for o in cluster.list("Job", k8s.cell_selector(g.sweep))}
    rows = submit.cell_states(g, store, objects)
    by_id = {r["cell"]: r for r in rows}
    assert by_id[created[0].id]["state"] == "done" and by_id[created[1].id]["state"] == "diverged"
    assert by_id[created[2].id]["state"] == "failed" and by_id[created[3].id]["cluster"] == "running"
    absent = [r for r in rows if r["cluster"] == "absent"]
    assert len(absent) == 2 and {r["state"] for r in absent} == {"pending"}
    table = submit.format_table(rows)
    assert table.splitlines()[0].split()[:3] == ["CELL", "DATASET", "MODEL"]
    assert table.splitlines()[-1] == "done 1  diverged 1  running 1  pending 2  failed 1  (total 6)"


def test_status_command_without_cluster(tmp_path, capsys):
    store_dir = tmp_path / "store"
    g = grid(store=str(store_dir))
    store = open_store(str(store_dir))
    finish_in_store(store, g, g.cells()[0])
    spec = tmp_path / "g.json"
    spec.write_text(json.dumps({**SPEC, "store": str(store_dir)}))
    assert cli.main(["status", str(spec), "--no-cluster"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "done 1  diverged 0  running 0  pending 5  failed 0  (total 6)"
    assert len(out) == 1 + 6 + 1


def test_submit_without_any_cluster_config_is_one_clear_error(tmp_path, monkeypatch, capsys, s3_url):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nothing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["submit", "table1-wikitext2-lstm", "--store", s3_url, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no kube config found" in err[0]


def test_submit_refuses_a_local_store(capsys, tmp_path):
    assert cli.main(["submit", "table1-wikitext2-lstm", "--store", str(tmp_path)]) == 2
    assert "pods cannot reach" in capsys.readouterr().err


def test_submit_and_status_commands_through_a_kubeconfig(api_server, tmp_path, monkeypatch, capsys, s3_url):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api_server.host}}],
        "users": [{"name": "u", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    spec = tmp_path / "g.yaml"
    spec.write_text(json.dumps(SPEC))
    assert cli.main(["submit", str(spec), "--store", s3_url, "--max-active", "4"]) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 4 and all(line.startswith("created critbatch-sub-") for line in out.out.splitlines())
    assert "created 4, already there 0, done in store 0, held by the cap 2" in out.err
    assert open_store(s3_url).exists("sub/sweep.yaml")
    assert cli.main(["status", str(spec), "--store", s3_url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-1] == "done 0  diverged 0  running 0  pending 6  failed 0  (total 6)"
    assert sum(" created " in line for line in table) == 4 and sum(" absent " in line for line in table) == 2


def test_a_broken_kubeconfig_is_named(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "config"
    bad.write_text("apiVersion: v1\nkind: Config\ncurrent-context: nowhere\n")
    monkeypatch.setenv("KUBECONFIG", str(bad))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(submit.ConfigError, match=f"cannot use the kube config {bad}"):
        submit.api_client()
