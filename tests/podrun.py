"""Run a rendered object's worker pod the way a kubelet would, and read its exit code the way its controller does.

    pod = worker_pod(obj, runtime=RUNTIME)          # a Job, PyTorchJob, TrainJob or Indexed Job, as rendered
    run = pod.start(tmp_path / "pod", secret=SECRET)
    code = run.wait(timeout=300)
    assert outcome(obj, code, runtime=RUNTIME).verdict == "failed"

Without an API server (tests/kube runs one, with a kubelet that starts its pods through Pod.start), this
file stands in for the parts between the manifest and the process, and nothing else:

- what the operator adds to the pod: the Training Operator's MASTER_* / PET_* / WORLD_SIZE / RANK
  variables (kubeflow/training-operator v1.9, pytorch/envvar.go), Kubeflow Trainer's PET_* variables
  and the container it assembles from the ClusterTrainingRuntime, the TrainJob's ``spec.trainer`` and
  its runtime patch (kubeflow/trainer v2.3, plugins/torch), an Indexed Job's JOB_COMPLETION_INDEX;
- what the kubelet does with the container: env values, and ``secretKeyRef`` resolved from a Secret
  manifest (a missing Secret or key is CreateContainerConfigError, as on a node), ``$(VAR)`` in command
  and args expanded from that env, each ``emptyDir`` mount a fresh directory, SIGTERM to the container's
  process and SIGKILL after ``terminationGracePeriodSeconds``, a signal death reported as 128 + N;
- the controllers' reading of that exit code (:func:`outcome`): the Job's podFailurePolicy and
  backoffLimit (backoffLimitPerIndex for an Indexed Job), the PyTorchJob's ExitCode restart policy
  (1-127 permanent, 128-255 retried), the TrainJob runtime's node Job and its JobSet failurePolicy.

By default the container runs on this machine's filesystem rather than the image's: every mount path
is a directory of the pod's sandbox, and env values and args at or under a mount path are mapped into
it; the working directory is an empty sandbox directory, so a pod writing outside its volumes is seen
there. The image's environment is this interpreter's (``python`` on PATH is sys.executable's
directory, as the image's venv is on its PATH). Given an image (``start(..., image=...)``; the image
test, tests/image, does so) the container runs in it under ``docker run`` with the pod's own security
context: its user and group, a read-only root filesystem, the capabilities it drops, no privilege
escalation, a tmpfs per emptyDir and /dev/shm of the volume's size. Either way cluster DNS is loopback:
the operators' pod hostnames resolve to 127.0.0.1 (docker: ``--network host``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

#: The image's ENTRYPOINT, as the Dockerfile declares it: what a container without a command runs.
IMAGE_ENTRYPOINT = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", (Path(__file__).resolve().parents[1] /
                                                                "Dockerfile").read_text(), re.M).group(1))
#: Kubeflow Trainer's port for the trainer nodes' rendezvous (pkg/constants ContainerTrainerPort).
TRAINER_PORT = 29500


class CreateContainerConfigError(RuntimeError):
    """The kubelet could not build the container's environment (a Secret or key missing): no process starts."""


@dataclass
class Pod:
    """One worker pod as the kubelet receives it: the pod spec, its one container, what the operator injected."""

    kind: str
    name: str
    spec: dict
    container: dict
    injected: dict[str, str] = field(default_factory=dict)

    @property
    def grace_seconds(self) -> int:
        return int(self.spec.get("terminationGracePeriodSeconds", 30))

    def env(self, secrets: dict[str, dict[str, str]], mounts: dict[str, Path], *,
            config_maps: dict[str, dict[str, str]] | None = None, fields: dict[str, str] | None = None) -> dict[str, str]:
        """The container's environment: its env list in order, then the operator's. ``secretKeyRef`` and
        ``configMapKeyRef`` are resolved from ``secrets`` and ``config_maps`` (name -> data; a missing one or
        key, unless optional, is CreateContainerConfigError, as on a node), ``fieldRef`` from ``fields``
        (field path -> value, e.g. ``metadata.name``, ``metadata.labels['key']``)."""
        env: dict[str, str] = {}
        for var in self.container.get("env", []):
            if "value" in var:
                env[var["name"]] = _expand(var["value"], env)
                continue
            source = var.get("valueFrom", {})
            if "fieldRef" in source and fields is not None:
                path = source["fieldRef"]["fieldPath"]
                if path not in fields:
                    raise AssertionError(f"{self.name}: env {var['name']}: field {path} is not known here")
                env[var["name"]] = fields[path]
                continue
            for ref_kind, books in (("secretKeyRef", secrets), ("configMapKeyRef", config_maps)):
                ref = source.get(ref_kind)
                if ref is None or books is None:
                    continue
                data = books.get(ref["name"])
                if data is not None and ref["key"] in data:
                    env[var["name"]] = data[ref["key"]]
                elif not ref.get("optional"):
                    what = "secret" if ref_kind == "secretKeyRef" else "configmap"
                    raise CreateContainerConfigError(
                        f"{self.name}: {what} {ref['name']!r} not found" if data is None else
                        f"{self.name}: no key {ref['key']!r} in {ref['name']!r}")
                break
            else:
                raise AssertionError(f"{self.name}: env {var['name']} has a source this harness does not know: {var}")
        env.update(self.injected)
        return {k: _host_path(v, mounts) for k, v in env.items()}

    def argv(self, env: dict[str, str], mounts: dict[str, Path]) -> list[str]:
        """Command and args, $(VAR) expanded from the container's env (Kubernetes' own substitution); without
        a command, the image's ENTRYPOINT (the Dockerfile's) before the args, as a container runtime does."""
        words = list(self.container.get("command") or IMAGE_ENTRYPOINT) + list(self.container.get("args", []))
        return [_host_path(_expand(w, env), mounts) for w in words]

    def start(self, sandbox: Path, *, secrets: dict[str, dict[str, str]], node_env: dict[str, str] | None = None,
              image: str | None = None, docker: tuple[str, ...] = ("docker",),
              config_maps: dict[str, dict[str, str]] | None = None, fields: dict[str, str] | None = None) -> "PodRun":
        """Start the container's process in a fresh sandbox; ``node_env``: what the image or node adds;
        ``image``: run it in that image (``docker``: the command that talks to the daemon); ``config_maps``
        and ``fields``: what configMapKeyRef and fieldRef read (see :meth:`env`)."""
        sandbox.mkdir(parents=True)
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        for mount in self.container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            assert set(volume) == {"name", "emptyDir"}, f"{self.name}: volume {volume} is not an emptyDir"
        if image is not None:
            return self._start_in(image, docker, sandbox, secrets, node_env or {})
        mounts = {}
        for mount in self.container.get("volumeMounts", []):
            if mount["mountPath"] == "/dev/shm":
                continue  # this machine's /dev/shm serves
            mounts[mount["mountPath"]] = sandbox / "volumes" / mount["name"]
            mounts[mount["mountPath"]].mkdir(parents=True)
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", **(node_env or {}),
               **self.env(secrets, mounts, config_maps=config_maps, fields=fields)}
        workdir = sandbox / "workdir"
        workdir.mkdir()
        log = open(sandbox / "output.log", "wb")
        proc = subprocess.Popen(self.argv(env, mounts), env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        return PodRun(self, proc, sandbox, workdir)

    def _start_in(self, image: str, docker: tuple[str, ...], sandbox: Path, secrets: dict[str, dict[str, str]],
                  node_env: dict[str, str]) -> "PodRun":
        name = f"podrun-{sandbox.name}-{os.getpid()}-{time.monotonic_ns() % 10 ** 9}"
        argv = self.docker_run(image, name, {**node_env, **self.env(secrets, {})}, docker)
        log = open(sandbox / "output.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return PodRun(self, proc, sandbox, None, container=name, docker=docker)

    def docker_run(self, image: str, name: str, env: dict[str, str], docker: tuple[str, ...] = ("docker",)) -> list[str]:
        """``docker run`` of the container in ``image`` with the pod's security context (the image's PATH and root)."""
        words = self.argv(env, {})
        pod_sc, sc = self.spec.get("securityContext", {}), self.container.get("securityContext", {})
        argv = [*docker, "run", "--rm", "--name", name, "--network", "host"]
        if "runAsUser" in pod_sc:
            argv += ["--user", f"{pod_sc['runAsUser']}:{pod_sc.get('runAsGroup', pod_sc['runAsUser'])}"]
        if sc.get("readOnlyRootFilesystem"):
            argv.append("--read-only")
        argv += [arg for cap in sc.get("capabilities", {}).get("drop", []) for arg in ("--cap-drop", cap)]
        if sc.get("allowPrivilegeEscalation") is False:
            argv += ["--security-opt", "no-new-privileges"]
        # seccompProfile RuntimeDefault is docker's default profile.
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        for mount in self.container.get("volumeMounts", []):
            if mount["mountPath"] == "/dev/shm":
                argv += ["--shm-size", str(volumes[mount["name"]]["emptyDir"].get("sizeLimit", "64m"))]
            else:
                argv += ["--tmpfs", f"{mount['mountPath']}:rw,nosuid,nodev,mode=1777"]
        argv += [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
        return argv + ["--entrypoint", words[0], image, *words[1:]]


@dataclass
class PodRun:
    """A started container: its process (the session leader of everything it starts) and its output."""

    pod: Pod
    proc: subprocess.Popen
    sandbox: Path
    workdir: Path | None  # None in an image, whose read-only root a write outside the volumes fails on
    container: str | None = None  # the docker container's name, when run in an image
    docker: tuple[str, ...] = ("docker",)

    @property
    def output(self) -> str:
        return (self.sandbox / "output.log").read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 300) -> None:
        """Until ``text`` appears in the output (the container still running)."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.pod.name} exited ({self.proc.returncode}) before printing {text!r}:\n"
                                     f"{self.output[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{self.pod.name}: no {text!r} after {timeout:.0f} s:\n{self.output[-3000:]}")
            time.sleep(0.1)

    def wait(self, timeout: float = 600) -> int:
        """The container's exit code, as the kubelet reports it."""
        try:
            returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.pod.name} still running after {timeout:.0f} s:\n{self.output[-3000:]}")
        self._reap()
        return 128 - returncode if returncode < 0 else returncode

    def terminate(self) -> int:
        """What the kubelet does to a pod being deleted or preempted: SIGTERM, SIGKILL after the grace period."""
        if self.container is not None:
            subprocess.run([*self.docker, "kill", "--signal", "TERM", self.container], capture_output=True)
        else:
            self.proc.send_signal(signal.SIGTERM)
        try:
            returncode = self.proc.wait(timeout=self.pod.grace_seconds)
        except subprocess.TimeoutExpired:
            self._kill_container()
            os.killpg(self.proc.pid, signal.SIGKILL)
            returncode = self.proc.wait()
        self._reap()
        return 128 - returncode if returncode < 0 else returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self._kill_container()
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reap()

    def _kill_container(self) -> None:
        if self.container is not None:
            subprocess.run([*self.docker, "kill", self.container], capture_output=True)

    def _reap(self) -> None:
        """A container's processes end with it: whatever its process left behind in its session goes too."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stray_files(self) -> list[str]:
        """Files the container wrote outside its volumes (its working directory stands for the root filesystem;
        in an image, the read-only root itself refuses them)."""
        if self.workdir is None:
            return []
        return sorted(str(p.relative_to(self.workdir)) for p in self.workdir.rglob("*"))


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a defined variable is replaced, $$ is a literal $, the rest stays."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _host_path(value: str, mounts: dict[str, Path]) -> str:
    for path, host in mounts.items():
        if value == path or value.startswith(path + "/"):
            return str(host) + value[len(path):]
    return value


# ---- the operators: from the object to the worker pod ------------------------------------------------------


def worker_pod(obj: dict, *, runtime: dict | None = None, index: int = 0) -> Pod:
    """The first worker pod of ``obj`` (the Master of a PyTorchJob, node 0 of a TrainJob, index ``index``)."""
    name = obj["metadata"]["name"]
    kind = obj["kind"]
    spec = obj["spec"]
    if kind == "Job":
        pod = spec["template"]["spec"]
        injected = {"JOB_COMPLETION_INDEX": str(index)} if spec.get("completionMode") == "Indexed" else {}
        return Pod(kind, f"{name}-{index}", pod, _one(pod["containers"]), injected)
    if kind == "PyTorchJob":
        replicas = spec["pytorchReplicaSpecs"]
        pod = replicas["Master"]["template"]["spec"]
        nodes = sum(r["replicas"] for r in replicas.values())
        procs = int(spec.get("nprocPerNode", "1"))
        container = next(c for c in pod["containers"] if c["name"] == "pytorch")
        port = next(p["containerPort"] for p in container.get("ports", []) if p["name"] == "pytorchjob-port")
        master = "127.0.0.1"  # <name>-master-0, the Master's Service, through cluster DNS
        injected = {"PYTHONUNBUFFERED": "1", "MASTER_PORT": str(port), "PET_MASTER_PORT": str(port),
                    "MASTER_ADDR": master, "PET_MASTER_ADDR": master, "WORLD_SIZE": str(nodes * procs), "RANK": "0",
                    "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": str(procs), "PET_NNODES": str(nodes)}
        return Pod(kind, f"{name}-master-0", pod, container, injected)
    if kind == "TrainJob":
        return _trainjob_pod(obj, runtime)
    raise ValueError(f"no worker pod for kind {kind!r}")


def _one(containers: list[dict]) -> dict:
    assert len(containers) == 1, f"expected one container, got {[c['name'] for c in containers]}"
    return containers[0]


def _trainjob_pod(obj: dict, runtime: dict | None) -> Pod:
    """Node 0 of a TrainJob: the runtime's trainer node, overlaid by ``spec.trainer`` and the runtime patches."""
    spec = obj["spec"]
    ref = spec["runtimeRef"]
    assert runtime is not None and ref["kind"] == runtime["kind"] and ref["name"] == runtime["metadata"]["name"], \
        f"TrainJob {obj['metadata']['name']} names runtime {ref}, which is not the one given"
    node = _replicated_job(runtime["spec"]["template"]["spec"], "node")
    pod = dict(node["template"]["spec"]["template"]["spec"])
    container = dict(_one([c for c in pod["containers"] if c["name"] == "node"]))
    trainer = spec["trainer"]
    container.update({k: trainer[k] for k in ("image", "command", "args") if k in trainer})
    container["env"] = list(container.get("env", [])) + list(trainer.get("env", []))
    if "resourcesPerNode" in trainer:
        container["resources"] = trainer["resourcesPerNode"]
    for patch in spec.get("runtimePatches", []):
        for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            if rj["name"] != "node":
                continue
            patched = rj["template"]["spec"]["template"]["spec"]
            pod.update({k: v for k, v in patched.items() if k != "containers"})
            for c in patched.get("containers", []):
                if c["name"] == "node":
                    container.update(c)
    pod["containers"] = [container]
    name = obj["metadata"]["name"]
    injected = {"PET_NNODES": str(trainer.get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))),
                "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", "auto")),
                "PET_NODE_RANK": "0",  # fieldRef: the node Job's completion index
                "PET_MASTER_ADDR": "127.0.0.1",  # <name>-node-0-0.<name>, through cluster DNS
                "PET_MASTER_PORT": str(TRAINER_PORT)}
    return Pod("TrainJob", f"{name}-node-0-0", pod, container, injected)


def _replicated_job(jobset_spec: dict, name: str) -> dict:
    return next(rj for rj in jobset_spec["replicatedJobs"] if rj["name"] == name)


def secrets_from(path: Path) -> dict[str, dict[str, str]]:
    """The Secrets of a manifest file, name -> data (stringData as written)."""
    out = {}
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "Secret":
            out[doc["metadata"]["name"]] = dict(doc.get("stringData", {}))
    return out


# ---- the controllers: what an exit code makes of the object ---------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the object's controller does after its worker pod ended with ``code``.

    ``verdict``: succeeded | retried (a new pod, which resumes) | failed (for good; for an Indexed Job, that
    cell's index). ``counted``: whether the retry uses up one of the object's retries. ``why``: the rule.
    """

    verdict: str
    counted: bool
    why: str
    job_reason: str = ""  # a failed batch/v1 Job's reason, as a JobSet failure policy reads it


def outcome(obj: dict, code: int, *, disrupted: bool = False, runtime: dict | None = None) -> Outcome:
    """The controller's reading of the first failure of ``obj``'s worker pod (``disrupted``: the pod carries the
    DisruptionTarget condition, as a preempted or evicted pod does)."""
    if code == 0:
        return Outcome("succeeded", False, "exit 0")
    kind = obj["kind"]
    if kind == "Job":
        container = _one(obj["spec"]["template"]["spec"]["containers"])["name"]
        return _job_outcome(obj["spec"], container, code, disrupted)
    if kind == "PyTorchJob":
        policy = obj["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"]
        retries = obj["spec"].get("runPolicy", {}).get("backoffLimit", 0) > 0
        if policy == "ExitCode":
            if code >= 128 and retries:
                return Outcome("retried", True, f"restartPolicy ExitCode: {code} >= 128 is retryable")
            return Outcome("failed", False, f"restartPolicy ExitCode: {code} is " +
                           ("permanent (1-127)" if code < 128 else "retryable, but backoffLimit is 0"))
        if policy in ("OnFailure", "Always") and retries:
            return Outcome("retried", True, f"restartPolicy {policy}")
        return Outcome("failed", False, f"restartPolicy {policy}")
    if kind == "TrainJob":
        assert runtime is not None
        jobset = runtime["spec"]["template"]["spec"]
        node = _job_outcome(_replicated_job(jobset, "node")["template"]["spec"], "node", code, disrupted)
        if node.verdict != "failed":
            return Outcome(node.verdict, node.counted, f"node Job: {node.why}")
        reason = node.job_reason
        policy = jobset.get("failurePolicy", {})
        for rule in policy.get("rules", []):
            if (rule.get("onJobFailureReasons") in (None, []) or reason in rule["onJobFailureReasons"]) and \
                    rule.get("targetReplicatedJobs") in (None, [], ["node"]):
                if rule["action"] == "FailJobSet":
                    return Outcome("failed", False, f"node Job failed ({reason}); JobSet rule {rule['name']}: FailJobSet")
                counted = rule["action"] in ("RestartJobSet", "RestartJob")
                if counted and not policy.get("maxRestarts"):
                    break
                return Outcome("retried", counted, f"node Job failed ({reason}); JobSet rule {rule['name']}: "
                               f"{rule['action']}")
        if policy.get("maxRestarts"):
            return Outcome("retried", True, f"node Job failed ({reason}); JobSet restarts (maxRestarts "
                           f"{policy['maxRestarts']})")
        return Outcome("failed", False, f"node Job failed ({reason}); the JobSet has no restarts")
    raise ValueError(f"no controller for kind {kind!r}")


def _job_outcome(spec: dict, container: str, code: int, disrupted: bool) -> Outcome:
    """batch/v1: the first podFailurePolicy rule that matches, else Count against the backoff limit."""
    action, why = "Count", "no podFailurePolicy rule matched"
    for i, rule in enumerate(spec.get("podFailurePolicy", {}).get("rules", [])):
        on_codes = rule.get("onExitCodes")
        if on_codes is not None:
            if on_codes.get("containerName") not in (None, container):
                continue
            listed = code in on_codes["values"]
            if listed == (on_codes["operator"] == "In"):
                action, why = rule["action"], f"podFailurePolicy rule {i}: exit code {code} {on_codes['operator']} " \
                                              f"{on_codes['values']}"
                break
        elif disrupted and any(c["type"] == "DisruptionTarget" and c.get("status", "True") == "True"
                               for c in rule.get("onPodConditions", [])):
            action, why = rule["action"], f"podFailurePolicy rule {i}: condition DisruptionTarget"
            break
    if action == "Ignore":
        return Outcome("retried", False, f"{why}: Ignore")
    if action in ("FailJob", "FailIndex"):
        return Outcome("failed", False, f"{why}: {action}", "PodFailurePolicy")
    limit = spec.get("backoffLimitPerIndex", spec.get("backoffLimit", 6))
    if limit > 0:
        return Outcome("retried", True, f"{why}: Count (backoff limit {limit})")
    return Outcome("failed", False, f"{why}: Count, and the backoff limit is 0", "BackoffLimitExceeded")
