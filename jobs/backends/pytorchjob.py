"""Backend ``pytorchjob``: one Kubeflow Training Operator ``kubeflow.org/v1`` PyTorchJob per cell.

    k8s/templates/pytorchjob-cell.yaml.j2   a Master and nodes - 1 Workers

The legacy multi-node path: the Kubeflow distribution removed the v1 Training Operator in 2026 and Kueue
plans to drop its PyTorchJob integration; Kubeflow Trainer's TrainJob (backend ``trainjob``, the default
for several nodes) replaces it. This backend stays for clusters that still run the operator. The operator names each replica's
pod and Service ``<name>-master-0`` and ``<name>-worker-<i>`` (the pod's hostname), finds the trainer's
container by the name ``pytorch`` and injects MASTER_ADDR and MASTER_PORT, which the launcher's options
name. Its replicas restart on ``ExitCode``: 1-127 are permanent, 128-255 retried, each counted against
``runPolicy.backoffLimit``; it has no Running-or-not count of pods, but Running and Restarting conditions.
"""

from __future__ import annotations

from typing import Any

from .base import FAILED, RETRIED, SUCCEEDED, Backend, true_conditions
from ..cell.errors import ExitCode


class PyTorchJobBackend(Backend):
    name = "pytorchjob"
    summary = "a Kubeflow Training Operator v1 PyTorchJob per cell (legacy: for clusters that still run it)"
    legacy = True
    kind = "PyTorchJob"
    group = "kubeflow.org"
    version = "v1"
    plural = "pytorchjobs"
    template = "pytorchjob-cell.yaml.j2"
    #: The operator finds the PyTorch container and its rendezvous port by these names.
    container_name = "pytorch"
    port = 23456
    suspend_path = ("spec", "runPolicy", "suspend")
    succeeded_conditions = ("Succeeded",)
    running_conditions = ("Running", "Restarting")
    failure_policy = {
        ExitCode.OK: SUCCEEDED,
        ExitCode.CRASH: FAILED,  # 1-127 are permanent
        ExitCode.CONFIG: FAILED,
        ExitCode.NO_DEVICE: FAILED,
        ExitCode.INTERRUPTED: RETRIED,
        ExitCode.KILLED: RETRIED,
        ExitCode.PREEMPTED: RETRIED,  # the ExitCode policy does not look at DisruptionTarget
        ExitCode.STORE_UNAVAILABLE: RETRIED,
        ExitCode.LEASE_HELD: RETRIED,
        ExitCode.BASE_PENDING: RETRIED,
    }

    def name_suffixes(self, nodes: int, max_cells: int) -> tuple[str, ...]:
        return ("-master-0",) + ((f"-worker-{nodes - 2}",) if nodes > 1 else ())

    def torchrun_args(self, placement: Any) -> list[str]:
        # $(VAR) is Kubernetes' own substitution of the container's variables, not a shell.
        return ["--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)"]

    def context(self, placement: Any) -> dict[str, Any]:
        nodes = placement.nodes
        return {
            "replicas": [{"type": "Master", "count": 1}] + ([{"type": "Worker", "count": nodes - 1}] if nodes > 1 else []),
            "procs_per_node": placement.procs_per_node,
            "container_name": self.container_name,
            "master_port": self.port,
        }

    def pod_specs(self, obj: dict) -> list[dict]:
        return [r["template"]["spec"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]

    def is_running(self, obj: dict) -> bool:
        return bool(set(self.running_conditions) & true_conditions(obj))


PYTORCHJOB = PyTorchJobBackend()
