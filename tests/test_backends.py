"""The backends as objects: each one's failure-policy table against what its rendered object's policy does
(read as its controller reads it, tests/podrun.py), against the README's table, and its status reader,
suspend patch and name budget against what its objects and controller look like."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from podrun import outcome

from critbatch.jobs import backends
from critbatch.jobs.backends import k8s
from critbatch.jobs.cell.errors import ConfigError, ExitCode
from critbatch.jobs.sweep import render
from critbatch.jobs.sweep.grid import MAX_CELLS, load_grid

REPO = Path(__file__).resolve().parents[1]
RUNTIME = yaml.safe_load((REPO / "k8s/trainer/clustertrainingruntime.yaml").read_text())

SPEC = {
    "sweep": "bk", "dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "blr", "base_lr": 0.1,
    "base_batch": 16, "epochs": 1, "batch_size": [16, 32], "store": "s3://critbatch/runs",
    "resources": {"gpus": 0, "cpu": 1, "memory": "1Gi", "shm": "64Mi", "backoff_limit": 3},
}


def rendered(backend: backends.Backend, **changes) -> dict:
    """The first object a small grid renders as ``backend`` (two nodes where the backend spans nodes)."""
    spec = copy.deepcopy(SPEC)
    if backend.max_nodes is None:
        spec["resources"]["nodes"] = 2
    spec.update(changes, backend=backend.name)
    return render.render_documents(load_grid(spec), analysis=False)[0].obj


def merge_patch(target: dict, patch: dict) -> dict:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = value
    return target


def test_the_registry():
    assert backends.NAMES == ("job", "pytorchjob", "trainjob", "indexed")
    for name, backend in backends.REGISTRY.items():
        assert backend.name == name and backends.get(name) is backend
        assert (REPO / "k8s/templates" / backend.template).is_file()
        assert backend.api_version == rendered(backend)["apiVersion"] and backend.kind == rendered(backend)["kind"]
        assert set(backend.failure_policy) == set(backends.EXIT_CODES)
    assert backends.by_kind("Job") is backends.JOB and backends.by_kind("TrainJob") is backends.TRAINJOB
    assert [b.name for b in backends.REGISTRY.values() if b.legacy] == ["pytorchjob"]
    assert backends.help_text() == "job, pytorchjob (legacy), trainjob, indexed"


@pytest.mark.parametrize("name", backends.NAMES)
@pytest.mark.parametrize("code", backends.EXIT_CODES)
def test_failure_policy_table_is_what_the_rendered_policy_does(name, code):
    backend = backends.get(name)
    obj = rendered(backend)
    expected = backend.failure_policy[code]
    got = outcome(obj, code, runtime=RUNTIME)
    assert (got.verdict, got.counted) == (expected.verdict, expected.counted), got.why
    if expected.counted_if_disrupted is not None:
        got = outcome(obj, code, disrupted=True, runtime=RUNTIME)
        assert (got.verdict, got.counted) == ("retried", expected.counted_if_disrupted), got.why


def _readme_exit_table() -> tuple[list[str], dict[int, list[str]]]:
    lines = (REPO / "README.md").read_text().split("### Exit codes", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[start:end]]
    header, body = rows[0], rows[2:]
    table = {}
    for row in body:
        for code in re.findall(r"\d+", row[0]):
            table[int(code)] = row
    return header, table


def _read_cell(text: str) -> tuple[str, bool, bool | None]:
    """(verdict, counted, counted if disrupted) as a README cell words it."""
    if text.startswith(("complete", "succeeded")):
        return "succeeded", False, None
    if "failed" in text:
        return "failed", False, None
    assert text.startswith("retried"), text
    if "not counted" in text:  # "retried, not counted when the pod has ... DisruptionTarget ..., else counted"
        return "retried", True, False
    return "retried", "counted" in text, None


def test_the_readme_exit_code_table_is_the_backends_tables():
    header, table = _readme_exit_table()
    columns = {b.name: next(i for i, h in enumerate(header) if h.startswith(b.kind) and "Indexed" not in h)
               for b in backends.REGISTRY.values() if b.per_cell}
    assert set(table) == set(backends.EXIT_CODES)
    for name, column in columns.items():
        backend = backends.get(name)
        for code, row in table.items():
            reaction = backend.failure_policy[code]
            assert _read_cell(row[column]) == (reaction.verdict, reaction.counted, reaction.counted_if_disrupted), \
                (name, code, row[column])


def test_the_readme_exit_code_table_is_the_enum():
    """Each row of the README's table is one ExitCode a pod can end with, with its meaning (Markdown's backticks
    aside); the Job fails at once exactly on the permanent ones, retries every other failure."""
    header, table = _readme_exit_table()
    meaning, job = header.index("meaning"), next(i for i, h in enumerate(header) if h.startswith("Job"))
    assert list(table) == [c for c in ExitCode if c.in_pod]
    for value, row in table.items():
        code = ExitCode(value)
        assert row[meaning].replace("`", "") == code.meaning, code.name
        verdict = _read_cell(row[job])[0]
        assert verdict == ("succeeded" if code.retryable is None else "failed" if code.permanent else "retried")
    # Why the numbers: every retryable code of the trainer's own is >= 128, which the PyTorchJob retries.
    assert all(c >= 128 for c in ExitCode if c.retryable and c not in (ExitCode.CRASH,))


@pytest.mark.parametrize("name", backends.NAMES)
def test_suspend_patch_and_flag(name):
    backend = backends.get(name)
    obj = rendered(backend)
    assert not backend.is_suspended(obj)
    patched = merge_patch(copy.deepcopy(obj), backend.suspend_patch(True))
    assert patched == backend.set_suspend(copy.deepcopy(obj), True) and backend.is_suspended(patched)
    assert backend.state(patched) == "suspended"
    assert not backend.is_suspended(merge_patch(patched, backend.suspend_patch(False)))


def condition(kind, reason="", message=""):
    return {"type": kind, "status": "True", "reason": reason, "message": message}


# What each controller writes into its object's status, and what the backend's reader makes of it.
STATUSES = [
    ("job", {"active": 1}, "running"),
    ("job", {"conditions": [condition("SuccessCriteriaMet")]}, "succeeded"),
    ("job", {"conditions": [condition("SuccessCriteriaMet"), condition("Complete")]}, "succeeded"),
    ("job", {"conditions": [condition("FailureTarget", "PodFailurePolicy", "exit 2")]}, "failed"),
    ("job", {"conditions": [condition("Suspended", "JobSuspended")]}, "suspended"),
    ("job", {}, "created"),
    ("pytorchjob", {"conditions": [condition("Created"), condition("Running")]}, "running"),
    ("pytorchjob", {"conditions": [condition("Restarting")]}, "running"),
    ("pytorchjob", {"conditions": [condition("Succeeded")]}, "succeeded"),
    ("pytorchjob", {"active": 1}, "created"),  # a PyTorchJob has no status.active: its conditions say it
    ("trainjob", {"jobsStatus": [{"name": "node", "active": 0, "ready": 2}]}, "running"),
    ("trainjob", {"conditions": [condition("Complete", "JobsCompleted")]}, "succeeded"),
    ("trainjob", {"conditions": [condition("Running")]}, "created"),  # not a TrainJob condition
]


@pytest.mark.parametrize("name,status,state", STATUSES)
def test_status_readers(name, status, state):
    backend = backends.get(name)
    obj = rendered(backend)
    obj["status"] = status
    assert backend.state(obj) == state


def test_failure_reads_the_failed_condition_first_then_the_target():
    obj = {"status": {"conditions": [condition("FailureTarget", "PodFailurePolicy", "target"),
                                     condition("Failed", "PodFailurePolicy", "Container critbatch exited with 2")]}}
    assert backends.JOB.failure(obj) == "PodFailurePolicy: Container critbatch exited with 2"
    del obj["status"]["conditions"][1]
    assert backends.JOB.failure(obj) == "PodFailurePolicy: target"
    assert backends.PYTORCHJOB.state(obj) == "created"  # FailureTarget is the Job controller's alone


@pytest.mark.parametrize("name,nodes,suffix", [("job", 1, ""), ("indexed", 1, f"-{MAX_CELLS - 1}"),
                                               ("pytorchjob", 1, "-master-0"), ("pytorchjob", 12, "-worker-10"),
                                               ("trainjob", 16, "-node-0-15")])
def test_name_budget_is_the_longest_suffix_the_controller_appends(name, nodes, suffix):
    assert backends.get(name).name_budget(nodes, MAX_CELLS) == len(suffix)
    assert k8s.MAX_NAME == 63


def test_trainjob_runtime_keeps_replicated_job_names_within_trainer_limit():
    """Kubeflow Trainer v2.4 refuses a runtime whose ReplicatedJob names exceed 20 characters."""
    names = [rj["name"] for rj in RUNTIME["spec"]["template"]["spec"]["replicatedJobs"]]
    assert backends.TRAINJOB.replicated_job in names
    assert all(len(n) <= backends.TRAINJOB.max_replicated_job_name == 20 for n in names), names
    obj = rendered(backends.TRAINJOB)
    patched = obj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert [rj["name"] for rj in patched] == [backends.TRAINJOB.replicated_job]


def test_trainjob_is_the_multi_node_default_and_pytorchjob_legacy(capsys):
    spec = copy.deepcopy(SPEC)
    spec["resources"]["nodes"] = 2
    assert load_grid(spec).backend == "trainjob" and load_grid(SPEC).backend == "job"
    from critbatch.jobs.cli import main

    with pytest.raises(SystemExit, match="0"):
        main(["render", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "pytorchjob (legacy)" in text and "trainjob for several" in text


def test_kueue_labels_on_the_object_not_its_pods():
    obj = rendered(backends.JOB, queue="team-a", workload_priority_class="sweep-low")
    labels = obj["metadata"]["labels"]
    assert labels[k8s.LABEL_QUEUE] == "team-a" and labels["kueue.x-k8s.io/priority-class"] == "sweep-low"
    assert "kueue.x-k8s.io/priority-class" not in obj["spec"]["template"]["metadata"]["labels"]
    for backend in backends.REGISTRY.values():
        assert rendered(backend, queue="q", workload_priority_class="p")["metadata"]["labels"][
            k8s.LABEL_WORKLOAD_PRIORITY] == "p"
    with pytest.raises(ConfigError, match=r"^workload_priority_class: 'sweep-low' is a Kueue WorkloadPriorityClass"):
        load_grid({**SPEC, "workload_priority_class": "sweep-low"})
