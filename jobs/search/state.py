"""``<sweep>/search.json``: what a search ran, why, and what it decided; the search resumes from it.

    {"sweep": "digits", "status": "running" | "decided" | "budget spent" | "exhausted" | "no fit",
     "spec": {...the search block as used...},
     "full_grid": {"cells": 14, "samples": 1206080, "steps": 40040},
     "threshold": {"eps": 0.1, "source": "analysis.args --threshold", "by_group": {key: eps}},
     "groups": {key: {"label": ..., "state": ..., "interval": [lo, B, hi], "rel_width": ..., "why": ...}},
     "cells": {id: {"group": key, "batch_size": 64, "seed": 0, "trial": "base_lr=0.01", "role": ...,
                    "why": ..., "wave": 2, "cell": {...the cell's fields...}, "state": ..., "steps": ...,
                    "samples": ..., "k": ...}},
     "races": {key: {"group": ..., "batch_size": ..., "seed": ..., "rungs": [...], "rung": 1,
                     "alive": [ids], "out": {id: why}, "winner": id | null}},
     "waves": [{"index": 1, "phase": "threshold" | "ladder" | "refine", "cells": [ids], "started": ...,
                "finished": ...}],
     "decisions": [{"wave": 2, "group": key, "action": ..., "why": ..., "interval_before": [...],
                    "interval_predicted": [...], "interval_after": [...]}],
     "spent": {"samples": ..., "steps": ..., "cells": ...}, "updated": ...}

Intervals are [lo, B_crit, hi] with "inf" for an unbounded end and null for no fit. The file is
rewritten whole after every change (one PUT: whole or not at all, on either store); the store's
``_SUCCESS`` markers and logs stay the truth about cells, so a search that resumes re-runs the last
wave it had started, and the executor skips whatever of it had finished.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..store import Store

#: Statuses after which a search is over (a re-run prints the answer and runs nothing).
FINAL = ("decided", "budget spent", "exhausted", "no fit")


def state_key(sweep: str) -> str:
    return f"{sweep}/search.json"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class SearchState:
    sweep: str
    spec: dict[str, Any]
    status: str = "running"
    full_grid: dict[str, Any] = field(default_factory=dict)
    threshold: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    races: dict[str, dict[str, Any]] = field(default_factory=dict)
    waves: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    spent: dict[str, Any] = field(default_factory=dict)
    updated: str = ""

    @property
    def done(self) -> bool:
        return self.status in FINAL

    @property
    def open_wave(self) -> dict[str, Any] | None:
        """The last wave if it was started and not finished (an interrupted search re-runs it)."""
        return self.waves[-1] if self.waves and not self.waves[-1].get("finished") else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "SearchState":
        doc = json.loads(text)
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})


def read_state(store: Store, sweep: str) -> SearchState | None:
    try:
        return SearchState.from_json(store.get_text(state_key(sweep)))
    except KeyError:
        return None


def write_state(store: Store, state: SearchState) -> None:
    state.updated = now()
    store.put_text(state_key(state.sweep), state.to_json())
