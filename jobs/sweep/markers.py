"""The cells' markers in the store, as submit and status read them: one LIST per poll, not one HEAD per cell.

    <store>/<sweep>/cells/<cell-id>/_SUCCESS   written by the trainer, last: {"status": "done" | "diverged", ...}
    <store>/<sweep>/cells/<cell-id>/_FAILED    written here when a cell's object is seen Failed on the cluster

Both are written once and never change (a retry removes ``_FAILED`` first), so each one's JSON is read the
first time its key is listed and kept for the later polls.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from critbatch.jobs.cell.layout import cell_prefix, failed_key
from critbatch.jobs.store import Store

SUCCESS = "_SUCCESS"
FAILED = "_FAILED"


@dataclass
class Markers:
    """Cell id -> marker JSON, for the cells that have one."""

    done: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, dict] = field(default_factory=dict)


class MarkerBook:
    """Reads a sweep's markers with one LIST of ``<sweep>/cells/``; records and forgets failures.

    ``store`` None: no store (status with an unreachable store): nothing is known, nothing recorded.
    """

    def __init__(self, store: Store | None, sweep: str):
        self.store = store
        self.sweep = sweep
        self._json: dict[str, dict] = {}  # key -> parsed marker

    def read(self) -> Markers:
        out = Markers()
        if self.store is None:
            return out
        prefix = cell_prefix(self.sweep, "")
        for key in self.store.list(prefix):
            cell_id, _, name = key[len(prefix):].partition("/")
            if name == SUCCESS:
                out.done[cell_id] = self._load(key, {"status": "done"})
            elif name == FAILED:
                out.failed[cell_id] = self._load(key, {"reason": "failed (unreadable _FAILED marker)"})
        return out

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
