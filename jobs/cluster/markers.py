"""The cells' markers in the store, as submit and status read them: one LIST per poll, not one HEAD per cell.

    <store>/<sweep>/cells/<cell-id>/_SUCCESS   written by the trainer, last: {"status": "done" | "diverged", ...}
    <store>/<sweep>/cells/<cell-id>/_FAILED    written here when a cell's object is seen Failed on the cluster

A ``_SUCCESS`` counts only when it is readable, the log parts its manifest lists are there at their
sizes, its cell's ``cell.json`` is that cell's record (critbatch.jobs.store.cellstate.judge, from the same LIST): otherwise the cell is ``damaged`` (the
next trainer of it trains it again). Each marker is read the first time its key is listed, and again only
when its size changes (a repaired cell's new ``_SUCCESS``; a retry removes ``_FAILED`` first).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

from ..cell.layout import CHECKPOINT_COMPLETE, cell_prefix, failed_key
from ..store import Store
from ..store.cellstate import RECORD, judge, with_record

SUCCESS = "_SUCCESS"
FAILED = "_FAILED"
_COMPLETE = re.compile(rf"checkpoint/step-(\d+)/{CHECKPOINT_COMPLETE}")


@dataclass
class Markers:
    """Cell id -> marker JSON, for the cells that have one."""

    done: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, dict] = field(default_factory=dict)
    damaged: dict[str, list[str]] = field(default_factory=dict)  # cell id -> what is wrong with its _SUCCESS
    checkpoints: dict[str, set[int]] = field(default_factory=dict)  # cell id -> steps of its complete checkpoints


class MarkerBook:
    """Reads a sweep's markers with one LIST of ``<sweep>/cells/``; records and forgets failures.

    ``store`` None: no store (status with an unreachable store): nothing is known, nothing recorded.
    """

    def __init__(self, store: Store | None, sweep: str):
        self.store = store
        self.sweep = sweep
        self._json: dict[str, dict] = {}  # key -> parsed marker
        self._bytes: dict[str, tuple[int, bytes]] = {}  # _SUCCESS or cell.json key -> (size when read, bytes)

    def read(self) -> Markers:
        out = Markers()
        if self.store is None:
            return out
        prefix = cell_prefix(self.sweep, "")
        listing = self.store.sizes(prefix)
        by_cell: dict[str, dict[str, int]] = {}
        for key, size in listing.items():
            by_cell.setdefault(key[len(prefix):].partition("/")[0], {})[key] = size
        for key, size in listing.items():
            cell_id, _, name = key[len(prefix):].partition("/")
            if name == SUCCESS:
                cell_dir = cell_prefix(self.sweep, cell_id)
                # A _SUCCESS withdrawn since the listing (a repair started) is unreadable for now.
                state = judge(self._bytes_at(key, size) or b"", by_cell[cell_id], cell_dir)
                record = f"{cell_dir}/{RECORD}"
                if state.finished and record in by_cell[cell_id]:
                    state = with_record(state, self._bytes_at(record, by_cell[cell_id][record]), cell_id)
                if state.finished:
                    out.done[cell_id] = state.summary
                else:
                    out.damaged[cell_id] = state.problems
            elif name == FAILED:
                out.failed[cell_id] = self._load(key, {"reason": "failed (unreadable _FAILED marker)"})
            elif (match := _COMPLETE.fullmatch(name)):  # what a branch of this cell waits for
                out.checkpoints.setdefault(cell_id, set()).add(int(match.group(1)))
        return out

    def _bytes_at(self, key: str, size: int) -> bytes | None:
        """A listed key's bytes (a cell's ``_SUCCESS`` or ``cell.json``), read when first listed and again only
        when its size changes (a repaired cell's new one); None: withdrawn since the listing (a repair started)."""
        if self._bytes.get(key, (None,))[0] != size:
            try:
                self._bytes[key] = (size, self.store.get_bytes(key))
            except KeyError:
                return None
        return self._bytes[key][1]

    def _load(self, key: str, fallback: dict) -> dict:
        if key not in self._json:
            try:
                self._json[key] = json.loads(self.store.get_text(key))
            except (ValueError, UnicodeDecodeError, KeyError):
                self._json[key] = fallback
        return self._json[key]

    def record_failure(self, cell_id: str, *, kind: str, name: str, reason: str, by: str) -> dict:
        """Write the cell's ``_FAILED`` marker: what failed, why, when and which command saw it."""
        marker = {"reason": reason, "kind": kind, "name": name, "by": by,
                  "seen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if self.store is not None:
            key = failed_key(self.sweep, cell_id)
            self.store.put_text(key, json.dumps(marker, sort_keys=True))
            self._json[key] = marker
        return marker

    def forget_failure(self, cell_id: str) -> None:
        if self.store is not None:
            key = failed_key(self.sweep, cell_id)
            self.store.delete(key)
            self._json.pop(key, None)
