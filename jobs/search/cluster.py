"""The search's cells on a cluster: created by the submit path, watched in the store, paused by deleting them.

Each cell the search runs is one object (Job, PyTorchJob or TrainJob) made by
``critbatch submit``'s own pass (jobs/cluster/submit.py) over a grid of that one
cell: the cell's fields with the search's ``stop`` written in, the grid's run
settings, so the object, its name, labels and failure policy are those a
``critbatch render`` of it would give. All of a wave's cells are created at
once (the grid's ``max_active`` caps how many run; Kueue's queue, if named,
admits them).

The pass is repeated every ``poll_seconds``, as ``submit --wait`` repeats
it, until each cell has its ``_SUCCESS`` (or failed, which the pass records as
``_FAILED``). A cell asked to pause at a step (a learning-rate race's rung)
is deleted once its logs in the store reach that step: its trainer gets
SIGTERM, checkpoints and exits, and the object is gone (no retry); the next
rung creates it again and its pod resumes from the checkpoint. A trial may so
run a little past its rung; the race compares the trials' losses at the
rung's step itself, read from their evaluations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from critbatch.analysis.load import load_cell
from ..cell.errors import ConfigError
from ..cell.layout import cell_prefix, success_key
from ..cell.spec import Cell
from ..store import Store
from .. import backends
from ..backends import k8s
from ..cluster.client import Cluster, api_client
from ..cluster.submit import backend_of, check_cluster, check_image, submit_once
from ..sweep.grid import GRID_FIELDS, Grid, grid_from_dict


def one_cell_grid(grid: Grid, cell: Cell) -> Grid:
    """The grid of ``cell`` alone, with ``grid``'s run settings: what the submit path renders it from."""
    raw = {k: v for k, v in grid.raw.items() if k in GRID_FIELDS and k != "search"}
    raw.update({k: v for k, v in cell.to_dict().items() if k != "sweep"})
    if raw.get("backend") and not backends.get(raw["backend"]).per_cell:
        raw["backend"] = backends.JOB.name  # one object per cell, named after it, not one per resource class
    one = grid_from_dict(raw, source=f"{grid.source}, cell {cell.id}")
    if one.cell_ids() != [cell.id]:
        raise ConfigError(f"search: cell {cell.id} of {grid.sweep} does not survive its own grid "
                          f"(it becomes {', '.join(one.cell_ids())})")
    return one


@dataclass
class ClusterBackend:
    grid: Grid
    cluster: Cluster
    store: Store
    poll_seconds: float = 30.0
    log: Callable[[str], None] = print
    sleep: Callable[[float], None] = time.sleep
    grids: dict[str, Grid] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)  # cells seen succeeded without their _SUCCESS

    @classmethod
    def connect(cls, grid: Grid, store: Store, **kwargs) -> "ClusterBackend":
        check_image(grid)
        cluster = Cluster(api_client(), grid.namespace)
        check_cluster(grid, cluster, kwargs.get("log", print))
        return cls(grid, cluster, store, **kwargs)

    @property
    def parallel(self) -> int:
        return self.grid.max_active

    def run(self, runs: Sequence[tuple[Cell, int | None]]) -> list[str]:
        pending = {cell.id: (cell, pause) for cell, pause in runs}
        failed: list[str] = []
        while pending:
            for cell_id, (cell, pause) in list(pending.items()):
                if self.store.exists(success_key(cell.sweep, cell_id)):
                    del pending[cell_id]
                    continue
                if pause is not None and self._logged_step(cell) >= pause:
                    self._pause(cell)
                    del pending[cell_id]
                    continue
                report = submit_once(self._grid_of(cell), self.cluster, self.store, analysis=False, seen=self.seen)
                if report.failed or report.lost:
                    why = report.failed.get(cell_id) or report.lost.get(cell_id)
                    self.log(f"critbatch search: cell {cell_id} {'failed' if report.failed else 'lost'}: {why}")
                    failed.append(cell_id)
                    del pending[cell_id]
            if pending:
                self.sleep(self.poll_seconds)
        return failed

    def _grid_of(self, cell: Cell) -> Grid:
        if cell.id not in self.grids:
            self.grids[cell.id] = one_cell_grid(self.grid, cell)
        return self.grids[cell.id]

    def _logged_step(self, cell: Cell) -> int:
        prefix = cell_prefix(cell.sweep, cell.id)
        summary, _ = load_cell(self.store, cell.sweep, cell.id, self.store.list(prefix + "/"))
        return summary.last_step if summary is not None else 0

    def _pause(self, cell: Cell) -> None:
        """Delete the cell's object: SIGTERM, a checkpoint, no retry; the next rung creates it again."""
        one = self._grid_of(cell)
        self.cluster.delete(backend_of(one).kind, k8s.object_name(one.sweep, cell.id))
