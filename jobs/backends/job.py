"""Backend ``job``: one ``batch/v1`` Job per cell, on one node (the default for ``resources.nodes: 1``).

    k8s/templates/job-cell.yaml.j2      the launcher with --standalone --nproc-per-node=<processes>

The Job's pods keep the Job's name as their hostname, so the name budget is the name itself. Its
failure policy is the template's: ``backoffLimit`` retries, a ``podFailurePolicy`` that ignores a
disrupted pod (DisruptionTarget) and fails the Job at once on the permanent exit codes (FailJob).
"""

from __future__ import annotations

from typing import Any

from .base import FAILED, RETRIED, RETRIED_UNLESS_DISRUPTED, SUCCEEDED, Backend
from ..cell.errors import ExitCode


class JobBackend(Backend):
    name = "job"
    summary = "a batch/v1 Job per cell, on one node"
    kind = "Job"
    group = "batch"
    version = "v1"
    plural = "jobs"
    template = "job-cell.yaml.j2"
    max_nodes = 1
    #: The Job controller adds SuccessCriteriaMet / FailureTarget before Complete / Failed (Kubernetes
    #: 1.31 and later), once it has decided and while the last pods terminate.
    succeeded_conditions = ("Complete", "SuccessCriteriaMet")
    failed_conditions = ("Failed", "FailureTarget")
    failure_policy = {
        ExitCode.OK: SUCCEEDED,
        ExitCode.CRASH: RETRIED,
        ExitCode.CONFIG: FAILED,  # FailJob
        ExitCode.NO_DEVICE: FAILED,  # FailJob
        ExitCode.INTERRUPTED: RETRIED,
        ExitCode.KILLED: RETRIED,
        ExitCode.PREEMPTED: RETRIED_UNLESS_DISRUPTED,  # Ignore on DisruptionTarget
        ExitCode.STORE_UNAVAILABLE: RETRIED,
        ExitCode.LEASE_HELD: RETRIED,
        ExitCode.BASE_PENDING: RETRIED,
    }

    def torchrun_args(self, placement: Any) -> list[str]:
        return ["--standalone", f"--nproc-per-node={placement.procs_per_node}"]

    def is_running(self, obj: dict) -> bool:
        return bool((obj.get("status") or {}).get("active"))


JOB = JobBackend()
