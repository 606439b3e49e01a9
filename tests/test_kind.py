"""The kind end-to-end kit (k8s/kind/): its grid fits a laptop's cluster, and e2e.sh's wait fails fast.

No kind cluster runs here (no Docker daemon, no Kubernetes binaries), so e2e.sh itself is not run: its
grid is rendered and sized, and its wait function is run in bash against a stand-in kubectl that prints
what the real one would for Jobs and pods in each state.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from critbatch.jobs.sweep import render
from critbatch.jobs.sweep.grid import load_grid

REPO = Path(__file__).resolve().parents[1]
KIND = REPO / "k8s" / "kind"
GIB = 2 ** 30


def _bytes(quantity: str) -> float:
    units = {"Mi": 2 ** 20, "Gi": GIB}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_every_pod_of_the_kind_grid_fits_a_small_docker_desktop():
    grid = load_grid(str(KIND / "grid.yaml"))
    objects = render.render_grid(grid.with_overrides(image="critbatch:dev"))
    assert len(objects) == len(grid.cells()) + 1 == 5
    for obj in objects:
        for pod in render.pod_specs(obj):
            (container,) = pod["containers"]
            requests = container["resources"]["requests"]
            assert float(requests["cpu"]) <= 1 and _bytes(requests["memory"]) <= 1.5 * GIB, obj["metadata"]["name"]
            assert container["imagePullPolicy"] == "Never"  # loaded into the nodes by kind, never pulled


@pytest.fixture
def wait_for_jobs(tmp_path):
    """Run e2e.sh's wait_for_jobs with a kubectl that prints ``jobs.txt`` for jobs and ``pods.txt`` for pods."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = (KIND / "e2e.sh").read_text()
    start = script.index("wait_for_jobs() {")
    function = script[start:script.index("\n}\n", start) + 3]
    kubectl = tmp_path / "kubectl"
    kubectl.write_text('#!/bin/sh\ncase "$*" in\n  *"get jobs"*) cat "$FAKE/jobs.txt" ;;\n'
                       '  *"get pods"*) cat "$FAKE/pods.txt" ;;\n  *) echo "kubectl $*" ;;\nesac\n')
    kubectl.chmod(0o755)

    def run(jobs: str, pods: str = "", count: int = 2, timeout_s: int = 60):
        (tmp_path / "jobs.txt").write_text(jobs)
        (tmp_path / "pods.txt").write_text(pods)
        env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE": str(tmp_path)}
        body = f"set -euo pipefail\nnamespace=critbatch\ntimeout_s={timeout_s}\n{function}\nwait_for_jobs sel {count}\n"
        return subprocess.run(["bash", "-c", body], capture_output=True, text=True, env=env, timeout=30)

    return run


@pytest.mark.parametrize("jobs,pods,timeout_s,rc,says", [
    ("a SuccessCriteriaMet Complete\nb SuccessCriteriaMet Complete\n", "", 60, 0, ""),
    ("a Complete\nb FailureTarget Failed\n", "", 60, 1, "a Job failed:\nb FailureTarget Failed"),
    ("a \nb \n", "pa ImagePullBackOff\npb \n", 60, 1, "pods that cannot start:\npa ImagePullBackOff"),
    ("a \nb \n", "pa CreateContainerConfigError\n", 60, 1, "pa CreateContainerConfigError"),
    ("a Complete\nb \n", "pb \n", 0, 1, "sel: not complete after 0 s"),
])
def test_the_e2e_wait_fails_at_once_on_a_failed_job_or_a_stuck_pod(wait_for_jobs, jobs, pods, timeout_s, rc, says):
    result = wait_for_jobs(jobs, pods, timeout_s=timeout_s)
    assert result.returncode == rc, result.stderr
    assert says in result.stderr
