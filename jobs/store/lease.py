"""One trainer per cell: a lease in the store, taken with an atomic create, renewed while it trains.

Two trainers on one cell (a retried pod while the old one still terminates, a
re-submitted Job whose pod still runs, a local ``critbatch run`` beside a
cluster sweep on the same store) would otherwise both resume from the newest
checkpoint and delete each other's log parts. The lease is a series of
records, one object per holder, numbered::

    <sweep>/cells/<cell-id>/lease/00000007.json
        {"owner": "9f2c...", "generation": 7, "host": "critbatch-s-abc-x7k2p", "pid": 41,
         "expires": 1767225600.0, "ttl_s": 60.0, "released": false, ...}

The highest number is the lease; its holder is the only process that may
write or delete under the cell. Taking it means creating the next number with
:meth:`Store.create` (``If-None-Match: *`` on S3, ``link()`` on a directory),
so of two trainers racing for it exactly one wins: the other exits with
ExitCode.LEASE_HELD (203, retryable on every backend), and a Kubernetes retry
waits it out. A record may be taken over once it is released, expired
(``expires`` in the past, by the taker's clock), unreadable, or its holder
is provably dead (same kernel and PID namespace, and that process is gone).

Renewal: the holder rewrites its own record every ``ttl_s / 3`` from a
background thread, then lists the records: a higher number means the lease
was taken over, and the holder stops (:class:`LeaseHeld`, exit 203). Between
renewals the holder counts the lease as confirmed until ``CONFIRMED_FRACTION
* ttl_s`` after the start of its last successful renewal (monotonic clock);
past that (a store outage longer than that) it writes nothing until a renewal
succeeds, so the part of ``ttl_s`` left (15 s of the default 60 s) absorbs
clock skew between hosts. A taker that sees the old holder renew while it
takes over (the old record changed since it judged it expired) waits that
confirmation out before it proceeds. What S3 cannot give is a fencing token:
a write already sent when the lease lapses, and delayed past the margin, can
still land.

A server that ignores ``If-None-Match`` (found by :func:`honours_create`, a
probe under the lease folder) gets a documented best effort: after its create
the taker waits ``BEST_EFFORT_SETTLE_S`` and reads its record back, so of
two racers only the last writer believes it holds the lease; simultaneous
takers within that pause are not excluded.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..cell.errors import LeaseHeld, StoreUnavailable
from .base import Store
from .retry import wait_out_outage

#: Default lease time to live, seconds (``critbatch train --lease-seconds``, env CRITBATCH_LEASE_SECONDS).
LEASE_SECONDS = 60.0
#: The holder counts its lease as confirmed this fraction of ``ttl_s`` after its last renewal began.
CONFIRMED_FRACTION = 0.75
#: Seconds a best-effort taker (a server ignoring If-None-Match) waits before reading its record back.
BEST_EFFORT_SETTLE_S = 1.0
#: Tries at taking a contended lease before giving up (each loses a create race to another taker).
ACQUIRE_TRIES = 8

_RECORD = re.compile(r"/lease/(\d{8})\.json$")


def lease_prefix(cell_prefix: str) -> str:
    return f"{cell_prefix.rstrip('/')}/lease"


@dataclass(frozen=True)
class Record:
    """One lease record as stored."""

    owner: str
    generation: int
    host: str
    pid: int
    host_id: str | None  # kernel boot + PID namespace: where ``pid`` can be checked
    started: int | None  # the process's start time in clock ticks since boot (guards against PID reuse)
    expires: float  # wall clock (time.time())
    ttl_s: float
    released: bool

    @classmethod
    def parse(cls, data: bytes) -> "Record":
        doc = json.loads(data)
        return cls(owner=str(doc["owner"]), generation=int(doc["generation"]), host=str(doc.get("host", "?")),
                   pid=int(doc.get("pid", 0)), host_id=doc.get("host_id"), started=doc.get("started"),
                   expires=float(doc["expires"]), ttl_s=float(doc.get("ttl_s", LEASE_SECONDS)),
                   released=bool(doc.get("released", False)))

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "owner": self.owner, "generation": self.generation, "host": self.host, "pid": self.pid,
            "host_id": self.host_id, "started": self.started, "expires": self.expires, "ttl_s": self.ttl_s,
            "released": self.released, "renewed": _iso(time.time()),
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    def live(self, now: float | None = None) -> bool:
        """Held: not released, not expired, and its process not known to be dead."""
        now = time.time() if now is None else now
        return not self.released and self.expires > now and not holder_is_dead(self)

    def describe(self) -> str:
        until = "released" if self.released else f"until {_iso(self.expires)}"
        return f"held by {self.host} pid {self.pid} ({until})"


def holder_is_dead(record: Record) -> bool:
    """True only when the holder ran on this kernel and in this PID namespace, and its process is gone."""
    if record.host_id is None or record.host_id != HOST_ID or record.pid <= 0:
        return False
    started = _process_start(record.pid)
    if started is None:
        return True
    return record.started is not None and started != record.started


def _host_id() -> str | None:
    """hostname|boot id|PID namespace: two processes with equal ids can see each other's PIDs."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{socket.gethostname()}|{boot}|{pidns}"


def _process_start(pid: int) -> int | None:
    """The process's start time (field 22 of /proc/PID/stat), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    state, started = fields[0], int(fields[19])
    return None if state in ("Z", "X") else started


HOST_ID = _host_id()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def _generations(store: Store, prefix: str) -> list[int]:
    return sorted(int(m.group(1)) for key in store.list(prefix + "/") if (m := _RECORD.search(key)))


def _key(prefix: str, generation: int) -> str:
    return f"{prefix}/{generation:08d}.json"


def current_holder(store: Store, cell_prefix: str) -> Record | None:
    """The newest lease record of a cell (live or not), None if there is none or it cannot be read."""
    prefix = lease_prefix(cell_prefix)
    for generation in reversed(_generations(store, prefix)):
        try:
            data = store.get_bytes(_key(prefix, generation))
        except KeyError:  # gone since the listing (pruned or wiped): look at the one before
            continue
        try:
            return Record.parse(data)
        except (ValueError, KeyError, TypeError):
            return None
    return None


def live_holder(store: Store, cell_prefix: str) -> Record | None:
    """The cell's lease record if someone holds it now, else None (what ``critbatch run`` checks first)."""
    record = current_holder(store, cell_prefix)
    return record if record is not None and record.live() else None


def honours_create(store: Store, prefix: str, owner: str) -> bool:
    """Does ``store.create`` refuse an existing key? Two creates of one probe key under ``prefix``, then a delete."""
    key = f"{prefix}/probe-{owner}"
    try:
        store.create(key, b"probe\n")
        return not store.create(key, b"probe\n")
    finally:
        store.delete(key)


class Lease:
    """The lease on one cell. ``acquire()``, then ``start_renewing()``; ``check()`` before anything destructive;
    ``confirmed`` before any write; ``release()`` at the end (also as a context manager)."""

    def __init__(self, store: Store, cell_prefix: str, *, ttl_s: float = LEASE_SECONDS, owner: str | None = None):
        if not ttl_s > 0:
            raise ValueError(f"lease: ttl_s must be positive, got {ttl_s}")
        self.store = store
        self.prefix = lease_prefix(cell_prefix)
        self.ttl_s = float(ttl_s)
        self.owner = owner or uuid.uuid4().hex
        self.generation: int | None = None
        self.best_effort = False
        self._confirmed_until = 0.0  # time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: LeaseHeld | None = None

    def _record(self, generation: int, *, released: bool = False) -> Record:
        now = time.time()
        return Record(owner=self.owner, generation=generation, host=socket.gethostname(), pid=os.getpid(),
                      host_id=HOST_ID, started=_process_start(os.getpid()), expires=now if released else now + self.ttl_s,
                      ttl_s=self.ttl_s, released=released)

    def _read(self, generation: int) -> Record | None:
        """The record (None: unreadable, which counts as stale); KeyError if it is gone."""
        data = self.store.get_bytes(_key(self.prefix, generation))
        try:
            return Record.parse(data)
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def confirmed(self) -> bool:
        """Held and renewed recently enough to write (no store round trip)."""
        return self.generation is not None and self.lost is None and time.monotonic() < self._confirmed_until

    def acquire(self) -> "Lease":
        """Take the lease, or raise LeaseHeld naming its holder. StoreUnavailable passes through."""
        self.best_effort = not honours_create(self.store, self.prefix, self.owner)
        if self.best_effort:
            print(f"lease: {self.store.url} ignores If-None-Match; the cell's lease is best effort "
                  f"(a read-back after {BEST_EFFORT_SETTLE_S:g} s)", file=sys.stderr, flush=True)
        for _ in range(ACQUIRE_TRIES):
            top = max(_generations(self.store, self.prefix), default=0)
            old: Record | None = None
            if top:
                try:
                    old = self._read(top)
                except KeyError:  # pruned since the listing
                    continue
                if old is not None and old.live():
                    raise LeaseHeld(f"cell {self.prefix.rsplit('/', 2)[-2]} is {old.describe()}")
            mine = top + 1
            started = time.monotonic()
            if not self.store.create(_key(self.prefix, mine), self._record(mine).to_bytes()):
                continue  # another taker created it first: look again
            if self.best_effort:
                time.sleep(BEST_EFFORT_SETTLE_S)
                try:
                    back = self._read(mine)
                except KeyError:
                    back = None
                if back is None or back.owner != self.owner:
                    continue
            if max(_generations(self.store, self.prefix), default=0) != mine:
                continue  # a best-effort race lost to a later taker
            self.generation = mine
            self._confirmed_until = started + CONFIRMED_FRACTION * self.ttl_s
            if old is not None and not old.released and not holder_is_dead(old):
                self._wait_out_renewal(top, old)
            self._prune(below=mine)
            return self
        raise LeaseHeld(f"lease {self.prefix}: lost {ACQUIRE_TRIES} races to take it; another trainer is starting")

    def _wait_out_renewal(self, generation: int, judged: Record) -> None:
        """The expired holder may have renewed between our read and our create: then it may still believe it
        holds the lease until its next renewal sees ours. Wait that belief out."""
        try:
            now = self._read(generation)
        except KeyError:
            return
        if now is not None and now.expires != judged.expires and not now.released:
            wait = CONFIRMED_FRACTION * now.ttl_s
            print(f"lease: the previous holder ({now.describe()}) renewed while we took over; waiting {wait:.0f} s "
                  f"for it to see the new lease", file=sys.stderr, flush=True)
            time.sleep(wait)

    def _prune(self, below: int) -> None:
        for generation in _generations(self.store, self.prefix):
            if generation < below:
                self.store.delete(_key(self.prefix, generation))

    def renew(self) -> None:
        """Rewrite our record with a new expiry, then make sure no newer record exists (else LeaseHeld)."""
        if self.generation is None:
            raise RuntimeError("lease: renew() before acquire()")
        started = time.monotonic()
        self.store.put_bytes(_key(self.prefix, self.generation), self._record(self.generation).to_bytes())
        self._ensure_newest()
        self._confirmed_until = started + CONFIRMED_FRACTION * self.ttl_s

    def _ensure_newest(self) -> None:
        top = max(_generations(self.store, self.prefix), default=0)
        if top != self.generation:
            newer = current_holder(self.store, self.prefix.rsplit("/", 1)[0])
            self.lost = LeaseHeld(f"lost the lease on {self.prefix.rsplit('/', 2)[-2]}: it is now "
                                  f"{newer.describe() if newer else f'record {top:08d}'}")
            raise self.lost

    def check(self) -> None:
        """The fence before a destructive step: the newest record is ours and unreleased (one store round trip)."""
        if self.lost is not None:
            raise self.lost
        if self.generation is None:
            raise RuntimeError("lease: check() before acquire()")
        self._ensure_newest()
        try:
            record = self._read(self.generation)
        except KeyError:
            record = None
        if record is None or record.owner != self.owner or record.released:
            self.lost = LeaseHeld(f"lost the lease on {self.prefix}: record {self.generation:08d} is not ours")
            raise self.lost

    def start_renewing(self, on_lost: Callable[[LeaseHeld], None] | None = None) -> None:
        """Renew every ttl_s / 3 in a daemon thread; an outage is retried every second or two (and the lease
        stops being ``confirmed`` once it lasts CONFIRMED_FRACTION * ttl_s); a takeover calls ``on_lost``."""
        def loop() -> None:
            delay = self.ttl_s / 3
            while not self._stop.wait(delay):
                try:
                    self.renew()
                    delay = self.ttl_s / 3
                except LeaseHeld as err:
                    print(f"lease: {err}", file=sys.stderr, flush=True)
                    if on_lost is not None:
                        on_lost(err)
                    return
                except StoreUnavailable:
                    delay = min(self.ttl_s / 10, 2.0)
                except Exception as err:  # noqa: BLE001 - a refused request: keep trying; writes pause meanwhile
                    print(f"lease: cannot renew ({err}); retrying", file=sys.stderr, flush=True)
                    delay = min(self.ttl_s / 10, 2.0)

        self._thread = threading.Thread(target=loop, name="lease-renewer", daemon=True)
        self._thread.start()

    def release(self, patience_s: float = 10.0) -> None:
        """Stop renewing and mark our record released (if it is still the newest); an outage past
        ``patience_s`` leaves it to expire."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.generation is None or self.lost is not None:
            return
        generation = self.generation

        def mark() -> None:
            if max(_generations(self.store, self.prefix), default=0) == generation:
                self.store.put_bytes(_key(self.prefix, generation), self._record(generation, released=True).to_bytes())

        try:
            wait_out_outage(mark, what=f"release the lease {self.prefix}", deadline=time.monotonic() + patience_s)
        except StoreUnavailable as err:
            print(f"lease: not released ({err}); it expires in {self.ttl_s:.0f} s", file=sys.stderr, flush=True)
        self.generation = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
