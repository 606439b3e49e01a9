"""Streams a cell's step and eval rows to the object store as Arrow IPC parts (design section 5).

The training thread only appends rows to an in-memory buffer. Two background
threads do the rest, so training never waits on the disk or the network:

    log_step(row) ──> buffer ──cutter──> <spool>/<prefix>/steps/part-000042.arrow ──uploader──> store
                                         (written whole: temp file + rename)      (then removed from the spool)

The cutter turns the buffered rows into one part every ``flush_steps`` step
rows or ``flush_seconds`` seconds, whichever comes first. The uploader sends
parts in the order they were cut; when the store is unreachable it waits the
outage out on the oldest part (:func:`.retry.wait_out_outage`, no deadline:
the deadline is the caller's, at ``sync``/``close``), while later parts wait
on local disk and training goes on. Parts are numbered from 0 per kind without
gaps, so a checkpoint records the next index of each kind (:meth:`sync`), and
:meth:`resume` deletes whatever was written after it: after a restart no step
appears twice and none is missing.

Two hooks let the cell's lease guard the stream: ``fence()`` runs before
:meth:`resume` deletes anything (it raises to refuse), and every upload waits,
as through an outage, while ``may_write()`` is false (the lease is not
confirmed).

Call order: ``LogStream(...)``, ``resume(parts or None)``, then ``log_*``;
``sync()`` before each checkpoint; ``close()`` at the end.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from ..cell.errors import StoreUnavailable
from ..cell.logschema import SCHEMAS, part_index, part_key, table_to_ipc
from .base import Store
from .retry import wait_out_outage

KINDS = ("steps", "evals")


def spool_dir(store: Store) -> Path:
    """Where a store's log parts wait for upload: under $CRITBATCH_SPOOL, else the temp dir; one folder per store."""
    base = os.environ.get("CRITBATCH_SPOOL") or os.path.join(tempfile.gettempdir(), "critbatch-spool")
    where = store.url if "://" in store.url else os.path.abspath(store.url)
    return Path(base) / hashlib.sha256(where.encode()).hexdigest()[:12]


class LogStream:
    def __init__(self, store: Store, prefix: str, *, spool_dir: str | os.PathLike[str], flush_steps: int = 500,
                 flush_seconds: float = 15.0, cell_id: str, retry_base_delay: float = 0.5,
                 retry_max_delay: float = 30.0, fence: Callable[[], None] | None = None,
                 may_write: Callable[[], bool] | None = None):
        if flush_steps < 1 or flush_seconds <= 0:
            raise ValueError(f"logstream: need flush_steps >= 1 and flush_seconds > 0, "
                             f"got {flush_steps} and {flush_seconds}")
        self.store = store
        self.prefix = prefix.strip("/")
        self.cell_id = cell_id
        self.flush_steps = flush_steps
        self.flush_seconds = flush_seconds
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay
        self._fence = fence
        self._may_write = may_write
        # The spool mirrors the store layout, so two cells sharing a spool dir never collide.
        self.spool = Path(spool_dir) / self.prefix
        # deque.append and popleft are atomic under the GIL: the training thread appends,
        # the cutter pops, and no lock is taken on the hot path.
        self._steps: deque[dict[str, Any]] = deque()
        self._evals: deque[dict[str, Any]] = deque()
        self._buffers = {"steps": self._steps, "evals": self._evals}
        # The schemas without cell_id (column 0), which is filled in per part.
        self._row_schemas = {kind: SCHEMAS[kind].remove(SCHEMAS[kind].get_field_index("cell_id")) for kind in KINDS}
        self._unflushed = 0  # step rows since the last wake-up; touched by the training thread only

        self._cut_lock = threading.Lock()  # one cut at a time (cutter thread or sync in the caller)
        self._next = {kind: 0 for kind in KINDS}  # index of the next part to cut
        self._uploads: deque[tuple[str, int, Path, bytes | None]] = deque()
        self._state = threading.Condition()  # guards _uploaded, _uploads, _last_error, _failure
        self._uploaded = {kind: 0 for kind in KINDS}  # parts [0, n) are in the store
        self._last_error: BaseException | None = None  # last upload error, cleared on success
        self._failure: BaseException | None = None  # a bad row or a refused upload; re-raised by sync
        self._started = False
        self._closing = False
        self._wake_cutter = threading.Event()
        self._wake_uploader = threading.Event()
        self._stop = threading.Event()  # interrupts the uploader's backoff on close
        self._cutter = threading.Thread(target=self._cut_loop, name="logstream-cutter", daemon=True)
        self._uploader = threading.Thread(target=self._upload_loop, name="logstream-uploader", daemon=True)

    # ---- the training thread's side -------------------------------------------------

    def resume(self, parts: dict[str, int] | None) -> None:
        """Start (or continue) numbering at ``parts`` (None: from 0) and start the background threads.

        Everything at or past those indices, in the store or in the spool, was
        written after the checkpoint the run resumes from and is deleted. Spool
        parts below them that never reached the store (a previous process died
        before uploading them) are uploaded first.
        """
        if self._started:
            raise RuntimeError("logstream: resume() must be called once, before anything is logged")
        parts = dict(parts or {})
        unknown = set(parts) - set(KINDS)
        if unknown:
            raise ValueError(f"logstream: unknown part kinds {sorted(unknown)}; allowed: {list(KINDS)}")
        stored_by_kind = {kind: {part_index(k): k for k in self.store.list(f"{self.prefix}/{kind}/") if "part-" in k}
                          for kind in KINDS}
        doomed = [key for kind in KINDS for index, key in sorted(stored_by_kind[kind].items())
                  if index >= int(parts.get(kind, 0))]
        if doomed and self._fence is not None:
            self._fence()
        for key in doomed:
            self.store.delete(key)
        for kind in KINDS:
            nxt = int(parts.get(kind, 0))
            stored = {i: k for i, k in stored_by_kind[kind].items() if i < nxt}
            folder = self.spool / kind
            folder.mkdir(parents=True, exist_ok=True)
            for path in sorted(folder.iterdir()):
                if path.name.startswith("."):  # a temp file of a write that never finished
                    path.unlink()
                    continue
                index = part_index(path.name)
                if index >= nxt or index in stored:
                    path.unlink()
                else:
                    self._uploads.append((kind, index, path, None))
            self._next[kind] = nxt
            # Indices below nxt that are neither pending nor in the store are missing for good: say so.
            pending = {i for k, i, _, _ in self._uploads if k == kind}
            missing = sorted(set(range(nxt)) - set(stored) - pending)
            if missing:
                print(f"logstream: {kind} parts {missing} of {self.prefix} are in neither the store nor the "
                      f"spool; their rows are lost", file=sys.stderr)
            self._uploaded[kind] = min(pending, default=nxt)
        self._start()

    def _start(self) -> None:
        self._started = True
        self._last_cut = time.monotonic()
        self._cutter.start()
        self._uploader.start()
        if self._uploads:
            self._wake_uploader.set()

    def log_step(self, row: dict[str, Any]) -> None:
        """Buffer one row of STEPS_SCHEMA (missing columns become null; ``cell_id`` may be left out)."""
        self._steps.append(row)
        self._unflushed += 1
        if self._unflushed >= self.flush_steps:
            self._unflushed = 0
            self._wake_cutter.set()

    def log_eval(self, row: dict[str, Any]) -> None:
        """Buffer one row of EVALS_SCHEMA."""
        self._evals.append(row)

    def sync(self, timeout: float | None = None) -> dict[str, int]:
        """Cut every buffered row into parts and wait until all parts are in the store.

        Returns the next part index of each kind: what a checkpoint records.
        Raises StoreUnavailable if parts are still waiting after ``timeout``
        seconds (they stay in the spool and keep being retried).
        """
        if not self._started:
            raise RuntimeError("logstream: call resume() before sync()")
        if self._closing:
            raise RuntimeError("logstream: the stream is closed")
        self._raise_failure()
        self._cut()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state:
            target = dict(self._next)
            while any(self._uploaded[k] < target[k] for k in KINDS):
                self._raise_failure()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    waiting = sum(target[k] - self._uploaded[k] for k in KINDS)
                    raise StoreUnavailable(f"logstream: {waiting} log parts not uploaded to {self.store.url} "
                                           f"after {timeout:g} s (kept in {self.spool}): {self._last_error}")
                self._state.wait(remaining if remaining is not None else 1.0)
        self._raise_failure()
        return target

    def close(self, timeout: float | None = None) -> dict[str, int]:
        """sync(), then stop the background threads (also when sync raises). Closing twice is harmless."""
        if not self._started:
            return dict(self._next)
        if self._closing:
            if self.pending_parts():
                raise StoreUnavailable(f"logstream: closed with {self.pending_parts()} parts not uploaded "
                                       f"(kept in {self.spool})")
            return dict(self._next)
        try:
            return self.sync(timeout)
        finally:
            self._closing = True
            self._stop.set()
            self._wake_cutter.set()
            self._wake_uploader.set()
            with self._state:
                self._state.notify_all()
            self._cutter.join(timeout=10)
            self._uploader.join(timeout=10)

    def pending_parts(self) -> int:
        """Parts cut but not yet in the store (for progress messages)."""
        with self._state:
            return sum(self._next[k] - self._uploaded[k] for k in KINDS)

    # ---- the cutter ------------------------------------------------------------------

    def _cut_loop(self) -> None:
        while not self._closing:
            wait = self.flush_seconds - (time.monotonic() - self._last_cut)
            # Woken by log_step: cut whole parts of flush_steps rows. Timer ran out: cut everything.
            by_count = wait > 0 and self._wake_cutter.wait(wait)
            self._wake_cutter.clear()
            if self._closing:
                return
            if self._steps or self._evals:
                self._cut(whole_parts_only=by_count)
            else:
                self._last_cut = time.monotonic()

    def _cut(self, whole_parts_only: bool = False) -> None:
        """Turn the buffered rows into parts of at most flush_steps rows: spool file first, then the upload queue.

        ``whole_parts_only`` leaves a remainder of fewer than flush_steps step
        rows (and all eval rows) in the buffer, so parts cut by count have
        exactly flush_steps rows even when rows arrive in a burst.
        """
        with self._cut_lock:
            for kind in KINDS:
                buffer = self._buffers[kind]
                count = len(buffer)  # rows appended after this point go to a later part
                if whole_parts_only:
                    count = count - count % self.flush_steps if kind == "steps" else 0
                if not count:
                    continue
                self._last_cut = time.monotonic()  # the timer restarts only when a part is cut
                # A backlog (rows logged faster than parts are cut) still gives parts of flush_steps rows.
                while count:
                    size = min(count, self.flush_steps)
                    count -= size
                    if not self._write_part(kind, [buffer.popleft() for _ in range(size)]):
                        return

    def _write_part(self, kind: str, rows: list[dict[str, Any]]) -> bool:
        try:
            data = table_to_ipc(self._to_table(kind, rows))
        except (pa.ArrowException, ValueError, TypeError) as err:
            self._fail(err)
            return False
        index = self._next[kind]
        path = self.spool / kind / Path(part_key("", kind, index)).name
        keep: bytes | None = None
        try:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            # No fsync: the spool only has to survive the process, not the machine.
            os.replace(tmp, path)
        except OSError as err:
            print(f"logstream: cannot spool {path} ({err}); keeping the part in memory", file=sys.stderr)
            keep = data
        with self._state:
            self._next[kind] = index + 1
            self._uploads.append((kind, index, path, keep))
        self._wake_uploader.set()
        return True

    def _to_table(self, kind: str, rows: list[dict[str, Any]]) -> pa.Table:
        """Rows to a table of the kind's schema; ``cell_id`` is always this stream's.

        ``pa.Table.from_pylist`` is about 3x faster than building the columns
        from Python lists one by one (benchmarks/bench_logging.py measures both).
        """
        schema = SCHEMAS[kind]
        extra = set(rows[0]) - set(schema.names)
        if extra:
            raise ValueError(f"logstream: {kind} row has columns {sorted(extra)} not in the schema "
                             f"{schema.names}")
        table = pa.Table.from_pylist(rows, schema=self._row_schemas[kind])
        cell_ids = pa.repeat(pa.scalar(self.cell_id, pa.string()), table.num_rows)
        return table.add_column(schema.get_field_index("cell_id"), schema.field("cell_id"), cell_ids)

    # ---- the uploader ----------------------------------------------------------------

    def _upload_loop(self) -> None:
        """Upload the parts in order; an outage is waited out (for as long as it lasts) on the oldest one."""
        while True:
            with self._state:
                item = self._uploads[0] if self._uploads else None
            if item is None:
                if self._closing:
                    return
                self._wake_uploader.wait(1.0)
                self._wake_uploader.clear()
                continue
            kind, index, path, data = item
            key = part_key(self.prefix, kind, index)
            try:
                body = data if data is not None else path.read_bytes()
                wait_out_outage(lambda: self._put(key, body), what=f"upload {key}",
                                deadline=None, stop=self._stop, base_delay=self.retry_base_delay,
                                max_delay=self.retry_max_delay, on_error=self._note_error,
                                note=f"; later parts wait in {self.spool}")
            except StoreUnavailable:  # close() stopped the wait; the parts stay in the spool for a resume
                return
            except Exception as err:  # noqa: BLE001 - not an outage (refused, unreadable): sync() raises it
                self._fail(err)
                return
            if data is None:
                path.unlink(missing_ok=True)
            with self._state:
                self._uploads.popleft()
                self._uploaded[kind] = index + 1
                self._last_error = None
                self._state.notify_all()

    def _put(self, key: str, body: bytes) -> None:
        if self._may_write is not None and not self._may_write():
            raise StoreUnavailable("the cell's lease is not confirmed (lost, or not renewed for a while)")
        self.store.put_bytes(key, body)

    def _note_error(self, err: BaseException) -> None:
        with self._state:
            self._last_error = err

    def _fail(self, err: BaseException) -> None:
        with self._state:
            self._failure = err
            self._state.notify_all()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"logstream: rows could not be written: {self._failure}") from self._failure
