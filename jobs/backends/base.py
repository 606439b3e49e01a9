"""What every backend is: a kind of Kubernetes object a cell runs as, and everything critbatch knows about it.

A backend carries what the renderer needs (its template, the container its controller looks for, the
launcher's torchrun options, its template's own variables, which pod fields it can set), what the
cluster client needs (kind, API group, version and plural, how it is suspended), what ``status`` and
``submit`` need (its status reader: one word for where the object stands, and why it failed), the
names its controller derives from the object's (the name budget) and its failure policy as a table:
what its controller does with each of the trainer's exit codes (the README's "Exit codes").

The renderer and the cluster client take a backend as an argument and never ask for its name; a new
backend (a JobSet, a Ray job) is a subclass in a module of its own, registered in ``__init__.py``, and
its template in ``k8s/templates``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping

from . import k8s
from ..cell.errors import ExitCode

#: The exit codes every failure-policy table answers for: those a cell's pod can end with (ExitCode.in_pod):
#: the trainer's own, a crash (1) and the signal deaths a kubelet reports.
EXIT_CODES = tuple(code for code in ExitCode if code.in_pod)

#: What ``Backend.state`` calls an object.
STATES = ("succeeded", "failed", "deleting", "suspended", "running", "created")


@dataclass(frozen=True)
class Reaction:
    """What a backend's controller does when the cell's pod exits with a code.

    ``verdict``: succeeded, retried (a new pod, which resumes from the cell's checkpoint) or failed (for
    good). ``counted``: the retry uses up one of the cell's ``resources.backoff_limit`` retries.
    ``counted_if_disrupted``: the same when the pod carries the ``DisruptionTarget`` condition (preempted,
    evicted); None where the policy does not look at it.
    """

    verdict: Literal["succeeded", "retried", "failed"]
    counted: bool = False
    counted_if_disrupted: bool | None = None


SUCCEEDED = Reaction("succeeded")
FAILED = Reaction("failed")
RETRIED = Reaction("retried", counted=True)
#: Retried, and not counted when the pod was disrupted (a podFailurePolicy Ignore rule on DisruptionTarget).
RETRIED_UNLESS_DISRUPTED = Reaction("retried", counted=True, counted_if_disrupted=False)


def true_conditions(obj: dict) -> set[str]:
    """The types of an object's conditions whose status is True."""
    return {c.get("type") for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


class Backend:
    """One kind of object a cell runs as. Subclasses set the class attributes and override what differs."""

    #: The name a grid's ``backend:`` and ``--backend`` use.
    name: ClassVar[str]
    #: One line for ``--help`` and the docs.
    summary: ClassVar[str]
    #: Kept for clusters that still run it; upstream has moved on (the help and the docs say so).
    legacy: ClassVar[bool] = False
    kind: ClassVar[str]
    group: ClassVar[str]
    version: ClassVar[str]
    plural: ClassVar[str]
    #: The template in k8s/templates that renders one object of this backend.
    template: ClassVar[str]
    #: The name of the trainer's container (some controllers look for theirs by name).
    container_name: ClassVar[str] = k8s.CONTAINER_NAME
    #: One object per cell, named after it; False: one object per resource class (the Indexed Job).
    per_cell: ClassVar[bool] = True
    #: The most nodes one object spans; None: any number.
    max_nodes: ClassVar[int | None] = None
    #: Whether the object can give its pods a priority class (``resources.priority_class``).
    pod_priority_class: ClassVar[bool] = True
    #: Where the object keeps its suspend flag.
    suspend_path: ClassVar[tuple[str, ...]] = ("spec", "suspend")
    #: The condition types that say the object succeeded, and failed (in the order their reason is read).
    succeeded_conditions: ClassVar[tuple[str, ...]]
    failed_conditions: ClassVar[tuple[str, ...]] = (k8s.CONDITION_FAILED,)
    #: Exit code -> what the controller does (every code in EXIT_CODES).
    failure_policy: ClassVar[Mapping[int, Reaction]]

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def __repr__(self) -> str:
        return f"<backend {self.name}: {self.api_version} {self.kind}>"

    # ---- names ---------------------------------------------------------------------------------------------

    def name_suffixes(self, nodes: int, max_cells: int) -> tuple[str, ...]:
        """What the controller appends to the object's name for the names it derives (pods' hostnames,
        Services), each of which must stay a DNS label of at most 63 characters. ``max_cells``: the most
        cells one object may hold (an Indexed Job's pods are numbered)."""
        return ()

    def name_budget(self, nodes: int, max_cells: int) -> int:
        """Characters the longest derived name adds after the object's own."""
        return max((len(s) for s in self.name_suffixes(nodes, max_cells)), default=0)

    # ---- rendering ------------------------------------------------------------------------------------------

    def render_problems(self, *, nodes: int, priority_class: str | None) -> list[str]:
        """Why a grid's resources cannot be rendered as this backend's objects (one line each)."""
        out = []
        if self.max_nodes is not None and nodes > self.max_nodes:
            out.append(f"backend: {self.name!r} runs on one node, but resources.nodes is {nodes}; use "
                       f"{' or '.join(multi_node_names())}")
        return out

    def torchrun_args(self, placement: Any) -> list[str]:
        """The launcher's torchrun options for a pod of ``placement`` (its nodes, GPUs, processes per node)."""
        raise NotImplementedError

    def context(self, placement: Any) -> dict[str, Any]:
        """The template's own variables beyond the pod body's (render.py fills those in)."""
        return {"container_name": self.container_name}

    def pod_specs(self, obj: dict) -> list[dict]:
        """The pod specs (or pod spec patches) inside one of this backend's objects."""
        return [obj["spec"]["template"]["spec"]]

    def env_lists(self, obj: dict) -> list[list[dict]]:
        """Every env list the object gives a container."""
        return [c.get("env", []) for pod in self.pod_specs(obj) for c in pod.get("containers", [])]

    # ---- suspending -------------------------------------------------------------------------------------------

    def suspend_patch(self, suspend: bool) -> dict:
        """The merge patch that suspends or resumes an object."""
        patch: dict = {self.suspend_path[-1]: suspend}
        for key in reversed(self.suspend_path[:-1]):
            patch = {key: patch}
        return patch

    def set_suspend(self, obj: dict, suspend: bool) -> dict:
        """``obj`` with its suspend flag set (the field submit owns: never rendered, so re-applying a rendered
        stream never resets it)."""
        node = obj
        for key in self.suspend_path[:-1]:
            node = node[key]
        node[self.suspend_path[-1]] = suspend
        return obj

    def is_suspended(self, obj: dict) -> bool:
        node: Any = obj
        for key in self.suspend_path:
            node = (node or {}).get(key) if isinstance(node, dict) else None
        return bool(node) or k8s.CONDITION_SUSPENDED in true_conditions(obj)

    # ---- the status reader ------------------------------------------------------------------------------------

    def state(self, obj: dict) -> str:
        """succeeded | failed | deleting | suspended | running | created (STATES)."""
        conditions = true_conditions(obj)
        if conditions & set(self.succeeded_conditions):
            return "succeeded"
        if conditions & set(self.failed_conditions):
            return "failed"
        if (obj.get("metadata") or {}).get("deletionTimestamp"):
            return "deleting"
        if self.is_suspended(obj):
            return "suspended"
        if self.is_running(obj):
            return "running"
        return "created"

    def is_running(self, obj: dict) -> bool:
        """Whether the object has pods at work (pending ones included, where the controller counts them)."""
        raise NotImplementedError

    def failure(self, obj: dict) -> str:
        """The failed condition's reason and message, e.g. ``BackoffLimitExceeded: Job has reached ...``."""
        conditions = (obj.get("status") or {}).get("conditions") or []
        for kind in self.failed_conditions:
            for cond in conditions:
                if cond.get("type") == kind and cond.get("status") == "True":
                    return ": ".join(p for p in (cond.get("reason"), cond.get("message")) if p) or kind
        return k8s.CONDITION_FAILED

    #: The kind of the object whose controller creates the pods, on which it records why it could not
    #: (a Warning event, e.g. the Job controller's FailedCreate for a missing ServiceAccount).
    @property
    def event_kind(self) -> str:
        return self.kind

    def event_subjects(self, obj: dict) -> tuple[str, ...]:
        """The names of the ``event_kind`` objects that create this object's pods."""
        return (obj["metadata"]["name"],)

    def completion_time(self, obj: dict) -> str | None:
        """When the object succeeded (RFC 3339), as its status says; None if it does not say."""
        status = obj.get("status") or {}
        if status.get("completionTime"):
            return status["completionTime"]
        for cond in status.get("conditions") or []:
            if cond.get("type") in self.succeeded_conditions and cond.get("status") == "True":
                return cond.get("lastTransitionTime")
        return None


def multi_node_names() -> list[str]:
    """The names of the backends whose objects span nodes, the default first."""
    from . import REGISTRY, DEFAULT_MULTI_NODE

    names = [b.name for b in REGISTRY.values() if b.max_nodes is None]
    return sorted(names, key=lambda n: n != DEFAULT_MULTI_NODE.name)
