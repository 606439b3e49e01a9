"""The backends: each kind of Kubernetes object a cell can run as, one object each, and their registry.

    job          batch/v1 Job per cell, one node (the default for resources.nodes: 1)      job.py
    indexed      batch/v1 Indexed Job per resource class, one node                         indexed.py
    trainjob     Kubeflow Trainer v2 TrainJob per cell (the default for several nodes)     trainjob.py
    pytorchjob   Kubeflow Training Operator v1 PyTorchJob per cell (legacy: the Kubeflow   pytorchjob.py
                 distribution dropped the v1 operator in 2026; kept for clusters that run it)

A backend (base.py) carries its name, template, kind and API group, version and plural, the names its
controller derives (name budget), how it is suspended, its status reader and its failure-policy table.
The renderer (critbatch.jobs.sweep) and the cluster client (critbatch.jobs.cluster) ask it, never its
name. A new backend is a module here with its subclass, one line in REGISTRY and its template.
This package imports nothing heavy: the command line reads the names from it for ``--help``.
"""

from __future__ import annotations

from .base import EXIT_CODES, STATES, Backend, Reaction, true_conditions
from .indexed import INDEXED
from .job import JOB
from .pytorchjob import PYTORCHJOB
from .trainjob import TRAINJOB

#: Every backend by name, in the order the docs and ``--help`` list them.
REGISTRY: dict[str, Backend] = {b.name: b for b in (JOB, PYTORCHJOB, TRAINJOB, INDEXED)}
#: The names a grid's ``backend:`` and ``--backend`` accept.
NAMES = tuple(REGISTRY)
#: What a grid runs on when it names no backend: one node, and several.
DEFAULT_ONE_NODE = JOB
DEFAULT_MULTI_NODE = TRAINJOB


def get(name: str) -> Backend:
    """The backend called ``name``; KeyError for an unknown one (grids are validated against NAMES first)."""
    return REGISTRY[name]


def default_for(nodes: int) -> Backend:
    """The backend of a grid that names none."""
    return DEFAULT_ONE_NODE if nodes == 1 else DEFAULT_MULTI_NODE


def by_kind(kind: str) -> Backend:
    """The first backend whose objects are of ``kind`` (an Indexed Job reads as a Job)."""
    for backend in REGISTRY.values():
        if backend.kind == kind:
            return backend
    raise KeyError(kind)


def help_text() -> str:
    """``job | pytorchjob (legacy) | ...``: the choices as the command line's help lists them."""
    return ", ".join(f"{b.name} (legacy)" if b.legacy else b.name for b in REGISTRY.values())


__all__ = ["EXIT_CODES", "STATES", "Backend", "Reaction", "true_conditions", "REGISTRY", "NAMES", "JOB", "INDEXED",
           "PYTORCHJOB", "TRAINJOB", "DEFAULT_ONE_NODE", "DEFAULT_MULTI_NODE", "get", "default_for", "by_kind",
           "help_text"]
