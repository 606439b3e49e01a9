"""Where a search's cells run: this machine's executor, or the cluster through the submit path.

Both train a list of (cell, pause step) pairs and return once each has stopped: finished
(``_SUCCESS``), at its pause step (``critbatch train --pause-at``, checkpointed) or failed; the
search then reads what happened from the store, as the analysis does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..cell.spec import Cell
from ..local.executor import run_cells
from ..store import Store


@dataclass
class LocalBackend:
    """``critbatch run``'s executor: each cell a ``critbatch train`` subprocess, ``parallel`` at a time."""

    store: Store
    parallel: int = 1
    data_root: str = "~/.cache/critbatch/data"
    log_dir: str | None = None
    nproc: int = 1
    checkpoint_seconds: float = 300.0
    label: str = "search"

    def run(self, runs: Sequence[tuple[Cell, int | None]]) -> list[str]:
        """One executor run per pause step (its cells get the same ``--pause-at``); the failed cells' ids."""
        by_pause: dict[int | None, list[Cell]] = {}
        for cell, pause in runs:
            by_pause.setdefault(pause, []).append(cell)
        failed: list[str] = []
        for pause, cells in by_pause.items():
            extra = ["--checkpoint-seconds", repr(float(self.checkpoint_seconds))]
            if pause is not None:
                extra += ["--pause-at", str(pause)]
            result = run_cells(cells, self.store, parallel=self.parallel, data_root=self.data_root,
                               log_dir=self.log_dir, nproc=self.nproc, label=self.label, extra_args=extra)
            failed.extend(result.failed)
        return failed
