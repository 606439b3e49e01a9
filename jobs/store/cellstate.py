"""What the store says about a cell: finished, damaged or not there; and which of its log parts are whole.

A cell counts as finished only when its ``_SUCCESS`` is a readable summary
(status done or diverged), its ``cell.json`` is there, and the log parts that
summary lists are all in the store at their recorded sizes (``_SUCCESS``'s
``logs`` manifest, see :func:`critbatch.jobs.cell.logschema.success_summary`):
one GET and one LIST (:func:`judge`, what ``status`` and ``submit`` read on
every poll). ``run``, ``train`` and ``analyze`` read ``cell.json`` too
(:func:`read_record`): it must be a valid cell whose fields hash to the id of
its folder. Otherwise the cell is ``damaged`` (an unreadable ``_SUCCESS`` or
``cell.json``, a part missing, truncated or added after it) and its trainer
repairs it: a ``cell.json`` alone is written again from the cell when
``_SUCCESS`` names the same cell (:attr:`CellState.record_only`); anything else
is trained again, from the newest checkpoint whose parts are whole
(:func:`readable_parts`), or from scratch. A ``_SUCCESS`` written before the
manifest existed is checked for gaps only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ..cell.errors import ConfigError
from ..cell.inputs import decode, json_object
from ..cell.layout import cell_prefix, success_key
from ..cell.logschema import SCHEMAS, STATUSES, ipc_to_table, part_index
from ..cell.spec import CELL_JSON_EXTRAS, Cell
from .base import Store

KINDS = tuple(SCHEMAS)
ABSENT = "absent"
DAMAGED = "damaged"
RECORD = "cell.json"
#: The fields a cell imported from another study (``derived.imported_from``) must have in its cell.json.
IMPORTED_REQUIRED = ("dataset", "model", "strategy", "batch_size", "base_lr", "base_batch", "seed")


@dataclass
class CellState:
    """``state``: done | diverged (finished and whole), damaged, or absent (no ``_SUCCESS``)."""

    state: str
    summary: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    record: str | None = None  # what is wrong with cell.json, when something is (it is among the problems)

    @property
    def finished(self) -> bool:
        return self.state in STATUSES

    def record_only(self, cell_id: str) -> bool:
        """Damaged in its cell.json alone, with a ``_SUCCESS`` of cell ``cell_id``: the logs are whole and
        this cell's, so writing cell.json again repairs it (no training)."""
        return (self.state == DAMAGED and self.record is not None and self.problems == [self.record]
                and self.summary is not None and self.summary.get("cell_id") == cell_id)


def cell_state(store: Store, sweep: str, cell_id: str) -> CellState:
    """The state of one cell (one GET of ``_SUCCESS``, one LIST of the cell's keys when it has one)."""
    prefix = cell_prefix(sweep, cell_id)
    try:
        text = store.get_bytes(success_key(sweep, cell_id))
    except KeyError:
        return CellState(ABSENT)
    return _with_record(judge(text, store.sizes(f"{prefix}/"), prefix), store, prefix, cell_id)


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
        out[cell_id] = _with_record(judge(text, mine, prefix), store, prefix, cell_id)
    return out


def _with_record(state: CellState, store: Store, prefix: str, cell_id: str) -> CellState:
    """``state`` once ``cell.json`` is read too (see :func:`with_record`)."""
    if state.state == ABSENT or state.record is not None:
        return state
    try:
        data = store.get_bytes(f"{prefix}/{RECORD}")
    except KeyError:
        data = None
    return with_record(state, data, cell_id)


def with_record(state: CellState, record: bytes | None, cell_id: str) -> CellState:
    """``state`` once ``cell.json`` (its bytes; None: missing) is read too: a judged cell whose record is not a
    valid cell of this id is damaged. Every command that calls a cell finished goes through here."""
    if state.state == ABSENT or state.record is not None:
        return state
    if record is None:
        problem = f"{RECORD} is missing"
    else:
        try:
            read_record(record, cell_id)
        except ValueError as err:
            problem = f"{RECORD} is not this cell's record: {err}"
        else:
            return state
    return CellState(DAMAGED, state.summary, [*state.problems, problem], problem)


def read_record(data: bytes, cell_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``cell.json`` of the folder ``cell_id``: (the document, the cell's fields); ValueError saying why not.

    The fields must be a valid cell whose id is ``cell_id`` (a record copied from another cell's folder is
    not this cell's), or, for a cell imported from another study (analysis.importers), hold the fields the
    analysis reads under that id: an imported cell keeps its source's names, which the catalogue does not know.
    """
    try:
        doc = json_object(decode(data, RECORD), RECORD)
        fields = {k: v for k, v in doc.items() if k not in CELL_JSON_EXTRAS}
        derived = doc.get("derived")
        if isinstance(derived, dict) and derived.get("imported_from"):
            missing = [k for k in IMPORTED_REQUIRED if k not in fields]
            if missing or not isinstance(fields["dataset"], dict) or "name" not in fields["dataset"]:
                raise ValueError(f"an imported cell without {', '.join(missing) or 'dataset.name'}")
            found = str(doc.get("id"))
        else:
            cell = Cell.from_dict(fields, RECORD)
            fields, found = cell.to_dict(), cell.id
    except ConfigError as err:
        raise ValueError("; ".join(err.problems[:3])) from None
    if found != cell_id:
        raise ValueError(f"it describes cell {found}, not {cell_id} (a record copied from another cell's folder)")
    return doc, fields


def parse_success(data: bytes) -> dict[str, Any]:
    """A ``_SUCCESS`` body; ValueError unless it is a JSON object with status done or diverged."""
    try:
        summary = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"not JSON ({str(err)[:100]})") from None
    if not isinstance(summary, dict) or summary.get("status") not in STATUSES:
        raise ValueError(f"no status {'|'.join(STATUSES)}")
    steps = summary.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps is not a count of steps ({str(steps)[:40]!r})")
    return summary


def judge(success: bytes, sizes: dict[str, int], prefix: str) -> CellState:
    """A cell's state from its ``_SUCCESS`` bytes and the sizes of its keys."""
    try:
        summary = parse_success(success)
    except ValueError as err:
        return CellState(DAMAGED, None, [f"_SUCCESS is unreadable: {err}"])
    problems = []
    record = None if f"{prefix}/{RECORD}" in sizes else f"{RECORD} is missing"
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
    if record:
        problems.append(record)
    return CellState(DAMAGED if problems else summary["status"], summary, problems, record)


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
