"""The log contract between a cell and the analysis (design section 5).

Each cell writes Arrow IPC files (the file format, not the stream format)
under ``<sweep>/cells/<id>/steps/part-NNNNNN.arrow`` and
``.../evals/part-NNNNNN.arrow``, numbered from 0 without gaps. Anyone may read
them with pyarrow, polars or DuckDB.

``steps``: one row per iteration. The four ``noise_*`` columns are null except
on the steps where the gradient-noise statistics are measured (design 6):
``noise_g_small_sq`` = |G_b|^2 for the small batch b, ``noise_g_big_sq`` =
|G_B|^2 for the large batch B, both at the same weights.

``evals``: one row per (evaluation, split, metric). ``loss`` is the split's
mean loss; ``metric``/``value`` the task metric (accuracy, perplexity, mIoU,
or ``none``/NaN for regression).

``_SUCCESS``: JSON written last, see :func:`success_summary`.
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa

STEPS_SCHEMA = pa.schema(
    [
        ("cell_id", pa.string()),
        ("step", pa.int64()),  # 1-based iteration number after the update
        ("epoch", pa.float64()),  # fractional epochs completed
        ("samples_seen", pa.int64()),
        ("lr", pa.float64()),
        ("train_loss", pa.float64()),  # the minibatch loss of this step
        ("wall_time_s", pa.float64()),  # seconds of training since the cell started (excl. evals)
        ("noise_b_small", pa.int64()),
        ("noise_b_big", pa.int64()),
        ("noise_g_small_sq", pa.float64()),
        ("noise_g_big_sq", pa.float64()),
    ]
)

EVALS_SCHEMA = pa.schema(
    [
        ("cell_id", pa.string()),
        ("step", pa.int64()),  # 0 = before training
        ("epoch", pa.float64()),
        ("split", pa.string()),  # train | test
        ("loss", pa.float64()),
        ("metric", pa.string()),  # accuracy | perplexity | miou | none
        ("value", pa.float64()),
    ]
)

SCHEMAS = {"steps": STEPS_SCHEMA, "evals": EVALS_SCHEMA}

#: Metric name per task.
TASK_METRIC = {"classification": "accuracy", "language_model": "perplexity", "segmentation": "miou", "regression": "none"}

STATUS_DONE = "done"
STATUS_DIVERGED = "diverged"
#: Stopped at its threshold (the cell's ``stop`` field): ``_SUCCESS`` carries k; the run is not a whole one.
STATUS_REACHED = "reached"
#: Every status a ``_SUCCESS`` may say.
STATUSES = (STATUS_DONE, STATUS_DIVERGED, STATUS_REACHED)


def part_key(prefix: str, kind: str, index: int) -> str:
    """``<prefix>/<kind>/part-NNNNNN.arrow``."""
    return f"{prefix}/{kind}/part-{index:06d}.arrow"


def part_index(key: str) -> int:
    return int(key.rsplit("part-", 1)[1].split(".", 1)[0])


def table_to_ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def ipc_to_table(data: bytes) -> pa.Table:
    """Read an Arrow IPC file; raises ``pa.ArrowInvalid`` on a corrupt or truncated one."""
    return pa.ipc.open_file(pa.BufferReader(data)).read_all()


def success_summary(
    *,
    cell_id: str,
    status: str,
    steps: int,
    samples_seen: int,
    wall_time_s: float,
    final: dict[str, Any],
    code_version: str,
    reason: str | None = None,
    logs: dict[str, Any] | None = None,
    stop: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of ``_SUCCESS``.

    ``final`` holds the last evaluation: ``train_loss``, ``test_loss``,
    ``metric``, ``test_metric`` and ``lin_approx_error`` (paper 4.2), any of
    which may be None (a diverged cell has no final weights worth measuring).
    ``logs``, the manifest of what the store holds, per kind:
    ``{"steps": {"rows": 7680, "parts": [bytes of part 0, ...]}, "evals": {...}}``;
    a part missing or of another size marks the cell damaged (critbatch.jobs.store.cellstate).
    ``stop``, for status ``reached``: the threshold, ``k`` (the first crossing, interpolated in log loss, the
    analysis's k(m; eps)) and the confirmation (critbatch.jobs.train.stop); ``k`` is also given at the top.
    """
    extra = {} if logs is None else {"logs": logs}
    if stop is not None:
        extra.update(k=stop["k"], stop=stop)
    return {
        "cell_id": cell_id,
        "status": status,
        "steps": steps,
        "samples_seen": samples_seen,
        "wall_time_s": wall_time_s,
        "final": final,
        "code_version": code_version,
        "reason": reason,
        **extra,
    }
