"""Checkpoints of a cell in the object store, valid only once their completion marker exists.

Layout under the cell's prefix (design section 5)::

    checkpoint/step-0000001200/state.pt     torch.save of the trainer's state dict
    checkpoint/step-0000001200/COMPLETE     written last

A process can die between the two writes (SIGKILL, a preempted node, a lost
store); a checkpoint directory without ``COMPLETE`` is then ignored by
:meth:`Checkpointer.load_latest` and removed by the next successful save. Older
checkpoints beyond ``keep`` are pruned only after the new one is complete, so
a valid checkpoint exists at every moment once the first save finished. The
steps in ``pinned`` (a cell's ``keep`` points) are never pruned: they outlive
the run, for branches to start from (finish.prune_checkpoints keeps them too).
"""

from __future__ import annotations

import io
import pickle
import re
import sys
from typing import Any, Callable

import torch

from ..cell.layout import CHECKPOINT_COMPLETE, CHECKPOINT_STATE, checkpoint_dir
from ..store import Store

STATE = CHECKPOINT_STATE
COMPLETE = CHECKPOINT_COMPLETE
_STEP_DIR = re.compile(r"/checkpoint/step-(\d+)/([^/]+)$")


class Checkpointer:
    def __init__(self, store: Store, prefix: str, keep: int = 2, pinned: frozenset[int] = frozenset()):
        if keep < 1:
            raise ValueError(f"checkpoint: keep must be >= 1, got {keep}")
        self.store = store
        self.prefix = prefix.rstrip("/")
        self.keep = keep
        self.pinned = frozenset(pinned)

    def _dir(self, step: int) -> str:
        return checkpoint_dir(self.prefix, step)

    def _scan(self) -> dict[int, set[str]]:
        """Step -> names of the files present in that checkpoint's directory."""
        found: dict[int, set[str]] = {}
        for key in self.store.list(f"{self.prefix}/checkpoint/"):
            match = _STEP_DIR.search(key)
            if match:
                found.setdefault(int(match.group(1)), set()).add(match.group(2))
        return found

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(step for step, names in self._scan().items() if COMPLETE in names and STATE in names)

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Write ``state`` for ``step``, then its marker, then prune.

        Saving the same step again (a SIGTERM right after a periodic save)
        first withdraws the old marker, so the directory is never marked
        complete while its state is being replaced.
        """
        buf = io.BytesIO()
        torch.save(state, buf)
        folder = self._dir(step)
        self.store.delete(f"{folder}/{COMPLETE}")
        self.store.put_bytes(f"{folder}/{STATE}", buf.getvalue())
        self.store.put_text(f"{folder}/{COMPLETE}", f"{step}\n")
        self._prune(newest=step)

    def _prune(self, newest: int) -> None:
        found = self._scan()
        complete = sorted(s for s, names in found.items() if COMPLETE in names and STATE in names)
        keep = set(complete[-self.keep:]) | self.pinned
        for step, names in found.items():
            # Incomplete directories newer than the save just made belong to no one we know of; leave them.
            if step in keep or step > newest:
                continue
            self._delete(step, names)

    def prune_unpinned(self) -> None:
        """Delete every checkpoint but the pinned ones (the end of a run that keeps some), markers first."""
        for step, names in self._scan().items():
            if step not in self.pinned:
                self._delete(step, names)

    def _delete(self, step: int, names: set[str]) -> None:
        folder = self._dir(step)
        # Marker first: a half-deleted checkpoint must never look complete.
        if COMPLETE in names:
            self.store.delete(f"{folder}/{COMPLETE}")
        for name in sorted(names - {COMPLETE}):
            self.store.delete(f"{folder}/{name}")

    def load_latest(self, map_location: str | torch.device = "cpu",
                    accept: Callable[[dict[str, Any]], str | None] | None = None) -> dict[str, Any] | None:
        """The state of the newest complete checkpoint, or None when there is none.

        Loaded onto the CPU by default: RNG states must be CPU tensors, and
        ``load_state_dict`` of modules and optimizers moves tensors to the
        parameters' device. A checkpoint that fails to load (which atomic
        writes should rule out) is reported and the next older one is tried,
        as is one that ``accept`` refuses (it returns the reason; None accepts).
        """
        for step in reversed(self.complete_steps()):
            state = self.load(step, map_location)
            if state is None:
                continue
            refused = accept(state) if accept is not None else None
            if refused is None:
                return state
            print(f"checkpoint: not resuming from step {step}: {refused}; trying an older one", file=sys.stderr)
        return None

    def load(self, step: int, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The state saved at ``step``; None (reported) if it is gone or does not load."""
        try:
            data = self.store.get_bytes(f"{self._dir(step)}/{STATE}")
        except KeyError:  # pruned by another writer since the listing
            return None
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
            print(f"checkpoint: cannot load step {step} ({err}); trying an older one", file=sys.stderr)
            return None
