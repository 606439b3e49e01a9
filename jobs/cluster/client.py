"""The cluster's API as ``submit`` and ``status`` use it: a few calls on plain dicts, each one retried
through transient errors, and what they read back from a pod. What an object's status says is its
backend's to read (critbatch.jobs.backends).

Every call goes through :meth:`Cluster._call`. A 429 or a 5xx answer, a refused or dropped connection
and a timeout are retried with jittered exponential backoff (tenacity), waiting at least what the
server's ``Retry-After`` asks; what still fails after the last attempt raises :class:`ClusterUnavailable`,
which ``submit --wait`` reports in one line and survives, polling on. The kubernetes client's own
``client_go_retries`` covers reads only, so a create answered 429 would not be retried by it.

Anything else the API server refuses (403 Forbidden, 404 for a kind the cluster does not serve, 422
Invalid) is not retried: retrying cannot help, so it is a :class:`ConfigError` with the server's reason.
A caller that expects a status (409 on create, 404 on delete) names it and gets the ApiException.

Talks to the cluster with the ``kubernetes`` client: the current kube config context, else the pod's
in-cluster service account.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import time
from typing import Any, Callable

import tenacity

from .. import backends
from ..backends import k8s
from ..cell.errors import ConfigError

#: HTTP statuses worth another try: throttled, or the API server (or what is in front of it) failing.
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
#: The longest Retry-After honoured; a server asking for more is asked again after this long.
MAX_RETRY_AFTER = 120.0
#: Container waiting reasons that are the normal way into running, not a reason to report.
NORMAL_WAITING = frozenset({"ContainerCreating", "PodInitializing"})
#: Warning events by which a controller says it cannot make an object's pods (the Job controller's
#: FailedCreate: a missing ServiceAccount, an exhausted ResourceQuota, an admission webhook's refusal;
#: the Training Operator's FailedCreatePod): no pod exists to show the reason, only these events.
CREATE_FAILURES = frozenset({"FailedCreate", "FailedCreatePod"})


class ClusterUnavailable(RuntimeError):
    """The API server could not be reached, or kept answering 429/5xx, through every retry."""


def api_client():
    """A configured ``kubernetes.client.ApiClient``: kube config first, then in-cluster."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    # KUBECONFIG is read here, not when the kubernetes package was imported (it caches the variable then).
    path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    try:
        config.load_kube_config(config_file=path)
    except (ConfigException, OSError, TypeError) as err:
        try:
            config.load_incluster_config()
        except ConfigException:
            if any(os.path.isfile(p) for p in path.split(os.pathsep)):
                raise ConfigError(f"kubernetes: cannot use the kube config {path}: {err}") from None
            raise ConfigError("kubernetes: no kube config found (~/.kube/config or KUBECONFIG) and not running "
                              "in a cluster; point KUBECONFIG at a cluster, or use `critbatch render` and "
                              "kubectl") from None
    return client.ApiClient()


# ---- transient errors ------------------------------------------------------------------------------------


def is_transient(err: BaseException) -> bool:
    """A 429/5xx answer, or no answer at all (refused, reset, timed out)."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    if isinstance(err, ApiException):
        return err.status in TRANSIENT_STATUSES
    return isinstance(err, (urllib3.exceptions.HTTPError, OSError))


def retry_after(err: BaseException) -> float | None:
    """Seconds the server's ``Retry-After`` header asks for (a number or an HTTP date), else None."""
    value = (getattr(err, "headers", None) or {}).get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class wait_retry_after(tenacity.wait.wait_base):
    """At least the Retry-After the server asked for (capped, plus up to a second of jitter so that
    throttled clients do not come back together); without one, ``fallback``."""

    def __init__(self, fallback: tenacity.wait.wait_base):
        self.fallback = fallback

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        after = retry_after(retry_state.outcome.exception())
        if after is None:
            return self.fallback(retry_state)
        return min(after, MAX_RETRY_AFTER) + random.uniform(0, 1)


def describe(err: BaseException) -> str:
    """One line for an API error: status, reason and the server's message; or the connection error."""
    from kubernetes.client.exceptions import ApiException

    if not isinstance(err, ApiException):
        return f"{type(err).__name__}: {err}".splitlines()[0]
    message = ""
    try:
        message = json.loads(err.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        pass
    return f"{err.status} {err.reason}" + (f": {message}" if message else "")


# ---- the calls -------------------------------------------------------------------------------------------


class Cluster:
    """The API calls submit and status make, per kind, on plain dicts; each retried through transient errors.

    A kind is a built-in one (Job, Pod) or a backend's custom resource, whose group, version and plural
    its backend gives.

    ``attempts`` tries per call, waits from ``wait`` (default: jittered exponential from 1 s up to 30 s,
    at least the server's Retry-After), slept with ``sleep``; ``timeout`` is each request's (connect,
    read) timeout in seconds, so a hung API server counts as a failed attempt rather than a hung submit.
    """

    #: Items per page of a LIST: a sweep of thousands of cells is read in pages, not one huge answer.
    PAGE = 500

    def __init__(self, api, namespace: str, *, attempts: int = 6, sleep: Callable[[float], None] = time.sleep,
                 wait: tenacity.wait.wait_base | None = None, timeout: tuple[float, float] = (10.0, 60.0)):
        from kubernetes import client

        self.api = api
        self.namespace = namespace
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.attempts = attempts
        self.sleep = sleep
        self.wait = wait or wait_retry_after(tenacity.wait_random_exponential(multiplier=1, max=30))
        self.timeout = timeout

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, expect: tuple[int, ...] = (), **kwargs: Any):
        """``fn(*args, **kwargs)``, retried through transient errors. An ApiException whose status is in
        ``expect`` is raised as it is; ``what`` names the call in messages."""
        from kubernetes.client.exceptions import ApiException

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=self.wait,
            sleep=self.sleep,
            reraise=True,
        )
        try:
            return retrying(fn, *args, _request_timeout=self.timeout, **kwargs)
        except ApiException as err:
            if err.status in expect:
                raise
            if is_transient(err):
                raise ClusterUnavailable(f"kubernetes: {what}: {describe(err)} (after {self.attempts} tries)") from None
            raise ConfigError(f"kubernetes: {what} in namespace {self.namespace}: {describe(err)}") from None
        except Exception as err:
            if is_transient(err):
                raise ClusterUnavailable(f"kubernetes: {what}: {describe(err)} (after {self.attempts} tries)") from None
            raise

    def _read(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict:
        """A GET's answer as the server's JSON: no client models built and flattened again (a sweep's
        LIST may hold thousands of objects), and custom objects and built-in kinds read alike."""
        def read(*a: Any, **k: Any) -> dict:
            return json.loads(fn(*a, _preload_content=False, **k).data)  # the body read inside the retries

        return self._call(what, read, *args, **kwargs)

    def list(self, kind: str, selector: str) -> list[dict]:
        """Every object of ``kind`` (Job, PyTorchJob, TrainJob, Pod) matching the label selector, page by page."""
        if kind == "Job":
            fn, args = self.batch.list_namespaced_job, (self.namespace,)
        elif kind == "Pod":
            fn, args = self.core.list_namespaced_pod, (self.namespace,)
        else:
            fn, args = self.custom.list_namespaced_custom_object, (*_resource(kind), self.namespace, _plural(kind))
        items: list[dict] = []
        token = None
        while True:
            page = self._read(f"list {kind}s", fn, *args, label_selector=selector, limit=self.PAGE,
                              **({"_continue": token} if token else {}))
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    def create(self, obj: dict) -> bool:
        """Create ``obj``; False when it already exists (409), which counts as done."""
        from kubernetes.client.exceptions import ApiException

        kind = obj["kind"]
        try:
            if kind == "Job":
                self._call(f"create Job {obj['metadata']['name']}", self.batch.create_namespaced_job,
                           self.namespace, obj, expect=(409,))
            else:
                self._call(f"create {kind} {obj['metadata']['name']}", self.custom.create_namespaced_custom_object,
                           *_resource(kind), self.namespace, _plural(kind), obj, expect=(409,))
        except ApiException:  # 409 AlreadyExists: another submit, or an earlier pass, got there first
            return False
        return True

    def set_suspended(self, kind: str, name: str, suspend: bool) -> bool:
        """Suspend or resume an object with a merge patch (its backend's); False when it is gone (404)."""
        from kubernetes.client.exceptions import ApiException

        body = backends.by_kind(kind).suspend_patch(suspend)
        verb = "suspend" if suspend else "resume"
        try:
            if kind == "Job":
                self._call(f"{verb} Job {name}", self.batch.patch_namespaced_job, name, self.namespace, body,
                           _content_type="application/merge-patch+json", expect=(404,))
            else:
                self._call(f"{verb} {kind} {name}", self.custom.patch_namespaced_custom_object, *_resource(kind),
                           self.namespace, _plural(kind), name, body, _content_type="application/merge-patch+json",
                           expect=(404,))
        except ApiException:
            return False
        return True

    def delete(self, kind: str, name: str) -> bool:
        """Delete an object and, in the background, its pods; False when it was already gone (404)."""
        from kubernetes.client.exceptions import ApiException

        body = {"propagationPolicy": "Background"}
        try:
            if kind == "Job":
                self._call(f"delete Job {name}", self.batch.delete_namespaced_job, name, self.namespace, body=body,
                           expect=(404,))
            else:
                self._call(f"delete {kind} {name}", self.custom.delete_namespaced_custom_object, *_resource(kind),
                           self.namespace, _plural(kind), name, body=body, expect=(404,))
        except ApiException:
            return False
        return True

    def found(self, kind: str, name: str) -> bool:
        """Whether a Namespace (``name`` itself) or a ServiceAccount of the namespace exists. A 403 (no
        right to read it) is raised as the ApiException, for the caller to skip its check."""
        from kubernetes.client.exceptions import ApiException

        if kind == "Namespace":
            fn, args = self.core.read_namespace, (name,)
        elif kind == "ServiceAccount":
            fn, args = self.core.read_namespaced_service_account, (name, self.namespace)
        else:
            raise ValueError(f"cannot look up a {kind}")
        try:
            self._read(f"read {kind} {name}", fn, *args, expect=(403, 404))
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def warnings(self, kind: str) -> list[dict]:
        """The namespace's Warning events about objects of ``kind``: one LIST (paged), filtered by the server;
        none where this client may not list events (403: they only explain, so their absence is no error)."""
        from kubernetes.client.exceptions import ApiException

        items: list[dict] = []
        token = None
        while True:
            try:
                page = self._read(f"list Events of {kind}s", self.core.list_namespaced_event, self.namespace,
                                  field_selector=f"involvedObject.kind={kind},type=Warning", limit=self.PAGE,
                                  expect=(403,), **({"_continue": token} if token else {}))
            except ApiException:
                return items
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    def secret_keys(self, name: str) -> set[str] | None:
        """The key names of a Secret (never its values); None when it does not exist. A 403 (no right to
        read Secrets) is raised as the ApiException, for the caller to skip its check."""
        from kubernetes.client.exceptions import ApiException

        try:
            secret = self._read(f"read Secret {name}", self.core.read_namespaced_secret, name, self.namespace,
                                expect=(403, 404))
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return set(secret.get("data") or {}) | set(secret.get("stringData") or {})


def _resource(kind: str) -> tuple[str, str]:
    """(group, version) of a backend's custom resource."""
    backend = backends.by_kind(kind)
    return backend.group, backend.version


def _plural(kind: str) -> str:
    return backends.by_kind(kind).plural


# ---- what a pod says ------------------------------------------------------------------------------------------


def pod_problem(pod: dict) -> tuple[str, str] | None:
    """Why a Pending pod is not running: a container's waiting reason (ImagePullBackOff,
    CreateContainerConfigError for a missing Secret or key, ...) or the scheduler's (Unschedulable:
    "0/3 nodes are available: 3 Insufficient nvidia.com/gpu"); None for a pod on its normal way."""
    status = pod.get("status") or {}
    if status.get("phase") != "Pending":
        return None
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason and reason not in NORMAL_WAITING:
            return reason, waiting.get("message", "")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return cond.get("reason") or "Unschedulable", cond.get("message", "")
    return None


def pods_by_cell(pods: list[dict]) -> dict[str, list[dict]]:
    """The cells' pods, grouped by their cell-id label, each group sorted by name."""
    out: dict[str, list[dict]] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        cell_id = (pod["metadata"].get("labels") or {}).get(k8s.LABEL_CELL)
        if cell_id:
            out.setdefault(cell_id, []).append(pod)
    return out


def cell_problem(pods: list[dict]) -> tuple[str, str, str] | None:
    """(reason, message, pod name) when none of a cell's pods runs and one is stuck; else None."""
    if not pods or any((p.get("status") or {}).get("phase") == "Running" for p in pods):
        return None
    for pod in pods:
        problem = pod_problem(pod)
        if problem:
            return (*problem, pod["metadata"]["name"])
    return None


def _event_time(event: dict) -> str:
    return (event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
            or (event.get("metadata") or {}).get("creationTimestamp") or "")


def create_failures(events: list[dict]) -> dict[str, tuple[str, str]]:
    """Object name -> (reason, message) of the latest event saying its controller could not create its pods."""
    out: dict[str, tuple[str, str]] = {}
    for event in sorted(events, key=_event_time):
        if event.get("reason") in CREATE_FAILURES:
            out[(event.get("involvedObject") or {}).get("name", "")] = (event["reason"], event.get("message", ""))
    return out


def cell_stall(backend, obj: dict, pods: list[dict], failures: dict[str, tuple[str, str]]) -> tuple[str, str, str] | None:
    """(reason, message, object) when a cell has no pod at all and its controller says why it made none
    (create_failures, on one of the objects the backend's controller creates the pods from); else None."""
    if pods:
        return None
    for subject in backend.event_subjects(obj):
        if subject in failures:
            return (*failures[subject], f"{backend.event_kind} {subject}")
    return None
