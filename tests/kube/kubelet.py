"""A kubelet for the cluster tests: one Ready node whose pods run as processes on this machine.

    kubelet = Kubelet(ApiClient(), tmp_path / "node", gpus=1)
    kubelet.start()            # registers the Node, renews its Lease, runs the pods the scheduler binds to it
    ...
    kubelet.evict("critbatch", pod_name)   # node-pressure eviction: DisruptionTarget, SIGTERM, Failed
    kubelet.stop()

For each pod bound to the node it does what a kubelet does with the pod's one container, through the
same code as the pod harness (tests/podrun.py ``Pod.start``): command and args with $(VAR) expanded, env
with ``secretKeyRef`` / ``configMapKeyRef`` read from the API server (a missing Secret or key leaves the
container waiting in CreateContainerConfigError, retried) and ``fieldRef`` from the pod itself (an Indexed
Job's JOB_COMPLETION_INDEX), HOME and the emptyDir mounts as fresh directories, an empty working
directory; the image is not pulled: the process runs with this interpreter's environment. It reports
the pod ``Running``, then ``Succeeded``/``Failed`` with the container's real exit code (a signal death as
128 + N) and reason (Completed, Error). A pod being deleted gets SIGTERM, SIGKILL after its grace period,
its terminal status, then the final delete, as a kubelet's. Each pod's output is kept in
``<workdir>/pods/<namespace>_<name>/output.log``.

It polls the API server (a LIST of its pods every ``poll`` seconds) rather than watching: on loopback
that is cheap and it cannot miss an event.
"""

from __future__ import annotations

import base64
import datetime as dt
import shutil
import threading
import time
import traceback
from pathlib import Path

from podrun import CreateContainerConfigError, Pod, PodRun

LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10
GPU_RESOURCE = "nvidia.com/gpu"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Kubelet:
    """One node; its pods as processes. ``node_env``: what the node adds to every container's environment."""

    def __init__(self, api, workdir: Path, *, node: str = "critbatch-node", gpus: int = 0, cpu: str = "64",
                 memory: str = "256Gi", node_env: dict[str, str] | None = None, poll: float = 0.3):
        from kubernetes import client

        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.workdir = Path(workdir)
        self.node = node
        self.capacity = {"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "100Gi"}
        if gpus:
            self.capacity[GPU_RESOURCE] = str(gpus)
        self.node_env = dict(node_env or {})
        self.poll = poll
        self.runs: dict[str, PodRun] = {}  # pod uid -> its running container
        self.finished: dict[str, int] = {}  # pod uid -> exit code reported
        self.stopping: set[str] = set()  # pod uids being terminated
        self._retry_at: dict[str, float] = {}  # pod uid -> when to try its container's config again
        self.errors: list[str] = []  # what went wrong inside the loop (the tests assert it stays empty)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_heartbeat = 0.0

    # ---- life cycle ------------------------------------------------------------------------------------

    def start(self) -> "Kubelet":
        from kubernetes.client.exceptions import ApiException

        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node, "labels": {"kubernetes.io/hostname": self.node,
                                                           "kubernetes.io/os": "linux",
                                                           "kubernetes.io/arch": "amd64"}}}
        try:
            self.core.create_node(body)
        except ApiException as err:
            if err.status != 409:
                raise
        self._heartbeat()
        self._thread = threading.Thread(target=self._loop, name=f"kubelet-{self.node}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop and kill every container still running (SIGKILL: the node is going away)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            runs = list(self.runs.values())
        for run in runs:
            run.kill()

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the node is Ready and carries no not-ready taint, so the scheduler places pods on it."""
        deadline = time.monotonic() + timeout
        while True:
            node = self.core.read_node(self.node)
            taints = [t.key for t in node.spec.taints or []]
            if not any(k.startswith("node.kubernetes.io/") for k in taints):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"node {self.node} still tainted {taints} after {timeout:.0f} s")
            time.sleep(0.2)

    # ---- what a test can ask of the node ---------------------------------------------------------------------

    def evict(self, namespace: str, name: str) -> None:
        """Node-pressure eviction: the pod gets the DisruptionTarget condition (TerminationByKubelet), its
        container SIGTERM (SIGKILL after the grace period), and it ends Failed with that exit code."""
        pod = self.core.read_namespaced_pod(name, namespace)
        self._patch_status(pod, {"conditions": [{
            "type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
            "message": "The node was low on resource: memory.", "lastTransitionTime": now()}]})
        self._terminate(pod, delete_after=False, reason="Evicted")

    def output(self, namespace: str, name: str) -> str:
        path = self._sandbox(namespace, name) / "output.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- the loop --------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if time.monotonic() - self._last_heartbeat > HEARTBEAT_SECONDS:
                    self._heartbeat()
                self._sync()
            except Warning:
                # A test that turns warnings into errors does so for the whole process, this thread included
                # (the API server's self-signed certificate warns on every request): try again next tick.
                pass
            except Exception:  # a kubelet keeps going; the test sees what failed in self.errors
                self.errors.append(traceback.format_exc())
            self._stop.wait(self.poll)

    def _sync(self) -> None:
        pods = self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.node}").items
        for pod in pods:
            try:
                self._sync_pod(pod)
            except Exception:  # one pod's trouble does not stop the others
                self.errors.append(f"pod {pod.metadata.namespace}/{pod.metadata.name}:\n{traceback.format_exc()}")

    def _sync_pod(self, pod) -> None:
        uid = pod.metadata.uid
        terminal = pod.status.phase in ("Succeeded", "Failed")
        if pod.metadata.deletion_timestamp is not None:
            if uid in self.runs and uid not in self.stopping:
                self._terminate(pod, delete_after=True, reason="Killing")
            elif uid not in self.runs and uid not in self.stopping:
                self._finalize_delete(pod, started=False)
            return
        if terminal or uid in self.stopping or uid in self.finished:
            return  # (a LIST older than the status just reported still says Running)
        run = self.runs.get(uid)
        if run is None:
            self._start(pod)
        elif run.proc.poll() is not None:
            self._report_exit(pod, run)

    def _start(self, pod) -> None:
        meta = pod.metadata
        if time.monotonic() < self._retry_at.get(meta.uid, 0.0):
            return
        raw = self.core.api_client.sanitize_for_serialization(pod)
        container = raw["spec"]["containers"][0]
        harness_pod = Pod("Pod", meta.name, raw["spec"], container)
        sandbox = self._sandbox(meta.namespace, meta.name)
        if sandbox.exists():  # a pod of the same name before (a Job's pod names are unique; others may not be)
            sandbox = sandbox.with_name(f"{sandbox.name}-{meta.uid[:8]}")
        try:
            secrets, config_maps = self._references(meta.namespace, container)
            run = harness_pod.start(sandbox, secrets=secrets, config_maps=config_maps,
                                    fields=self._fields(raw), node_env=self.node_env)
        except CreateContainerConfigError as err:
            shutil.rmtree(sandbox, ignore_errors=True)
            self._container_waiting(pod, "CreateContainerConfigError", str(err).split(": ", 1)[-1])
            self._retry_at[meta.uid] = time.monotonic() + 2.0  # a kubelet retries the container's config too
            return
        except OSError as err:  # the executable cannot be started: the runtime's StartError, exit 128
            self._report_start_error(pod, container, f"{type(err).__name__}: {err}")
            return
        with self._lock:
            self.runs[meta.uid] = run
        started = now()
        self._patch_status(pod, {
            "phase": "Running", "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}], "startTime": started,
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": started}
                           for t in ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [self._container_status(container, run, {"running": {"startedAt": started}},
                                                         ready=True)]})

    def _report_exit(self, pod, run: PodRun, reason: str = "") -> int:
        returncode = run.proc.wait()
        run._reap()  # the container's processes end with it
        code = 128 - returncode if returncode < 0 else returncode
        container = self.core.api_client.sanitize_for_serialization(pod)["spec"]["containers"][0]
        finished = now()
        started = (pod.status.start_time or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                      "startedAt": started, "finishedAt": finished, "containerID": self._container_id(run)}
        status = {"phase": "Succeeded" if code == 0 else "Failed",
                  "conditions": [{"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": finished}
                                 for t in ("ContainersReady", "Ready")],
                  "containerStatuses": [self._container_status(container, run, {"terminated": terminated},
                                                               ready=False)]}
        if reason == "Evicted":
            status.update(reason="Evicted", message="The node was low on resource: memory.")
        self._patch_status(pod, status)
        with self._lock:
            self.finished[pod.metadata.uid] = code
            self.runs.pop(pod.metadata.uid, None)
        return code

    def _report_start_error(self, pod, container: dict, message: str) -> None:
        stamp = now()
        self._patch_status(pod, {"phase": "Failed", "containerStatuses": [{
            "name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": False,
            "restartCount": 0, "started": False,
            "state": {"terminated": {"exitCode": 128, "reason": "StartError", "message": message,
                                     "startedAt": stamp, "finishedAt": stamp}}}]})
        with self._lock:
            self.finished[pod.metadata.uid] = 128

    def _terminate(self, pod, *, delete_after: bool, reason: str) -> None:
        """SIGTERM, SIGKILL after the grace period, the terminal status; then (a deletion) the final delete."""
        uid = pod.metadata.uid
        with self._lock:
            run = self.runs.get(uid)
            if run is None or uid in self.stopping:
                return
            self.stopping.add(uid)
        grace = pod.metadata.deletion_grace_period_seconds
        if grace is not None:
            run.pod.spec = dict(run.pod.spec, terminationGracePeriodSeconds=grace)

        def work() -> None:
            try:
                if run.proc.poll() is None:
                    run.terminate()
                current = self.core.read_namespaced_pod(pod.metadata.name, pod.metadata.namespace)
                self._report_exit(current, run, reason=reason)
                if delete_after:
                    self._finalize_delete(current, started=True)
            except Exception:
                self.errors.append(traceback.format_exc())
            finally:
                with self._lock:
                    self.stopping.discard(uid)

        threading.Thread(target=work, name=f"terminate-{pod.metadata.name}", daemon=True).start()

    def _finalize_delete(self, pod, *, started: bool) -> None:
        """The kubelet's last word on a deleted pod: a pod that never ran is marked Failed first (so that
        its controller counts it), then the object is deleted at once (grace 0)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        if not started and pod.status.phase not in ("Succeeded", "Failed"):
            self._patch_status(pod, {"phase": "Failed"})
        try:
            self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0,
                                            body=client.V1DeleteOptions(
                                                grace_period_seconds=0,
                                                preconditions=client.V1Preconditions(uid=pod.metadata.uid)))
        except ApiException as err:
            if err.status not in (404, 409):
                raise

    # ---- status and node -------------------------------------------------------------------------------

    def _container_waiting(self, pod, reason: str, message: str) -> None:
        container = pod.spec.containers[0]
        self._patch_status(pod, {"phase": "Pending", "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
                                 "containerStatuses": [{
                                     "name": container.name, "image": container.image, "imageID": "", "ready": False,
                                     "restartCount": 0, "started": False,
                                     "state": {"waiting": {"reason": reason, "message": message}}}]})

    @staticmethod
    def _container_id(run: PodRun) -> str:
        return f"process://{run.proc.pid}"

    def _container_status(self, container: dict, run: PodRun, state: dict, *, ready: bool) -> dict:
        return {"name": container["name"], "image": container.get("image", ""), "imageID": "",
                "containerID": self._container_id(run), "ready": ready, "started": ready, "restartCount": 0,
                "state": state}

    def _patch_status(self, pod, status: dict) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": status},
                                                  _content_type="application/strategic-merge-patch+json")
        except ApiException as err:
            if err.status != 404:  # gone already: nothing to report to
                raise

    def _heartbeat(self) -> None:
        """The node's Ready condition and capacity, and its Lease in kube-node-lease."""
        from kubernetes.client.exceptions import ApiException

        stamp = now()
        conditions = [{"type": t, "status": s, "reason": r, "message": r, "lastHeartbeatTime": stamp,
                       "lastTransitionTime": stamp}
                      for t, s, r in (("Ready", "True", "KubeletReady"), ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                                      ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                                      ("PIDPressure", "False", "KubeletHasSufficientPID"))]
        self.core.patch_node_status(self.node, {"status": {
            "capacity": self.capacity, "allocatable": self.capacity, "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.node}],
            "nodeInfo": {"kubeletVersion": "critbatch-test", "operatingSystem": "linux", "architecture": "amd64",
                         "containerRuntimeVersion": "process://", "kernelVersion": "", "osImage": "",
                         "machineID": "", "systemUUID": "", "bootID": "", "kubeProxyVersion": ""}}},
            _content_type="application/strategic-merge-patch+json")
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.node, "namespace": LEASE_NAMESPACE},
                 "spec": {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_SECONDS,
                          "renewTime": micro_now()}}
        try:
            self.coordination.replace_namespaced_lease(self.node, LEASE_NAMESPACE, self._with_version(lease))
        except ApiException as err:
            if err.status != 404:
                raise
            self.coordination.create_namespaced_lease(LEASE_NAMESPACE, lease)
        self._last_heartbeat = time.monotonic()

    def _with_version(self, lease: dict) -> dict:
        current = self.coordination.read_namespaced_lease(self.node, LEASE_NAMESPACE)
        lease["metadata"]["resourceVersion"] = current.metadata.resource_version
        return lease

    # ---- what the container's env reads -----------------------------------------------------------------

    def _references(self, namespace: str, container: dict) -> tuple[dict, dict]:
        """The Secrets and ConfigMaps the container's env names, as name -> data (absent ones left out)."""
        from kubernetes.client.exceptions import ApiException

        secrets: dict[str, dict[str, str]] = {}
        config_maps: dict[str, dict[str, str]] = {}
        for var in container.get("env") or []:
            source = var.get("valueFrom") or {}
            if "secretKeyRef" in source and source["secretKeyRef"]["name"] not in secrets:
                name = source["secretKeyRef"]["name"]
                try:
                    data = self.core.read_namespaced_secret(name, namespace).data or {}
                except ApiException as err:
                    if err.status != 404:
                        raise
                    continue
                secrets[name] = {k: base64.b64decode(v).decode() for k, v in data.items()}
            if "configMapKeyRef" in source and source["configMapKeyRef"]["name"] not in config_maps:
                name = source["configMapKeyRef"]["name"]
                try:
                    config_maps[name] = dict(self.core.read_namespaced_config_map(name, namespace).data or {})
                except ApiException as err:
                    if err.status != 404:
                        raise
        return secrets, config_maps

    @staticmethod
    def _fields(raw: dict) -> dict[str, str]:
        meta = raw["metadata"]
        fields = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                  "metadata.uid": meta["uid"], "spec.nodeName": raw["spec"].get("nodeName", ""),
                  "spec.serviceAccountName": raw["spec"].get("serviceAccountName", ""),
                  "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
        for key, value in (meta.get("labels") or {}).items():
            fields[f"metadata.labels['{key}']"] = value
        for key, value in (meta.get("annotations") or {}).items():
            fields[f"metadata.annotations['{key}']"] = value
        return fields

    def _sandbox(self, namespace: str, name: str) -> Path:
        return self.workdir / "pods" / f"{namespace}_{name}"
