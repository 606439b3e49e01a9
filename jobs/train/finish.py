"""The end of a cell: paper 4.2's error at the final weights, then the log parts, ``model.pt`` and ``_SUCCESS``.

``_SUCCESS`` is written last, so its presence means everything else is in
the store: before it, the log parts are read back, every step must be there
exactly once and every part whole (else :class:`DamagedLogs`, and nothing is
marked), and their sizes and row counts go into ``_SUCCESS`` as its ``logs``
manifest; the cell's lease is checked right before the write. Rank 0's final writes wait out a store outage, together for at
most STORE_PATIENCE_S (:func:`critbatch.jobs.store.retry.wait_out_outage`);
past that they end in StoreUnavailable, which ``critbatch train`` exits with
as 202: the Job retries the pod, and the next attempt resumes from the last
checkpoint. Once ``_SUCCESS`` is there the checkpoints are deleted (a
finished cell is never resumed; ``model.pt`` keeps its final weights), so a
sweep's store holds checkpoints only for the cells still running, and the kept
ones of cells with ``keep`` (listed in ``_SUCCESS`` as ``kept``: branches
start from them).
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..cell.errors import StoreUnavailable
from ..cell.layout import cell_prefix, success_key
from ..cell.logschema import SCHEMAS, STATUS_DIVERGED, STATUS_DONE, STATUS_REACHED, success_summary
from ..cell.spec import Cell
from ..cell.version import code_version
from ..store import Store
from ..store.cellstate import readable_parts
from ..store.logstream import LogStream
from ..store.retry import wait_out_outage
from .checkpoint import Checkpointer
from .distributed import Dist, average_gradients_
from .evaluate import linear_approx_error
from .guard import CellGuard

#: Seconds the final writes (log parts, model.pt, _SUCCESS) wait out a store outage, all together.
STORE_PATIENCE_S = 1800.0


def final_linear_approx_error(model: nn.Module, batch: tuple[Tensor, Tensor], *, parts: int,
                              loss_of: Callable[[Tensor, Tensor], Tensor], dist: Dist, loss_at: Callable[[], float],
                              step_size: float) -> tuple[float, dict]:
    """Paper 4.2 at the final weights, with g_m the gradient of one global batch (this rank's share ``batch``).

    The step is ``step_size``: for SGD eta_0 * m / m0 (the LSR step, as in the
    paper's Figure 2, critbatch.jobs.cell.science.lsr_lr through
    optimizers.probe_step), whatever the cell's strategy; L is ``loss_at()``,
    the train-subset loss.
    Both L and g_m are taken in eval mode (no dropout, BatchNorm on running
    statistics) so that g_m is the gradient of the L evaluated. ``loss_of`` is
    the mean loss of ``model`` on a micro-batch; the share is split into
    ``parts`` of them, as in training.
    """
    x, y = batch
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> None:
        was_training = model.training
        model.eval()
        try:
            xs, ys = (x.chunk(parts), y.chunk(parts)) if parts > 1 else ((x,), (y,))
            for xm, ym in zip(xs, ys):
                (loss_of(xm, ym) / len(xs)).backward()
            average_gradients_(params, dist)
        finally:
            model.train(was_training)

    return linear_approx_error(model, loss_at, gradient, step_size)


def summarize(cell: Cell, *, steps: int, wall_time_s: float, metric: str, last_eval: dict,
              diverged: str | None, lin_approx: tuple[float, dict] | None, stop: dict | None = None) -> dict:
    """The ``_SUCCESS`` body: done (or reached, when ``stop`` says the run stopped at its threshold) with the last
    evaluation's figures, or diverged (with the reason) without."""
    final: dict[str, Any] = {"train_loss": None, "test_loss": None, "metric": metric, "train_metric": None,
                             "test_metric": None, "lin_approx_error": None}
    if diverged is None:
        for key in ("train_loss", "test_loss", "train_metric", "test_metric"):
            final[key] = _finite_or_none(last_eval.get(key))
        if lin_approx is not None:
            error, details = lin_approx
            final["lin_approx_error"] = _finite_or_none(error)
            final["lin_approx"] = {k: _finite_or_none(v) for k, v in details.items()}
    return success_summary(
        cell_id=cell.id, status=STATUS_DIVERGED if diverged else STATUS_REACHED if stop else STATUS_DONE,
        steps=steps, samples_seen=steps * cell.batch_size, wall_time_s=wall_time_s, final=final,
        code_version=code_version(), reason=diverged, stop=None if diverged else stop,
    )


class DamagedLogs(RuntimeError):
    """The cell's log parts in the store are not whole at the end (a part lost or cut since its upload)."""


def write_results(store: Store, cell: Cell, summary: dict, *, logs: LogStream | None,
                  weights: dict[str, Tensor] | None, patience_s: float = STORE_PATIENCE_S,
                  guard: CellGuard | None = None, kept: frozenset[int] = frozenset()) -> dict:
    """Rank 0's last writes, in order: every log part, ``model.pt`` (``weights``; None: none), ``_SUCCESS``;
    then the checkpoints are pruned (:func:`prune_checkpoints`), all but the steps in ``kept``.

    With a log stream, its parts are then read back and checked (:func:`log_manifest`), and the
    ``_SUCCESS`` written (and returned) carries their manifest; with a ``guard``, the lease is
    checked before it is written. Raises StoreUnavailable if the store is still down ``patience_s``
    seconds after the start; DamagedLogs or LeaseHeld with nothing marked.
    """
    deadline = time.monotonic() + patience_s
    if logs is not None:
        logs.close(timeout=max(0.0, deadline - time.monotonic()))
        prefix = cell_prefix(cell.sweep, cell.id)
        manifest = wait_out_outage(lambda: log_manifest(store, prefix, summary["steps"]),
                                   what=f"read back {store.join(prefix)}", deadline=deadline, base_delay=1.0)
        summary = {**summary, "logs": manifest}
    if weights is not None:
        buf = io.BytesIO()
        torch.save(weights, buf)
        _put(store, f"{cell_prefix(cell.sweep, cell.id)}/model.pt", buf.getvalue(), deadline)
    if guard is not None:
        wait_out_outage(lambda: guard.fence("writing _SUCCESS"), what="check the lease", deadline=deadline,
                        base_delay=1.0)
    _put(store, success_key(cell.sweep, cell.id), (json.dumps(summary, indent=2) + "\n").encode(), deadline)
    prune_checkpoints(store, cell, kept)
    return summary


def log_manifest(store: Store, prefix: str, steps: int) -> dict:
    """The log parts as the store holds them: ``{kind: {"rows": n, "parts": [bytes, ...]}}``.

    Every part must be whole and the step rows exactly 1..``steps``, each once (else DamagedLogs).
    """
    manifest = {}
    for kind in SCHEMAS:
        scan = readable_parts(store, prefix, kind)
        if scan.problem is not None:
            raise DamagedLogs(f"{store.join(prefix)}: {scan.problem}")
        if kind == "steps":
            logged = scan.steps.to_pylist() if scan.steps is not None else []
            if sorted(logged) != list(range(1, steps + 1)):
                raise DamagedLogs(f"{store.join(prefix)}: {len(logged)} step rows ({len(set(logged))} distinct), "
                                  f"not steps 1..{steps} once each")
        manifest[kind] = {"rows": scan.rows, "parts": scan.sizes}
    return manifest


def prune_checkpoints(store: Store, cell: Cell, kept: frozenset[int] = frozenset()) -> None:
    """Delete ``<cell>/checkpoint/`` once ``_SUCCESS`` is written: a finished cell is never resumed; with
    ``kept`` (the steps of the cell's ``keep`` points), every checkpoint but those.

    A ResNet-34 cell's two checkpoints (weights and momentum, about 170 MB each) would otherwise outlive
    it. The cell is done whatever happens here, so a store that fails now leaves them, with one line
    saying so, instead of failing the cell.
    """
    prefix = cell_prefix(cell.sweep, cell.id)
    folder = f"{prefix}/checkpoint/"
    try:
        if kept:
            Checkpointer(store, prefix, pinned=kept).prune_unpinned()
        else:
            store.delete_prefix(folder)
    except StoreUnavailable as err:
        print(f"critbatch train: cell {cell.id} is done, but its checkpoints stay in {store.join(folder)} "
              f"(store unavailable: {err})", file=sys.stderr, flush=True)


def _put(store: Store, key: str, data: bytes, deadline: float) -> None:
    wait_out_outage(lambda: store.put_bytes(key, data), what=f"write {store.join(key)}", deadline=deadline,
                    base_delay=1.0, max_delay=60.0)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
