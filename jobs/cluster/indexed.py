"""Backend ``indexed``: where each cell stands, read from its resource class's Indexed Job.

    status.completedIndexes: "0-3,5"     status.failedIndexes: "4"     (the Job controller's, per index)

One LIST of the sweep's Jobs gives every class's Job, and each Job's two index sets give every cell's
state: no object per cell exists. :func:`index_views` turns them into one small Job-like view per cell,
under the name a per-cell Job would have, so submit and status read the cells of every backend alike.
A running index is one whose pod runs (the pods carry the Job controller's completion-index label).
"""

from __future__ import annotations

from ..backends import INDEXED, k8s
from ..sweep.grid import Grid

#: The labels the Job controller puts on an Indexed Job's pods (Kubernetes >= 1.28).
POD_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
COMPLETE = INDEXED.succeeded_conditions[0]  # a batch/v1 Job's


def indexes(text: str | None) -> set[int]:
    """The indexes of a Job's ``completedIndexes``/``failedIndexes``: ``"0-3,5"`` -> {0, 1, 2, 3, 5}."""
    out: set[int] = set()
    for part in (text or "").split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return out


def index_views(grid: Grid, jobs: list[dict], pods: list[dict]) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """(cell object name -> a Job-like view of its index, cell id -> its pods) for the cells whose class's
    Indexed Job is in ``jobs``."""
    classes = {name: [c.id for c in cells] for name, (_, cells) in grid.resource_classes().items()}
    by_name = {j["metadata"]["name"]: j for j in jobs}
    cell_pods: dict[str, list[dict]] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        meta = pod["metadata"]
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        ids = classes.get(labels.get(k8s.LABEL_RESOURCE_CLASS, ""))
        index = labels.get(POD_INDEX_LABEL, annotations.get(POD_INDEX_LABEL))
        if ids is not None and index is not None and int(index) < len(ids):
            cell_pods.setdefault(ids[int(index)], []).append(pod)
    views: dict[str, dict] = {}
    for class_name, ids in classes.items():
        job = by_name.get(k8s.object_name(grid.sweep, class_name))
        if job is None:
            continue
        status = job.get("status") or {}
        done, failed = indexes(status.get("completedIndexes")), indexes(status.get("failedIndexes"))
        job_failed = INDEXED.state(job) == "failed"
        for i, cell_id in enumerate(ids):
            view = {"kind": INDEXED.kind,
                    "metadata": {"name": k8s.object_name(grid.sweep, cell_id),
                                 "ownerReferences": [{"kind": INDEXED.kind, "name": job["metadata"]["name"]}]},
                    "spec": {"suspend": INDEXED.is_suspended(job)}, "status": {}}
            where = f"index {i} of {job['metadata']['name']}"
            if i in done:
                view["status"]["conditions"] = [{"type": COMPLETE, "status": "True"}]
                finished = [_finished_at(p) for p in cell_pods.get(cell_id, [])
                            if (p.get("status") or {}).get("phase") == "Succeeded"]
                if any(finished):  # when the index's pod ended: how long its _SUCCESS has been on its way
                    view["status"]["completionTime"] = max(t for t in finished if t)
            elif i in failed or job_failed:
                # A failed index used up its retries or exited with a bad-configuration code; an index of a
                # Job that failed as a whole (its deadline, maxFailedIndexes) fails with the Job's reason.
                reason, message = ("FailedIndex", f"{where} failed") if i in failed else (INDEXED.failure(job), where)
                view["status"]["conditions"] = [{"type": k8s.CONDITION_FAILED, "status": "True",
                                                 "reason": reason, "message": message}]
            elif any((p.get("status") or {}).get("phase") == "Running" for p in cell_pods.get(cell_id, [])):
                view["status"]["active"] = 1
            views[view["metadata"]["name"]] = view
    return views, cell_pods



def _finished_at(pod: dict) -> str:
    """When a pod's last container terminated (RFC 3339), or ""."""
    times = [((cs.get("state") or {}).get("terminated") or {}).get("finishedAt") or ""
             for cs in (pod.get("status") or {}).get("containerStatuses") or []]
    return max(times, default="")
