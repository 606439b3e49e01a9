"""What the store says about a cell: finished, damaged or not there; and which of its log parts are whole.

A cell counts as finished only when its ``_SUCCESS`` is a readable summary
(status done or diverged) and the log parts that summary lists are all in the
store at their recorded sizes (``_SUCCESS``'s ``logs`` manifest, see
:func:`critbatch.jobs.cell.logschema.success_summary`): one GET and one LIST.
Otherwise it is ``damaged`` (an unreadable ``_SUCCESS``, a part missing,
truncated or added after it) and is trained again, from the newest checkpoint
whose parts are whole (:func:`readable_parts`), or from scratch. A
``_SUCCESS`` written before the manifest existed is checked for gaps only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from critbatch.jobs.cell.layout import cell_prefix, success_key
from critbatch.jobs.cell.logschema import SCHEMAS, STATUSES, ipc_to_table, part_index

from .base import Store

KINDS = tuple(SCHEMAS)
ABSENT = "absent"
DAMAGED = "damaged"


@dataclass
class CellState:
    """``state``: done | diverged (finished and whole), damaged, or absent (no ``_SUCCESS``)."""

    state: str
    summary: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state in STATUSES


def cell_state(store: Store, sweep: str, cell_id: str) -> CellState:
    """The state of one cell (one GET of ``_SUCCESS``, one LIST of the cell's keys when it has one)."""
    prefix = cell_prefix(sweep, cell_id)
    try:
        text = store.get_bytes(success_key(sweep, cell_id))
    except KeyError:
        return CellState(ABSENT)
    return judge(text, store.sizes(f"{prefix}/"), prefix)


def sweep_states(store: Store, sweep: str, cell_ids: list[str]) -> dict[str, CellState]:
    """The states of a sweep's cells: one LIST of the sweep's cells, then one GET per ``_SUCCESS`` found."""
    listing = store.sizes(f"{sweep}/cells/")
    out = {}
    for cell_id in cell_ids:
        prefix = cell_prefix(sweep, cell_id)
        key = success_key(sweep, cell_id)
        if key not in listing:
            out[cell_id] = CellState(ABSENT)
            continue
        try:
            text = store.get_bytes(key)
        except KeyError:  # withdrawn since the listing (a repair or --force started)
            out[cell_id] = CellState(ABSENT)
            continue
        mine = {k: v for k, v in listing.items() if k.startswith(prefix + "/")}
        out[cell_id] = judge(text, mine, prefix)
    return out


def parse_success(data: bytes) -> dict[str, Any]:
    """A ``_SUCCESS`` body; ValueError unless it is a JSON object with status done or diverged."""
    try:
        summary = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"not JSON ({err})") from None
    if not isinstance(summary, dict) or summary.get("status") not in STATUSES:
        raise ValueError(f"no status {'|'.join(STATUSES)}")
    if not isinstance(summary.get("steps"), int):
        raise ValueError("no integer steps")
    return summary


def judge(success: bytes, sizes: dict[str, int], prefix: str) -> CellState:
    """A cell's state from its ``_SUCCESS`` bytes and the sizes of its keys."""
    try:
        summary = parse_success(success)
    except ValueError as err:
        return CellState(DAMAGED, None, [f"_SUCCESS is unreadable: {err}"])
    problems = []
    manifest = summary.get("logs") if isinstance(summary.get("logs"), dict) else {}
    for kind in KINDS:
        present = {part_index(k): size for k, size in sizes.items() if k.startswith(f"{prefix}/{kind}/part-")}
        expected = (manifest.get(kind) or {}).get("parts")
        if isinstance(expected, list):
            for index, size in enumerate(expected):
                if index not in present:
                    problems.append(f"{kind} part {index:06d} is missing")
                elif present[index] != size:
                    problems.append(f"{kind} part {index:06d} has {present[index]} bytes, not {size}")
            extra = sorted(i for i in present if i >= len(expected))
            if extra:
                problems.append(f"{kind} parts {', '.join(f'{i:06d}' for i in extra)} were written after _SUCCESS")
        else:
            gaps = sorted(set(range(max(present, default=-1) + 1)) - set(present))
            if gaps:
                problems.append(f"{kind} parts {', '.join(f'{i:06d}' for i in gaps)} are missing")
    return CellState(DAMAGED if problems else summary["status"], summary, problems)


@dataclass
class PartScan:
    """One kind's parts as read back: how many lead without a gap or a bad one, and what they hold."""

    readable: int  # parts 0 .. readable-1 are present and whole
    sizes: list[int]  # their sizes, in order
    rows: int  # rows in them
    steps: pa.ChunkedArray | None  # their ``step`` column
    problem: str | None  # what stops the run of whole parts (None: nothing, every part present is whole)


def readable_parts(store: Store, prefix: str, kind: str) -> PartScan:
    """Read ``<prefix>/<kind>/part-*`` in order until the first missing or unreadable part."""
    keys = {part_index(k): k for k in store.list(f"{prefix}/{kind}/") if "/part-" in k}
    sizes, tables, problem = [], [], None
    for index in range(max(keys, default=-1) + 1):
        if index not in keys:
            problem = f"{kind} part {index:06d} is missing"
            break
        try:
            data = store.get_bytes(keys[index])
            table = ipc_to_table(data)
        except KeyError:
            problem = f"{kind} part {index:06d} vanished while reading"
            break
        except (pa.ArrowException, OSError, ValueError) as err:
            problem = f"{kind} part {index:06d} is not a whole Arrow file ({str(err).splitlines()[0][:100]})"
            break
        sizes.append(len(data))
        tables.append(table.select(["step"]))
    steps = pa.concat_tables(tables).column("step") if tables else None
    return PartScan(len(sizes), sizes, sum(t.num_rows for t in tables), steps, problem)
