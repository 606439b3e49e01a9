"""Backend ``indexed``: one ``batch/v1`` Indexed Job per resource class, each index one cell.

    k8s/templates/job-indexed.yaml.j2   completionMode Indexed; pod i trains the class's i-th cell of
                                        <store>/<sweep>/sweep.yaml

The Job is named after its resource class (``critbatch-<sweep>-<class>``, shorter than a cell's name)
and its pods' hostnames ``<name>-<index>``. The policy is the Job's, per index: ``backoffLimitPerIndex``
retries and FailIndex instead of FailJob, so a bad cell fails its index, not its class. Where each cell
stands is read from the Job's ``completedIndexes`` and ``failedIndexes`` (critbatch.jobs.cluster.indexed).
"""

from __future__ import annotations

from .job import JobBackend


class IndexedBackend(JobBackend):
    name = "indexed"
    summary = "a batch/v1 Indexed Job per resource class, on one node: for sweeps of hundreds of cells"
    template = "job-indexed.yaml.j2"
    per_cell = False

    def name_suffixes(self, nodes: int, max_cells: int) -> tuple[str, ...]:
        return (f"-{max_cells - 1}",)

    def event_subjects(self, obj: dict) -> tuple[str, ...]:
        # A cell's view (critbatch.jobs.cluster.indexed) names its class's Job as its owner.
        owners = (obj.get("metadata") or {}).get("ownerReferences") or []
        return tuple(o["name"] for o in owners if o.get("kind") == self.kind) or super().event_subjects(obj)


INDEXED = IndexedBackend()
