"""A stand-in for the Kubernetes API server on loopback: the REST endpoints ``submit`` and ``status`` use.

No Kubernetes API server can run on most machines these tests run on, so a small http.server plays
list/create/merge-patch/delete of batch/v1 Jobs and custom objects, list of pods and of events, read of a
Namespace, a ServiceAccount and a Secret - with the API server's status codes (201 Created, 409
AlreadyExists and 404 NotFound as Status objects), label and field selectors, and the faults a real one
gives under load (429 with Retry-After, 500/503, no answer at all). The real ``kubernetes`` client talks
to it; its fixtures (``api_server``, ``cluster``) are in conftest.py.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from critbatch.jobs.backends import k8s

JOBS = "/apis/batch/v1/namespaces/critbatch/jobs"
PODS = "/api/v1/namespaces/critbatch/pods"
SECRETS = "/api/v1/namespaces/critbatch/secrets"
EVENTS = "/api/v1/namespaces/critbatch/events"
NAMESPACES = "/api/v1/namespaces"
ACCOUNTS = "/api/v1/namespaces/critbatch/serviceaccounts"


def merge_patch(target, patch):
    """RFC 7386, as the API server applies application/merge-patch+json."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = value


def field_of(obj, path):
    """A field selector's value: ``involvedObject.kind`` -> obj["involvedObject"]["kind"]."""
    for key in path.split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None
    return "" if obj is None else str(obj)


def status_body(code, reason, message=""):
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}


class FakeApiServer:
    """Objects by collection path and name; each request recorded as (method, path).

    ``faults``: (method, path prefix, status, headers) answered, once each and in order, to the first
    requests they match, before any real handling - the throttling and outages of a busy API server.
    """

    def __init__(self):
        self.objects: dict[str, dict[str, dict]] = {}
        self.requests: list[tuple[str, str]] = []
        self.conflict_on_create: set[str] = set()  # names whose create answers 409 though never listed
        self.faults: list[tuple[str, str, int, dict]] = []
        self.port = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body, headers=()):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in dict(headers).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _body(self):
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

            def _start(self, method):
                url = urllib.parse.urlsplit(self.path)
                fake.requests.append((method, url.path))
                for fault in fake.faults:
                    if fault[0] == method and url.path.startswith(fault[1]):
                        fake.faults.remove(fault)
                        self._body() if method != "GET" else None
                        self._send(fault[2], status_body(fault[2], "Fault"), fault[3])
                        return None
                return url

            def do_GET(self):
                url = self._start("GET")
                if url is None:
                    return
                if url.path in fake.objects or url.path.endswith(("/jobs", "/pods", "/pytorchjobs", "/trainjobs",
                                                                   "/events")):
                    query = urllib.parse.parse_qs(url.query)
                    selector = dict(kv.split("=", 1) for kv in query.get("labelSelector", [""])[0].split(",") if kv)
                    fields = dict(kv.split("=", 1) for kv in query.get("fieldSelector", [""])[0].split(",") if kv)
                    items = [o for o in fake.objects.get(url.path, {}).values()
                             if all(o["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())
                             and all(field_of(o, k) == v for k, v in fields.items())]
                    # As a real API server: a LIST's items carry no kind or apiVersion (the list says them once).
                    items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items]
                    self._send(200, {"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items})
                    return
                prefix, _, name = url.path.rpartition("/")
                obj = fake.objects.get(prefix, {}).get(name)
                self._send(200, obj) if obj else self._send(404, status_body(404, "NotFound", f"{name} not found"))

            def do_POST(self):
                url = self._start("POST")
                if url is None:
                    return
                obj = self._body()
                name = obj["metadata"]["name"]
                bucket = fake.objects.setdefault(url.path, {})
                if name in bucket or name in fake.conflict_on_create:
                    self._send(409, status_body(409, "AlreadyExists", f'"{name}" already exists'))
                    return
                obj["metadata"]["uid"] = f"uid-{len(fake.requests)}"
                bucket[name] = obj
                self._send(201, obj)

            def do_PATCH(self):
                url = self._start("PATCH")
                if url is None:
                    return
                assert self.headers["Content-Type"] == "application/merge-patch+json"
                prefix, _, name = url.path.rpartition("/")
                obj = fake.objects.get(prefix, {}).get(name)
                if obj is None:
                    self._send(404, status_body(404, "NotFound"))
                    return
                merge_patch(obj, self._body())
                self._send(200, obj)

            def do_DELETE(self):
                url = self._start("DELETE")
                if url is None:
                    return
                assert self._body() == {"propagationPolicy": "Background"}
                prefix, _, name = url.path.rpartition("/")
                obj = fake.objects.get(prefix, {}).pop(name, None)
                self._send(200, obj) if obj else self._send(404, status_body(404, "NotFound"))

        self.handler = Handler
        self.start()

    def start(self):
        """Listen (again, on the same port after a stop) and serve from a thread."""
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        """Stop listening: connections are refused until start()."""
        self.server.shutdown()
        self.server.server_close()

    @property
    def host(self):
        return f"http://127.0.0.1:{self.port}"

    def jobs(self) -> dict[str, dict]:
        return self.objects.get(JOBS, {})

    def custom(self, group, version, plural, namespace="critbatch") -> dict[str, dict]:
        return self.objects.get(f"/apis/{group}/{version}/namespaces/{namespace}/{plural}", {})

    def creates(self):
        return [r for r in self.requests if r[0] == "POST"]

    def add_secret(self, name="critbatch-store", keys=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")):
        self.objects.setdefault(SECRETS, {})[name] = {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "critbatch"},
            "data": {k: "c2VjcmV0" for k in keys}}

    def add_kit(self, *, namespace=True, account=True, secret=True):
        """What `kubectl apply -f k8s/namespace.yaml` and `kubectl apply -k k8s/` create, and the store Secret."""
        if namespace:
            self.objects.setdefault(NAMESPACES, {})["critbatch"] = {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "critbatch"}}
        if account:
            self.objects.setdefault(ACCOUNTS, {})["critbatch"] = {
                "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "critbatch", "namespace": "critbatch"}}
        if secret:
            self.add_secret()

    def add_event(self, kind, name, reason, message, *, type_="Warning", when="2026-12-01T10:00:00Z"):
        """An event as a controller records it on an object (core/v1)."""
        events = self.objects.setdefault(EVENTS, {})
        key = f"{name}.{len(events)}"
        events[key] = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": key, "namespace": "critbatch"},
                       "involvedObject": {"kind": kind, "name": name, "namespace": "critbatch"},
                       "reason": reason, "message": message, "type": type_, "lastTimestamp": when, "count": 1}

    def add_pod(self, cell_id, name, *, waiting=None, unschedulable=None, phase="Pending"):
        """A cell's pod as the kubelet or the scheduler reports it: a container waiting (reason, message),
        or PodScheduled False with the scheduler's message."""
        labels = {k8s.LABEL_SWEEP: "sub", k8s.LABEL_COMPONENT: k8s.COMPONENT_CELL, k8s.LABEL_CELL: cell_id}
        pod_status = {"phase": phase}
        if waiting:
            pod_status["containerStatuses"] = [{
                "name": "critbatch", "image": "registry.example/critbatch:1.0", "imageID": "", "ready": False,
                "restartCount": 0, "state": {"waiting": {"reason": waiting[0], "message": waiting[1]}}}]
        if unschedulable:
            pod_status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                         "message": unschedulable}]
        self.objects.setdefault(PODS, {})[name] = {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "critbatch", "labels": labels},
            "spec": {"containers": [{"name": "critbatch", "image": "registry.example/critbatch:1.0"}]},
            "status": pod_status}
