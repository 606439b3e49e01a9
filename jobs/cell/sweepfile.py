"""``<store>/<sweep>/sweep.yaml``: the grid as written and every cell it expanded to, with its plan.

    spec:     the grid spec as written
    cells:    - {id, cell, plan: {resource_class, nodes, gpus, accumulation, micro_batch}}   in the grid's order
    classes:  {<resource class>: {digest, cells: [id, ...]}}     the cells that share a pod, in that order

The sweep writes it (critbatch.jobs.sweep.grid, before any pod starts); the report shows it; a pod of
the Indexed Job backend reads it to learn which cell is its own: the one at its JOB_COMPLETION_INDEX in
its resource class (``critbatch train --cell-from-sweep``). The class's digest, a hash of its cell ids
in order, is in the Job's command line too, so a sweep.yaml rewritten for another grid fails that pod
(exit code 2) instead of training a cell the Job was not made for.
"""

from __future__ import annotations

import hashlib
from typing import Any

import yaml

from .errors import ConfigError

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def class_digest(cell_ids: list[str]) -> str:
    """12 hex digits naming a resource class's cells in their order."""
    return hashlib.sha256("\n".join(cell_ids).encode()).hexdigest()[:12]


def sweep_document(spec: dict, entries: list[dict[str, Any]]) -> str:
    """The YAML text; ``entries``: ``{"id", "cell", "plan"}`` per cell, ``plan`` naming its resource class."""
    classes: dict[str, list[str]] = {}
    for entry in entries:
        classes.setdefault(entry["plan"]["resource_class"], []).append(entry["id"])
    doc = {"spec": spec, "cells": entries,
           "classes": {name: {"digest": class_digest(ids), "cells": ids} for name, ids in classes.items()}}
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)


def cell_in_class(text: str, where: str, resource_class: str, index: int, digest: str) -> dict[str, Any]:
    """The entry (``id``, ``cell``, ``plan``) of the ``index``-th cell of ``resource_class`` in sweep.yaml
    ``text`` (read from ``where``); ConfigError when the file, the class, the index or the digest does not
    match."""
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        raise ConfigError(f"--cell-from-sweep: {where} is not valid YAML ({' '.join(str(err).split())})") from None
    classes = doc.get("classes") if isinstance(doc, dict) else None
    if not isinstance(classes, dict):
        raise ConfigError(f"--cell-from-sweep: {where} lists no resource classes; it was written by an older "
                          "critbatch: submit the grid again")
    if resource_class not in classes:
        raise ConfigError(f"--resource-class: {where} has no class {resource_class!r}; it has "
                          f"{', '.join(classes) or 'none'}")
    found = classes[resource_class]
    if found.get("digest") != digest:
        raise ConfigError(f"--sweep-digest: the cells of class {resource_class!r} in {where} (digest "
                          f"{found.get('digest')}) are not those this Job was rendered for ({digest}): the "
                          "sweep.yaml was rewritten for another grid; render and submit that grid again")
    ids = found["cells"]
    if not 0 <= index < len(ids):
        raise ConfigError(f"--index: {index} is outside class {resource_class!r}, which has {len(ids)} cells")
    cell_id = ids[index]
    entry = next((e for e in doc.get("cells", []) if e.get("id") == cell_id), None)
    if entry is None:
        raise ConfigError(f"--cell-from-sweep: {where} names cell {cell_id} in class {resource_class!r} but "
                          "does not list it")
    return entry
