"""The store space a sweep needs, printed by ``critbatch render`` before anything is created.

What a cell puts in the store, from its model's parameter bytes (``jobs/sweep/memory.json``, measured
once per model and input size) and its step count:

    kept      model.pt (the final fp32 weights), the step log (about STEP_ROW_BYTES a step, in parts of at
              most 500 steps) and a few small JSON files: what stays after ``_SUCCESS``
    running   the newest two checkpoints (weights and the optimizer's state each) and, while a third is written,
              that one too: pruned once ``_SUCCESS`` is written (jobs/train/finish.py)

The sweep needs every cell's kept bytes plus the running bytes of the cells that run at once (the
grid's ``max_active``, else all of them). A model the table does not know counts no weights, and the
line says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cell.spec import Cell, total_steps
from .sizing import load_table, memory_key

#: Bytes of one row of a cell's step log (Arrow IPC, measured on the digits preset: 100-150), and of a
#: part's own header; parts are cut every 500 steps or 15 s.
STEP_ROW_BYTES = 150
PART_BYTES = 2048
STEPS_PER_PART = 500
#: cell.json, _SUCCESS, the lease record, evaluation parts: a few kB.
SMALL_FILES_BYTES = 64 * 1024
#: Checkpoints a running cell holds at most: the two kept, and the one being written before the oldest goes.
CHECKPOINTS_AT_ONCE = 3


@dataclass(frozen=True)
class CellSpace:
    kept: int  # bytes left once the cell has finished
    running: int  # bytes on top of ``kept`` while it runs (its checkpoints)
    known: bool  # the model's weights are in the table


def cell_space(cell: Cell) -> CellSpace:
    entry = load_table().get(memory_key(cell))
    weights = entry["param_bytes"] if entry else 0
    steps = _steps(cell)
    logs = steps * STEP_ROW_BYTES + (steps // STEPS_PER_PART + 1) * PART_BYTES
    state = weights * cell.optimizer.state_copies()  # SGD's momentum (none at 0), Adam's two moments
    return CellSpace(kept=weights + logs + SMALL_FILES_BYTES, running=CHECKPOINTS_AT_ONCE * (weights + state),
                     known=entry is not None)


def _steps(cell: Cell) -> int:
    size = cell.train_size()
    if size is None:  # the data decides (linreg's n comes from its options, a plug-in's from its files)
        return cell.max_steps or 0
    return total_steps(cell, max(1, size // cell.batch_size))


def sweep_space(cells: list[Cell], max_active: int) -> str:
    """One line: what the sweep keeps, the most its running cells add, and their sum."""
    spaces = [cell_space(c) for c in cells]
    kept = sum(s.kept for s in spaces)
    at_once = max_active if 0 < max_active < len(spaces) else len(spaces)
    running = sum(sorted((s.running for s in spaces), reverse=True)[:at_once])
    unknown = sum(not s.known for s in spaces)
    note = f"; {unknown} cells of models memory.json does not know count no weights" if unknown else ""
    return (f"store: this sweep needs about {_size(kept + running)}: {_size(kept)} kept (model.pt and logs of "
            f"{len(spaces)} cells) + up to {_size(running)} of checkpoints while {at_once} cells run (pruned at "
            f"_SUCCESS){note}")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
