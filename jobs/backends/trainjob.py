"""Backend ``trainjob``: one Kubeflow Trainer v2 ``trainer.kubeflow.org/v1alpha1`` TrainJob per cell.

    k8s/templates/trainjob-cell.yaml.j2         the trainer, numNodes x numProcPerNode, and a runtime patch
    k8s/trainer/clustertrainingruntime.yaml     the runtime ``critbatch`` every TrainJob names

Today's upstream multi-node path, and the default for cells on several nodes. Trainer builds a JobSet from the runtime: its replicated job ``node``
(whose container ``node`` Trainer's torch plugin fills with the TrainJob's trainer) names the pods
``<name>-node-0-<i>``. The failure policy is the runtime's: the node Job ignores a disrupted pod, fails
at once on the permanent exit codes (and the JobSet rule ``permanent`` then fails the TrainJob), fails
on any other exit and the JobSet restarts every node together, up to ``maxRestarts`` times. A TrainJob
has no Running condition: it runs while a child Job has active or ready pods (``status.jobsStatus``).
"""

from __future__ import annotations

from typing import Any

from .base import FAILED, RETRIED, RETRIED_UNLESS_DISRUPTED, SUCCEEDED, Backend
from ..cell.errors import ExitCode


class TrainJobBackend(Backend):
    name = "trainjob"
    summary = "a Kubeflow Trainer v2 TrainJob per cell, on the critbatch runtime (k8s/trainer)"
    kind = "TrainJob"
    group = "trainer.kubeflow.org"
    version = "v1alpha1"
    plural = "trainjobs"
    template = "trainjob-cell.yaml.j2"
    #: The ClusterTrainingRuntime every TrainJob refers to (k8s/trainer/clustertrainingruntime.yaml: Trainer's
    #: torch runtime with the failure policy of the exit-code table), its replicated job and trainer container
    #: (names Trainer's torch plugin looks for), and the owner of critbatch's runtime patch.
    runtime = "critbatch"
    replicated_job = "node"
    #: Kubeflow Trainer v2.4 refuses a runtime whose ReplicatedJob names are longer (its JobSet's pods are
    #: named <trainjob>-<replicated job>-<job index>-<pod index>, within the 63 of a DNS label).
    max_replicated_job_name = 20
    container_name = "node"
    patch_manager = "critbatch.io/render"
    #: A runtime patch carries only the pod fields Kubeflow Trainer lets a manager set; priorityClassName is
    #: not one of them.
    pod_priority_class = False
    succeeded_conditions = ("Complete",)
    failure_policy = {
        ExitCode.OK: SUCCEEDED,
        ExitCode.CRASH: RETRIED,  # the node Job fails, the JobSet restarts
        ExitCode.CONFIG: FAILED,  # FailJob, then FailJobSet
        ExitCode.NO_DEVICE: FAILED,
        ExitCode.INTERRUPTED: RETRIED,
        ExitCode.KILLED: RETRIED,
        ExitCode.PREEMPTED: RETRIED_UNLESS_DISRUPTED,
        ExitCode.STORE_UNAVAILABLE: RETRIED,
        ExitCode.LEASE_HELD: RETRIED,
        ExitCode.BASE_PENDING: RETRIED,
    }

    def name_suffixes(self, nodes: int, max_cells: int) -> tuple[str, ...]:
        # The node Job <name>-node-0 and its pods' hostnames <name>-node-0-<i>.
        return (f"-{self.replicated_job}-0-{nodes - 1}",)

    def render_problems(self, *, nodes: int, priority_class: str | None) -> list[str]:
        out = super().render_problems(nodes=nodes, priority_class=priority_class)
        if priority_class:
            # Refuse rather than drop the grid's setting.
            out.append(f"resources.priority_class: a TrainJob cannot set a pod priority class ({priority_class!r}); "
                       "unset it, or use backend pytorchjob (legacy), or job on one node")
        return out

    def torchrun_args(self, placement: Any) -> list[str]:
        return []  # the launcher reads the PET_* variables Trainer injects, as torchrun does

    def context(self, placement: Any) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "patch_manager": self.patch_manager,
            "nodes": placement.nodes,
            "procs_per_node": placement.procs_per_node,
            "replicated_job": self.replicated_job,
            "container_name": self.container_name,
        }

    def pod_specs(self, obj: dict) -> list[dict]:
        return [rj["template"]["spec"]["template"]["spec"]
                for patch in obj["spec"].get("runtimePatches", [])
                for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]]

    def env_lists(self, obj: dict) -> list[list[dict]]:
        return super().env_lists(obj) + [obj["spec"]["trainer"].get("env", [])]

    @property
    def event_kind(self) -> str:
        return "Job"  # the JobSet's node Job creates the pods

    def event_subjects(self, obj: dict) -> tuple[str, ...]:
        return (f"{obj['metadata']['name']}-{self.replicated_job}-0",)  # <jobset>-<replicated job>-<index>

    def is_running(self, obj: dict) -> bool:
        children = (obj.get("status") or {}).get("jobsStatus") or []
        return any(j.get("active") or j.get("ready") for j in children)


TRAINJOB = TrainJobBackend()
