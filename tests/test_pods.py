"""The rendered pods, run: each backend's worker container executed as a kubelet would (tests/podrun.py).

For every backend, the cell's object is rendered from a grid, its worker pod's container started with its
own command, args and env (store credentials from k8s/store-secret.example.yaml through secretKeyRef,
HOME and the scratch directories where the manifest mounts them) against the loopback SeaweedFS server,
with a CIFAR-10-format dataset staged the README's way (``critbatch data stage``). Each test then asks
the object's own failure policy what it makes of the exit code:

    good cell               exit 0     succeeded
    bad cell                exit 2     failed at once (Job FailJob, PyTorchJob 1-127, TrainJob FailJobSet)
    GPU pod, no GPU         exit 4     failed at once
    SIGTERM mid-run         exit 143   retried (uncounted if the pod was disrupted); the retried pod resumes
                                       and every step is logged exactly once
    store outage            exit 202   retried; once the store is back, the retried pod finishes

With ``CRITBATCH_POD_IMAGE`` set (tests/image/run_image_test.sh does, after building the image) each
container runs in that image under docker, with the pod's own security context, instead of on this
machine's filesystem.

``job-2-processes`` is the Job's pod of a two-GPU cell with its two processes on the CPU (gloo): the one
case where the launcher goes through torch.distributed.run, run where that path differs (a worker's code
passed on, SIGTERM forwarded to the workers). A retry after the outage starts as a fresh pod (nothing of
the cell was written), which the good cell shows. No operator runs in the tests (tests/test_cluster.py
runs Jobs on a real control plane): what the operators and controllers do is modelled in podrun.py from their sources, and the objects are checked against their
schemas in test_render.py.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from datafiles import write_cifar10
from podrun import CreateContainerConfigError, outcome, secrets_from, worker_pod
from relay import Link

from critbatch.jobs.local.s3server import S3Server
from critbatch.jobs.cell.errors import ExitCode
from critbatch.jobs.cell.layout import cell_prefix, success_key
from critbatch.jobs.cell.logschema import ipc_to_table
from critbatch.jobs.cli import main as cli
from critbatch.jobs.store import open_store
from critbatch.jobs import backends
from critbatch.jobs.backends import k8s
from critbatch.jobs.sweep import render
from critbatch.jobs.sweep.grid import load_grid

pytestmark = [pytest.mark.s3, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RUNTIME = yaml.safe_load((REPO / "k8s/trainer/clustertrainingruntime.yaml").read_text())
SECRETS = secrets_from(REPO / "k8s/store-secret.example.yaml")
#: The node's environment beyond the manifest: one CPU thread per process (this machine's cores are
#: shared) and, for the GPU pod, a driver that shows no device.
NODE_ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
#: Every backend; ``indexed`` renders one Indexed Job per resource class, each pod choosing its cell by index.
BACKENDS = ["job", "pytorchjob", "trainjob", "indexed"]
#: The image to run each container in (docker, the pod's security context); unset: on this machine.
IMAGE = os.environ.get("CRITBATCH_POD_IMAGE") or None
DOCKER = tuple(shlex.split(os.environ.get("CRITBATCH_DOCKER", "docker")))
TOTAL = 40  # steps of the cell that is stopped part-way


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A SeaweedFS server of this module's own: other modules stop, restart and fill the session's one, and a
    pod's view of the store must not depend on what ran before it."""
    server = S3Server(tmp_path_factory.mktemp("seaweedfs-pods"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """The store as the pods see it (behind a Link), with CIFAR-10 staged the README's way."""
    link = Link(s3_server.port)
    store = f"s3://pods-{uuid.uuid4().hex[:8]}/runs"
    source = write_cifar10(tmp_path_factory.mktemp("cifar10"))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        open_store(store).check()
        assert cli(["data", "stage", "cifar10", "--from", str(source), "--store", store]) == 0
    yield {"store": store, "link": link, "env": s3_server.env()}
    link.cut()


def grid_for(cluster, backend: str, scenario: str, **changes):
    spec = {
        "sweep": f"{backend.replace('-processes', 'p')}-{scenario}",
        "dataset": {"name": "cifar10"}, "model": "mobilenetv2", "model_options": {"width_mult": 0.25},
        "strategy": "blr", "base_lr": 0.01, "base_batch": 4, "batch_size": 4, "epochs": 100, "max_steps": 4,
        "eval": {"points": 2, "train_subset": 8},
        "resources": {"gpus": 0, "cpu": 1, "memory": "2Gi", "grace_seconds": 60},
        "store": cluster["store"], "store_endpoint": cluster["link"].url,
        "backend": "job" if backend == "job-2-processes" else backend,
        "image": "registry.example/critbatch:test",
    }
    spec.update(changes)
    return load_grid(spec)


def rendered(grid, backend: str, store) -> tuple[dict, object]:
    """The cell's object as rendered and the cell; ``job-2-processes``: its pod runs two processes;
    ``indexed``: its class's Indexed Job, the cell at index 0, sweep.yaml written first (as submit does)."""
    (cell,) = grid.cells()
    if backend == "indexed":
        (doc,) = render.render_indexed(grid)
        store.put_text(f"{grid.sweep}/sweep.yaml", grid.sweep_yaml())
        return doc.obj, cell
    obj = render.render_cell(grid, cell)
    if backend == "job-2-processes":
        obj = copy.deepcopy(obj)
        container = obj["spec"]["template"]["spec"]["containers"][0]
        assert "--nproc-per-node=1" in container["args"]
        container["args"] = ["--nproc-per-node=2" if a == "--nproc-per-node=1" else a for a in container["args"]]
    return obj, cell


def start(obj, tmp_path: Path, name: str):
    return worker_pod(obj, runtime=RUNTIME).start(tmp_path / name, secrets=SECRETS, node_env=NODE_ENV, image=IMAGE,
                                                  docker=DOCKER)


def step_rows(store, prefix: str) -> list[int]:
    tables = [ipc_to_table(store.get_bytes(k)) for k in store.list(f"{prefix}/steps/")]
    return sorted(pa.concat_tables(tables).column("step").to_pylist()) if tables else []


@pytest.fixture
def store(cluster, monkeypatch):
    """The store as this test reads it (directly, not through the Link)."""
    for key, value in cluster["env"].items():
        monkeypatch.setenv(key, value)
    return open_store(cluster["store"])


def assert_finished(store, cell, steps: int) -> None:
    prefix = cell_prefix(cell.sweep, cell.id)
    assert json.loads(store.get_text(success_key(cell.sweep, cell.id)))["status"] == "done"
    assert step_rows(store, prefix) == list(range(1, steps + 1)), "every step logged exactly once"
    assert store.exists(f"{prefix}/model.pt") and store.list(f"{prefix}/checkpoint/") == []


def test_every_backend_is_run_here_and_runs_the_launcher():
    """A backend added to critbatch.jobs.backends needs its case here (and its operator in podrun.py)."""
    assert set(BACKENDS) == set(backends.NAMES)
    spec = {"sweep": "x", "dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "blr", "base_lr": 0.1,
            "base_batch": 8, "batch_size": 8, "epochs": 1}
    for backend in BACKENDS:
        grid = load_grid({**spec, "backend": backend})
        obj = render.render_indexed(grid)[0].obj if backend == "indexed" else render.render_cell(grid, grid.cells()[0])
        assert worker_pod(obj, runtime=RUNTIME).container["command"] == list(k8s.LAUNCH_COMMAND), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_good_cell_succeeds(cluster, store, backend, tmp_path):
    obj, cell = rendered(grid_for(cluster, backend, "good"), backend, store)
    run = start(obj, tmp_path, "pod")
    code = run.wait()
    assert code == 0, run.output[-3000:]
    assert outcome(obj, code, runtime=RUNTIME).verdict == "succeeded"
    assert_finished(store, cell, 4)
    assert run.stray_files() == [], "wrote outside its volumes"


@pytest.mark.parametrize("backend", BACKENDS + ["job-2-processes"])
def test_bad_cell_fails_at_once(cluster, store, backend, tmp_path):
    obj, cell = rendered(grid_for(cluster, backend, "bad", batch_size=128), backend, store)  # the staged set has 100
    run = start(obj, tmp_path, "pod")
    code = run.wait()
    assert code == ExitCode.CONFIG, run.output[-3000:]
    assert "cell.batch_size: 128 is larger than the training set (100 examples)" in run.output
    result = outcome(obj, code, runtime=RUNTIME)
    assert (result.verdict, result.counted) == ("failed", False), result.why
    assert not store.exists(success_key(cell.sweep, cell.id))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_pod_without_a_usable_gpu_fails_at_once(cluster, store, backend, tmp_path):
    grid = grid_for(cluster, backend, "gpu", resources={"gpus": 1, "cpu": 1, "memory": "2Gi"})
    obj, _ = rendered(grid, backend, store)
    run = start(obj, tmp_path, "pod")
    code = run.wait()
    assert code == ExitCode.NO_DEVICE, run.output[-3000:]
    assert "--device cuda: torch" in run.output and "sees no CUDA device" in run.output
    assert outcome(obj, code, runtime=RUNTIME).verdict == "failed"


@pytest.mark.parametrize("backend", BACKENDS + ["job-2-processes"])
def test_sigterm_is_retried_and_the_retry_resumes(cluster, store, backend, tmp_path):
    obj, cell = rendered(grid_for(cluster, backend, "sigterm", max_steps=TOTAL), backend, store)
    first = start(obj, tmp_path, "first")
    first.wait_for("device cpu, precision")  # the trainer's banner: training starts
    time.sleep(0.3)  # every rank past its SIGTERM handler (rank 0 prints the banner after a barrier)
    code = first.terminate()
    assert code == ExitCode.PREEMPTED, first.output[-3000:]
    stopped = int(first.output.split("stopped at step ")[1].split()[0])
    assert 0 < stopped < TOTAL
    evicted, deleted = outcome(obj, code, disrupted=True, runtime=RUNTIME), outcome(obj, code, runtime=RUNTIME)
    assert evicted.verdict == deleted.verdict == "retried", (evicted.why, deleted.why)
    # A preemption or eviction (DisruptionTarget) uses up no retry where the policy can see it.
    assert evicted.counted is (backend == "pytorchjob")

    second = start(obj, tmp_path, "second")
    code = second.wait()
    assert code == 0, second.output[-3000:]
    assert f"resumed from the checkpoint at step {stopped}" in second.output
    assert_finished(store, cell, TOTAL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_outage_is_retried(cluster, store, backend, tmp_path):
    obj, cell = rendered(grid_for(cluster, backend, "outage"), backend, store)
    cluster["link"].cut()
    try:
        run = start(obj, tmp_path, "during")
        code = run.wait()
    finally:
        cluster["link"].restore()
    assert code == ExitCode.STORE_UNAVAILABLE, run.output[-3000:]
    assert "store unreachable" in run.output
    result = outcome(obj, code, runtime=RUNTIME)
    assert (result.verdict, result.counted) == ("retried", True), result.why
    assert store.list(cell_prefix(cell.sweep, cell.id) + "/") == [], "the retry starts afresh"


def test_a_missing_secret_key_starts_no_container(cluster, store, tmp_path):
    obj, _ = rendered(grid_for(cluster, "job", "secret"), "job", store)
    broken = {name: {k: v for k, v in data.items() if k != "AWS_SECRET_ACCESS_KEY"} for name, data in SECRETS.items()}
    with pytest.raises(CreateContainerConfigError, match="no key 'AWS_SECRET_ACCESS_KEY' in 'critbatch-store'"):
        worker_pod(obj, runtime=RUNTIME).start(tmp_path / "pod", secrets=broken, node_env=NODE_ENV)
    assert not (tmp_path / "pod" / "workdir").exists(), "no process was started"


def test_in_an_image_the_container_gets_the_pods_security_context(cluster, store):
    """What tests/image runs: ``docker run`` flags read from the manifest, not written beside it."""
    obj, _ = rendered(grid_for(cluster, "job", "docker"), "job", store)
    pod = worker_pod(obj, runtime=RUNTIME)
    env = pod.env(SECRETS, {})
    argv = pod.docker_run("critbatch:test", "c1", env)
    flags = " ".join(argv[:argv.index("--entrypoint")])
    assert f"--user {k8s.RUN_AS_USER}:{k8s.RUN_AS_GROUP} --read-only --cap-drop ALL --security-opt no-new-privileges" \
        in flags
    assert "--shm-size 8Gi" in flags
    assert {f"--tmpfs {path}:rw,nosuid,nodev,mode=1777" for _, path, _ in k8s.SCRATCH_DIRS} <= \
        {" ".join(argv[i:i + 2]) for i in range(len(argv) - 1)}
    assert f"-e AWS_SECRET_ACCESS_KEY={SECRETS['critbatch-store']['AWS_SECRET_ACCESS_KEY']}" in flags
    assert "-e HOME=/home/critbatch" in flags  # the image's own paths, not a sandbox's
    assert argv[argv.index("--entrypoint") + 1:][:4] == ["python", "critbatch:test", "-m", "critbatch.jobs.train.launch"]
