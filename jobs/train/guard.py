"""Rank 0's hold on its cell: the lease, and the fence that every destructive step passes first.

Nothing under a cell is deleted unless this trainer holds the cell's lease
(:mod:`critbatch.jobs.store.lease`) and the cell has no ``_SUCCESS``: the
fence (:meth:`CellGuard.fence`) checks both in the store right before the
log parts past a checkpoint are deleted on resume, before every checkpoint
and before ``_SUCCESS`` is written. Two acts withdraw a ``_SUCCESS`` first, each
under the lease and said in the log: ``--force`` (the user asked to train a
finished cell again) and a repair (its ``_SUCCESS`` is unreadable, or the
parts it lists are damaged: the cell is not finished, whatever the marker
says). A second trainer never gets that far: the lease is taken before any
data is loaded, and refused with ExitCode.LEASE_HELD.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..cell.errors import LeaseHeld
from ..cell.layout import cell_prefix, success_key
from ..cell.spec import Cell
from ..store import Store
from ..store.lease import LEASE_SECONDS, Lease, lease_prefix
from ..store.logstream import spool_dir

#: Environment variable for ``critbatch train --lease-seconds``' default.
LEASE_SECONDS_ENV = "CRITBATCH_LEASE_SECONDS"


def default_lease_seconds() -> float:
    return float(os.environ.get(LEASE_SECONDS_ENV) or LEASE_SECONDS)


class CellGuard:
    """The lease on ``cell`` for this process (rank 0), renewed in the background from ``acquire()`` on."""

    def __init__(self, store: Store, cell: Cell, *, ttl_s: float = LEASE_SECONDS):
        self.store = store
        self.cell = cell
        self.prefix = cell_prefix(cell.sweep, cell.id)
        self.lease = Lease(store, self.prefix, ttl_s=ttl_s)
        self.lost: LeaseHeld | None = None

    def acquire(self) -> "CellGuard":
        """Take the lease (LeaseHeld if another trainer holds it) and start renewing it."""
        self.lease.acquire()
        self.lease.start_renewing(on_lost=self._on_lost)
        return self

    def _on_lost(self, err: LeaseHeld) -> None:
        self.lost = err

    def release(self) -> None:
        self.lease.release()
        self._remove_spool()

    @property
    def spool(self) -> Path:
        """This trainer's own spool folder: another trainer of the cell (one whose lease lapsed) never shares it."""
        return spool_dir(self.store) / f"lease-{self.lease.owner}"

    def _remove_spool(self) -> None:
        """The spool folder once nothing waits in it (parts still there are left for a look)."""
        if self.spool.is_dir() and not any(p.is_file() for p in self.spool.rglob("*")):
            shutil.rmtree(self.spool, ignore_errors=True)

    def may_write(self) -> bool:
        """The lease is confirmed (renewed recently enough): writes may go ahead (no store round trip)."""
        return self.lost is None and self.lease.confirmed

    def fence(self, what: str = "delete") -> None:
        """Before ``what`` (a destructive step or the final marker): the lease is still ours and no
        ``_SUCCESS`` exists; LeaseHeld otherwise."""
        if self.lost is not None:
            raise self.lost
        self.lease.check()
        if self.store.exists(success_key(self.cell.sweep, self.cell.id)):
            raise LeaseHeld(f"cell {self.cell.id}: {what} refused: its _SUCCESS exists (another trainer finished it)")

    def withdraw_success(self, why: str) -> None:
        """Delete the cell's ``_SUCCESS`` under the lease, saying why (a repair, or ``--force``)."""
        self.lease.check()
        key = success_key(self.cell.sweep, self.cell.id)
        if self.store.exists(key):
            print(f"critbatch train: cell {self.cell.id}: withdrawing {self.store.join(key)} ({why})", flush=True)
            self.store.delete(key)

    def wipe(self) -> None:
        """``--force``: withdraw ``_SUCCESS``, then delete everything under the cell but the lease."""
        self.withdraw_success("--force: training the cell again")
        self.fence("--force")
        keep = lease_prefix(self.prefix) + "/"
        for key in self.store.list(self.prefix + "/"):
            if not key.startswith(keep):
                self.store.delete(key)
