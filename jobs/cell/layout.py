"""Where a sweep's objects live in the store (design section 5).

    <store>/<sweep>/sweep.yaml
    <store>/<sweep>/cells/<cell-id>/{cell.json, steps/, evals/, checkpoint/, _SUCCESS, _FAILED}
    <store>/<sweep>/report/...
"""

from __future__ import annotations

#: Store URL used when none is given.
DEFAULT_STORE = "./critbatch-out"


def cell_prefix(sweep: str, cell_id: str) -> str:
    return f"{sweep}/cells/{cell_id}"


def success_key(sweep: str, cell_id: str) -> str:
    return f"{cell_prefix(sweep, cell_id)}/_SUCCESS"


def failed_key(sweep: str, cell_id: str) -> str:
    """``_FAILED``: the cell's object failed on the cluster (JSON: reason, object, when). Written by
    ``critbatch submit``/``status``, so a failure outlives the Job's TTL; ``submit --retry-failed`` removes it."""
    return f"{cell_prefix(sweep, cell_id)}/_FAILED"


def report_prefix(sweep: str) -> str:
    return f"{sweep}/report"
