"""The cell lease: an atomic create on both stores, one holder at a time, takeover of expired or dead holders."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from critbatch.jobs.cell.errors import LeaseHeld, StoreUnavailable
from critbatch.jobs.store import LocalStore, open_store
from critbatch.jobs.store.cellstate import judge
from critbatch.jobs.store.lease import Lease, current_holder, honours_create, live_holder

CELL = "sw/cells/abc123"


def test_create_is_exclusive_under_a_race(any_store_url):
    """Eight threads create one key at once: exactly one wins, and the object is the winner's."""
    store = open_store(any_store_url)
    store.exists("warm-up")  # the S3 client is built once, before the threads share it
    for round_ in range(2):
        key = f"race/k{round_}"
        wins: list[int] = []
        start = threading.Barrier(8)

        def go(i: int) -> None:
            start.wait()
            if store.create(key, f"{i}".encode()):
                wins.append(i)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        assert store.get_bytes(key) == f"{wins[0]}".encode()
        assert not store.create(key, b"late") and store.get_bytes(key) == f"{wins[0]}".encode()


def test_seaweedfs_honours_if_none_match(s3_url):
    """The loopback server refuses a second If-None-Match PUT, so the lease there is exact, not best effort."""
    assert honours_create(open_store(s3_url), f"{CELL}/lease", "probe-test")


def test_second_taker_is_refused_until_release(any_store_url):
    store = open_store(any_store_url)
    first = Lease(store, CELL, ttl_s=30).acquire()
    with pytest.raises(LeaseHeld, match=r"cell abc123 is held by .* pid \d+ \(until "):
        Lease(store, CELL, ttl_s=30).acquire()
    assert live_holder(store, CELL).owner == first.owner
    first.release()
    assert live_holder(store, CELL) is None and current_holder(store, CELL).released
    second = Lease(store, CELL, ttl_s=30).acquire()
    assert second.generation == 2
    assert [k.rsplit("/", 1)[1] for k in store.list(f"{CELL}/lease/")] == ["00000002.json"]  # older pruned


def test_expired_lease_is_taken_over_and_the_old_holder_learns_it(tmp_path):
    store = LocalStore(tmp_path)
    old = Lease(store, CELL, ttl_s=0.3).acquire()
    assert old.confirmed
    time.sleep(0.35)
    assert not old.confirmed  # 0.75 * ttl without a renewal: no more writes
    new = Lease(store, CELL, ttl_s=30).acquire()
    with pytest.raises(LeaseHeld, match="lost the lease on abc123"):
        old.renew()
    with pytest.raises(LeaseHeld, match="lost the lease"):
        old.check()
    new.check()  # the fence passes for the holder


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    """A SIGKILLed trainer never releases: its record names a process that is gone, so a new one need not wait."""
    script = (f"from critbatch.jobs.store import LocalStore; from critbatch.jobs.store.lease import Lease; "
              f"Lease(LocalStore({str(tmp_path)!r}), {CELL!r}, ttl_s=3600).acquire()")
    subprocess.run([sys.executable, "-c", script], check=True)
    store = LocalStore(tmp_path)
    assert current_holder(store, CELL).expires > time.time() + 3000  # not expired, yet not live:
    assert live_holder(store, CELL) is None
    assert Lease(store, CELL).acquire().generation == 2


def test_renewal_keeps_the_lease_and_an_outage_pauses_writes(tmp_path):
    class Outage(LocalStore):
        down = False

        def put_bytes(self, key, data):
            if self.down:
                raise StoreUnavailable("connection refused")
            super().put_bytes(key, data)

    store = Outage(tmp_path)
    lease = Lease(store, CELL, ttl_s=0.6).acquire()
    lease.start_renewing()
    time.sleep(1.0)  # past the ttl: only the renewals keep it
    assert lease.confirmed
    with pytest.raises(LeaseHeld):
        Lease(LocalStore(tmp_path), CELL).acquire()
    store.down = True
    time.sleep(0.7)
    assert not lease.confirmed
    store.down = False
    deadline = time.monotonic() + 3
    while not lease.confirmed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lease.confirmed  # renewed again after the outage, nobody took over meanwhile
    lease.release()


def test_a_store_ignoring_the_condition_gets_a_best_effort_lease(tmp_path, monkeypatch, capsys):
    """create() that overwrites (a server ignoring If-None-Match): the lease says so and reads its record back."""
    class Ignoring(LocalStore):
        def create(self, key, data):
            self.put_bytes(key, data)
            return True

    monkeypatch.setattr("critbatch.jobs.store.lease.BEST_EFFORT_SETTLE_S", 0.05)
    store = Ignoring(tmp_path)
    first = Lease(store, CELL, ttl_s=30).acquire()
    assert first.best_effort and "ignores If-None-Match" in capsys.readouterr().err
    with pytest.raises(LeaseHeld, match="held by"):
        Lease(store, CELL, ttl_s=30).acquire()


def _success(**logs) -> bytes:
    return json.dumps({"status": "done", "steps": 10, "logs": logs}).encode()


P = "sw/cells/c1"
R = {f"{P}/cell.json": 300}  # the cell's record, which a finished cell has beside its parts


@pytest.mark.parametrize("success, sizes, state, problem", [
    (_success(steps={"rows": 10, "parts": [100, 50]}), {**R, f"{P}/steps/part-000000.arrow": 100,
                                                          f"{P}/steps/part-000001.arrow": 50}, "done", None),
    (_success(steps={"rows": 10, "parts": [100, 50]}), {f"{P}/steps/part-000000.arrow": 100,
                                                          f"{P}/steps/part-000001.arrow": 50}, "damaged",
     "cell.json is missing"),
    (_success(steps={"rows": 10, "parts": [100, 50]}), {**R, f"{P}/steps/part-000000.arrow": 100,
                                                          f"{P}/steps/part-000001.arrow": 31}, "damaged",
     "steps part 000001 has 31 bytes, not 50"),
    (_success(steps={"rows": 10, "parts": [100, 50]}), {**R, f"{P}/steps/part-000001.arrow": 50}, "damaged",
     "steps part 000000 is missing"),
    (_success(steps={"rows": 10, "parts": [100]}), {**R, f"{P}/steps/part-000000.arrow": 100,
                                                     f"{P}/steps/part-000001.arrow": 9}, "damaged",
     "steps parts 000001 were written after _SUCCESS"),
    (json.dumps({"status": "done", "steps": 10}).encode(), {**R, f"{P}/evals/part-000001.arrow": 9}, "damaged",
     "evals parts 000000 are missing"),  # no manifest (an older _SUCCESS): gaps still show
    (b'{"status": "do', {}, "damaged", "_SUCCESS is unreadable: not JSON"),
    (b'{"status": "running", "steps": 3}', {}, "damaged", "_SUCCESS is unreadable: no status done|diverged"),
    (b'{"status": "done", "steps": "many"}', R, "damaged", "_SUCCESS is unreadable: steps is not a count"),
])
def test_a_cell_is_finished_only_when_its_success_and_parts_agree(success, sizes, state, problem):
    judged = judge(success, sizes, P)
    assert judged.state == state
    assert [p[:len(problem or "")] for p in judged.problems] == ([] if problem is None else [problem])
