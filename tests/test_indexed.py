"""Backend indexed: one Indexed Job per resource class, the cell chosen by JOB_COMPLETION_INDEX from
sweep.yaml, and every cell's state from the Jobs' completedIndexes/failedIndexes.

The Jobs are validated with kubernetes-validate --strict (the oldest supported version and the newest
shipped); submit and status talk to the loopback API server of tests/fakeapi.py through the real
kubernetes client (no Kubernetes API server can run on these machines); the trainer reads its cell from
a real store.
"""

from __future__ import annotations

import copy
import json
import time

import kubernetes_validate
import pytest

from critbatch.jobs import cli
from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.cell.layout import success_key
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.cell.sweepfile import cell_in_class, class_digest
from critbatch.jobs.store import open_store
from critbatch.jobs.backends import k8s
from critbatch.jobs.cluster import indexed, status, submit
from critbatch.jobs.sweep import render
from critbatch.jobs.sweep.grid import MAX_CELLS, load_grid, max_sweep_length, preset_names
from critbatch.jobs.cluster.markers import MarkerBook
from factories import KUBE_VERSION
from fakeapi import JOBS, PODS

SPEC = {
    "sweep": "idx",
    "dataset": {"name": "cifar10"},
    "model": "resnet34",
    "strategy": ["blr", "lsr"],
    "base_lr": 0.1,
    "base_batch": 64,
    "epochs": 1,
    "batch_size": [64, 128, 4096],  # on 16 GiB GPUs: 64 and 128 on one, 4096 on four
    "resources": {"gpus": 4, "cpu": 16, "memory": "64Gi", "shm": "16Gi", "gpu_memory": "16Gi"},
    "store": "s3://critbatch/runs",
    "image": "registry.example/critbatch:1.0",
    "backend": "indexed",
    "max_active": 3,
}


def grid(**changes):
    spec = copy.deepcopy(SPEC)
    spec.update(changes)
    return load_grid(spec)


def objects(g):
    return [d.obj for d in render.render_documents(g, analysis=False)]


# ---- the rendered Jobs -----------------------------------------------------------------------------------


def test_one_indexed_job_per_resource_class():
    g = grid()
    jobs = objects(g)
    classes = g.resource_classes()
    assert list(classes) == ["1gpu", "4gpu"]
    assert [j["metadata"]["name"] for j in jobs] == ["critbatch-idx-1gpu", "critbatch-idx-4gpu"]
    for job, (name, (placement, cells)) in zip(jobs, classes.items()):
        spec = job["spec"]
        assert spec["completionMode"] == "Indexed"
        assert spec["completions"] == len(cells) == {"1gpu": 4, "4gpu": 2}[name]
        assert spec["parallelism"] == min(3, len(cells))
        assert spec["backoffLimitPerIndex"] == 6 and "backoffLimit" not in spec
        assert spec["maxFailedIndexes"] == 1
        assert spec["activeDeadlineSeconds"] == 7 * 24 * 3600 * -(-len(cells) // 3)  # a deadline per wave of 3
        rules = spec["podFailurePolicy"]["rules"]
        assert [r["action"] for r in rules] == ["Ignore", "FailIndex"]
        assert rules[1]["onExitCodes"]["values"] == list(k8s.EXIT_CODES_PERMANENT)  # bad configuration, no GPU
        pod = spec["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == placement.gpus
        args = container["args"]
        assert args[1] == f"--nproc-per-node={placement.gpus}"
        at = args.index("--cell-from-sweep")
        assert args[at: at + 6] == ["--cell-from-sweep", "idx", "--resource-class", name,
                                    "--sweep-digest", class_digest([c.id for c in cells])]
        assert "--cell" not in args
        assert job["metadata"]["labels"][k8s.LABEL_RESOURCE_CLASS] == name
        assert k8s.LABEL_CELL not in job["metadata"]["labels"]


@pytest.mark.parametrize("version", [KUBE_VERSION, kubernetes_validate.latest_version()])
def test_indexed_jobs_validate_strictly(version):
    for job in objects(grid(queue="research")):
        kubernetes_validate.validate(job, version, strict=True)


@pytest.mark.slow
def test_every_one_node_preset_renders_as_indexed_jobs():
    for name in preset_names():
        g = load_grid(name).with_overrides(store="s3://critbatch/runs")
        if g.resources.nodes != 1:
            continue
        jobs = objects(g.with_overrides(backend="indexed"))
        assert sum(j["spec"]["completions"] for j in jobs) == len(g.cells())
        for job in jobs:
            kubernetes_validate.validate(job, KUBE_VERSION, strict=True)


def test_parallelism_defaults_to_all_and_max_failed_cells_is_honoured():
    jobs = objects(grid(max_active=0, resources={**SPEC["resources"], "max_failed_cells": 2}))
    assert [(j["spec"]["parallelism"], j["spec"]["maxFailedIndexes"]) for j in jobs] == [(4, 2), (2, 2)]


def test_indexed_runs_on_one_node():
    with pytest.raises(ConfigError, match=r"^backend: 'indexed' runs on one node, but resources.nodes is 2"):
        grid(resources={**SPEC["resources"], "nodes": 2})


def test_longest_sweep_keeps_the_pods_hostnames_within_63():
    g = grid(sweep="s" * max_sweep_length("indexed", 1), resources={**SPEC["resources"], "gpus": 16})
    for job in objects(g):
        assert len(f"{job['metadata']['name']}-{MAX_CELLS - 1}") <= 63


def test_render_cell_refuses_the_indexed_backend():
    g = grid()
    with pytest.raises(ConfigError, match="renders one Job per resource class"):
        render.render_cell(g, g.cells()[0])


# ---- sweep.yaml: the cell of an index ----------------------------------------------------------------------


def test_each_index_reads_its_cell_from_sweep_yaml():
    g = grid()
    text = g.sweep_yaml()
    for name, (_, cells) in g.resource_classes().items():
        digest = class_digest([c.id for c in cells])
        for i, cell in enumerate(cells):
            entry = cell_in_class(text, "sweep.yaml", name, i, digest)
            read = Cell.from_dict(entry["cell"])
            assert read.id == entry["id"] == cell.id and read.to_json() == cell.to_json()
            assert entry["plan"]["resource_class"] == name


@pytest.mark.parametrize("resource_class, index, digest, message", [
    ("1gpu", 0, "0" * 12, r"^--sweep-digest: the cells of class '1gpu' in sweep.yaml \(digest \w{12}\) are not"),
    ("1gpu", 4, None, r"^--index: 4 is outside class '1gpu', which has 4 cells"),
    ("8gpu", 0, None, r"^--resource-class: sweep.yaml has no class '8gpu'; it has 1gpu, 4gpu"),
])
def test_a_sweep_yaml_that_does_not_match_is_refused(resource_class, index, digest, message):
    g = grid()
    ids = [c.id for c in g.resource_classes()["1gpu"][1]]
    with pytest.raises(ConfigError, match=message):
        cell_in_class(g.sweep_yaml(), "sweep.yaml", resource_class, index, digest or class_digest(ids))


DIGITS = {
    "sweep": "idxd", "dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "blr", "base_lr": 0.1,
    "base_batch": 16, "epochs": 1, "batch_size": [16, 32], "max_steps": 3, "eval": {"points": 2},
    "noise": {"every": 0}, "resources": {"gpus": 0, "cpu": 1, "memory": "2Gi"}, "backend": "indexed",
}


def test_train_picks_its_cell_by_job_completion_index(tmp_path, monkeypatch, cpu_env, capsys):
    url = str(tmp_path / "store")
    g = load_grid({**DIGITS, "store": url})
    store = open_store(url)
    args = ["train", "--cell-from-sweep", "idxd", "--resource-class", "cpu", "--store", url, "--progress", "none",
            "--sweep-digest", class_digest(g.cell_ids())]
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    assert cli.main(args) == 2
    assert "--index: not given, and JOB_COMPLETION_INDEX is ''" in capsys.readouterr().err
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    assert cli.main(args) == 2  # no sweep.yaml yet
    assert f"no sweep.yaml at {store.join('idxd/sweep.yaml')}" in capsys.readouterr().err
    store.put_text("idxd/sweep.yaml", g.sweep_yaml())
    assert cli.main(args) == 0
    cells = g.cells()
    assert store.exists(success_key("idxd", cells[1].id)) and not store.exists(success_key("idxd", cells[0].id))
    assert cli.main(args[:-1] + ["0" * 12]) == 2  # a digest of other cells


# ---- submit and status against the API server -----------------------------------------------------------------


def indexed_grid(**changes):
    return load_grid({**DIGITS, "store": "s3://critbatch/runs", "image": "registry.example/critbatch:1.0",
                      "batch_size": [16, 32, 64], "max_active": 2, **changes})


def test_submit_creates_one_job_per_class_once(api_server, cluster, store):
    g = indexed_grid()
    report = submit.submit_once(g, cluster, store, max_active=2)  # the cap submit passes: --max-active or the grid's
    assert report.created == ["cpu"]
    assert list(api_server.jobs()) == ["critbatch-idxd-cpu"]
    job = api_server.jobs()["critbatch-idxd-cpu"]
    assert (job["spec"]["completions"], job["spec"]["parallelism"], job["spec"]["suspend"]) == (3, 2, False)
    again = submit.submit_once(g, cluster, store)
    assert again.created == [] and len(api_server.creates()) == 1
    assert not again.finished


def test_with_a_kueue_queue_the_job_waits_suspended_for_admission(api_server, cluster, store):
    submit.submit_once(indexed_grid(queue="research"), cluster, store)
    assert api_server.jobs()["critbatch-idxd-cpu"]["spec"]["suspend"] is True


def test_status_reads_every_cell_from_the_completed_and_failed_indexes(api_server, cluster, store):
    g = indexed_grid()
    submit.submit_once(g, cluster, store)
    ids = g.cell_ids()
    job = api_server.jobs()["critbatch-idxd-cpu"]
    job["status"] = {"completedIndexes": "0", "failedIndexes": "2", "active": 1}
    api_server.add_pod(ids[1], "critbatch-idxd-cpu-1-abcde", phase="Running")
    pod = api_server.objects["/api/v1/namespaces/critbatch/pods"]["critbatch-idxd-cpu-1-abcde"]
    pod["metadata"]["labels"] = {k8s.LABEL_SWEEP: "idxd", k8s.LABEL_COMPONENT: k8s.COMPONENT_CELL,
                                 k8s.LABEL_RESOURCE_CLASS: "cpu", indexed.POD_INDEX_LABEL: "1"}
    before = len(api_server.requests)
    jobs = cluster.list("Job", k8s.cell_selector("idxd"))
    views, pods = indexed.index_views(g, jobs, cluster.list("Pod", k8s.cell_selector("idxd")))
    assert [r for r in api_server.requests[before:] if r[1] == JOBS] == [("GET", JOBS)]  # one LIST of the Jobs
    rows = status.cell_states(g, MarkerBook(store, "idxd").read(), views, pods)
    # Index 0 succeeded, its _SUCCESS not (yet) in the store; index 1's pod runs; index 2 failed.
    assert [(r["cluster"], r["state"]) for r in rows] == [("succeeded", "running"), ("running", "running"),
                                                         ("failed", "failed")]
    assert rows[2]["why"] == "FailedIndex: index 2 of critbatch-idxd-cpu failed"
    report = submit.submit_once(g, cluster, store)
    assert list(report.failed) == [ids[2]]
    assert MarkerBook(store, "idxd").read().failed[ids[2]]["reason"].startswith("FailedIndex")


def index_pod(api_server, cell_id, index, phase, finished_at=None):
    """A pod of the class Job's index as the Job controller labels it, Succeeded pods with their end time."""
    name = f"critbatch-idxd-cpu-{index}-abcde"
    api_server.add_pod(cell_id, name, phase=phase)
    pod = api_server.objects[PODS][name]
    pod["metadata"]["labels"] = {k8s.LABEL_SWEEP: "idxd", k8s.LABEL_COMPONENT: k8s.COMPONENT_CELL,
                                 k8s.LABEL_RESOURCE_CLASS: "cpu", indexed.POD_INDEX_LABEL: str(index)}
    if finished_at:
        pod["status"]["containerStatuses"] = [{"name": "critbatch", "state": {"terminated": {
            "exitCode": 0, "reason": "Completed", "finishedAt": finished_at}}}]


def test_a_completed_index_without_its_success_is_lost_after_the_grace(api_server, cluster, store):
    g = indexed_grid()
    submit.submit_once(g, cluster, store)
    ids = g.cell_ids()
    api_server.jobs()["critbatch-idxd-cpu"]["status"] = {"completedIndexes": "0-1", "active": 1}
    long_ago = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 2 * submit.LOST_GRACE_SECONDS))
    just_now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    index_pod(api_server, ids[0], 0, "Succeeded", long_ago)
    index_pod(api_server, ids[1], 1, "Succeeded", just_now)
    report = submit.submit_once(g, cluster, store)
    assert list(report.lost) == [ids[0]] and report.uploading == [ids[1]] and not report.finished
    views, pods = indexed.index_views(g, cluster.list("Job", k8s.cell_selector("idxd")),
                                      cluster.list("Pod", k8s.cell_selector("idxd")))
    rows = status.cell_states(g, MarkerBook(store, "idxd").read(), views, pods)
    assert [r["state"] for r in rows] == ["lost", "running", "pending"]


def test_a_class_job_that_creates_no_pod_names_the_reason_for_each_of_its_cells(api_server, cluster, store):
    g = indexed_grid()
    submit.submit_once(g, cluster, store)
    message = ('pods "critbatch-idxd-cpu-0-" is forbidden: error looking up service account critbatch/critbatch: '
               'serviceaccount "critbatch" not found')
    api_server.add_event("Job", "critbatch-idxd-cpu", "FailedCreate", message)
    report = submit.submit_once(g, cluster, store)
    assert report.stalled == {c: ("FailedCreate", message, "Job critbatch-idxd-cpu") for c in g.cell_ids()}


def test_a_failed_job_fails_its_unfinished_indexes_and_finishes_the_sweep(api_server, cluster, store):
    g = indexed_grid()
    submit.submit_once(g, cluster, store)
    ids = g.cell_ids()
    api_server.jobs()["critbatch-idxd-cpu"]["status"] = {
        "completedIndexes": "0-1", "conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                                                   "message": "Job was active longer than specified deadline"}]}
    for cell_id in ids[:2]:
        store.put_text(success_key("idxd", cell_id), json.dumps({"status": "done"}))
    report = submit.submit_once(g, cluster, store)
    assert report.finished and list(report.failed) == [ids[2]]
    assert report.failed[ids[2]].startswith("DeadlineExceeded: Job was active longer")
    assert report.analysis.startswith("held: 1 cells failed")


def test_retry_failed_creates_the_class_job_anew(api_server, cluster, store):
    g = indexed_grid()
    submit.submit_once(g, cluster, store)
    api_server.jobs()["critbatch-idxd-cpu"]["status"] = {"completedIndexes": "0-1", "failedIndexes": "2"}
    submit.submit_once(g, cluster, store)
    report = submit.submit_once(g, cluster, store, retry_failed=True)
    assert report.retried == [g.cell_ids()[2]] and report.created == ["cpu"]
    assert "status" not in api_server.jobs()["critbatch-idxd-cpu"]
    assert not MarkerBook(store, "idxd").read().failed


@pytest.mark.parametrize("text, expect", [("", set()), ("3", {3}), ("0-2,5,7-8", {0, 1, 2, 5, 7, 8})])
def test_index_sets(text, expect):
    assert indexed.indexes(text) == expect
