"""Shared fixtures: a real SeaweedFS S3 server on loopback, stores, environment, the loopback API server
(tests/fakeapi.py) and a real Kubernetes control plane (tests/kube)."""

from __future__ import annotations

import os
import uuid

import pytest

from critbatch.jobs.local.s3server import S3Server
from critbatch.jobs.store import LocalStore, S3Store, open_store


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One S3 server for the session, on free loopback ports; killed at the end."""
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The AWS_* variables pointing at the loopback server, set for this test."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server.env()


@pytest.fixture(scope="session")
def s3_bucket(s3_server):
    """The session's one bucket. Tests share it under prefixes of their own: SeaweedFS gives every bucket seven
    volumes of its own and has a slot for one volume per 64 MiB of free disk: with a bucket per test, 80 GB free
    ran out after 156 buckets and every later PutObject answered InternalError."""
    bucket = "t-" + uuid.uuid4().hex[:12]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        S3Store(bucket, "").check()
    return bucket


@pytest.fixture
def s3_url(s3_env, s3_bucket):
    """A fresh ``s3://bucket/prefix`` for one test: the session's bucket, a prefix no other test uses."""
    return f"s3://{s3_bucket}/{uuid.uuid4().hex[:12]}/runs"


@pytest.fixture
def local_store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture(params=["local", "s3"])
def any_store_url(request, tmp_path):
    """Parametrises a test over a local directory and the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_url")


@pytest.fixture
def cpu_env(monkeypatch):
    """Single-threaded, deterministic CPU runs."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return os.environ


# ---- the loopback API server of tests/fakeapi.py, through the real kubernetes client -------------------------


@pytest.fixture
def api_server():
    """A FakeApiServer on a free loopback port for one test; stopped afterwards."""
    from fakeapi import FakeApiServer

    server = FakeApiServer()
    yield server
    server.stop()


@pytest.fixture
def sleeps():
    """The backoff's sleeps, recorded instead of slept."""
    return []


@pytest.fixture
def cluster(api_server, sleeps):
    """critbatch's cluster client (jobs/cluster/client.py) on ``api_server``, namespace critbatch, its backoff
    sleeping into ``sleeps``."""
    from kubernetes import client

    from critbatch.jobs.cluster import client as api

    configuration = client.Configuration(host=api_server.host)
    return api.Cluster(client.ApiClient(configuration), "critbatch", sleep=sleeps.append)


@pytest.fixture
def store(s3_url):
    """A store on the loopback S3 server (a fresh bucket), as submit and status read it."""
    return open_store(s3_url)


# ---- a real Kubernetes control plane (tests/kube/) -------------------------------------------------------


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback for the session, built
    once per machine (tests/kube/go/build.sh). Missing binaries that cannot be built fail the test, saying
    how to get them: nothing is skipped."""
    from kube.controlplane import ControlPlane, ControlPlaneUnavailable, build

    try:
        bindir = build()
    except ControlPlaneUnavailable as err:
        pytest.fail(str(err), pytrace=False)
    with ControlPlane(bindir, tmp_path_factory.mktemp("controlplane")) as plane:
        yield plane


@pytest.fixture(scope="session")
def kube_api(control_plane):
    """A kubernetes.client.ApiClient of the control plane's admin."""
    from kubernetes import config

    return config.new_client_from_config(config_file=str(control_plane.kubeconfig))


@pytest.fixture(scope="session")
def kube_node(control_plane, kube_api, tmp_path_factory):
    """One Ready node (one nvidia.com/gpu of capacity) whose pods run as processes here (tests/kube/kubelet.py)."""
    from kube.kubelet import Kubelet
    from kubernetes import config

    node = Kubelet(config.new_client_from_config(config_file=str(control_plane.kubeconfig)),
                   tmp_path_factory.mktemp("node"), gpus=1,
                   node_env={"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    node.start()
    node.wait_ready()
    yield node
    node.stop()
    assert not node.errors, "the test kubelet failed:\n" + "\n".join(node.errors)


@pytest.fixture
def kube_namespace(control_plane, kube_api):
    """A fresh namespace under the restricted Pod Security profile, as k8s/namespace.yaml makes critbatch's;
    deleted afterwards."""
    from kubernetes import client

    name = "t-" + uuid.uuid4().hex[:10]
    core = client.CoreV1Api(kube_api)
    core.create_namespace({"metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    yield name
    core.delete_namespace(name, propagation_policy="Background")
