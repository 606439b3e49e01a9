"""Soak: rounds of faults against `critbatch run` on the loopback S3 server, then the store checked whole.

    .venv/bin/python benchmarks/soak_faults.py --rounds 50            # 30-60 min on two busy cores
    .venv/bin/python benchmarks/soak_faults.py --rounds 2 --reduced   # what tests/test_soak.py runs (about 1 min)

First a clean `critbatch run` of a small linreg grid (2 cells at once; --reduced: one) gives the reference. Then each
round, in a fresh sweep prefix on the same SeaweedFS server, starts `run` and injects a random mix of
faults at random moments while it trains (at least one per round):

    kill_run      SIGKILL of run's process group (its trainers must die with it), then run again
    kill_trainer  SIGKILL of one trainer process
    second_run    a second `run` of the same grid into the same store, concurrently
    s3_outage     the S3 server killed, restarted 10-30 s later (2-3 s with --reduced)
    truncate      one log part in the store cut to half its bytes

then waits for the runs, runs `run` again until it exits 0 (a busy cell exits 203: wait and retry), and
checks every cell: the log contract (every step exactly once, the evaluations of the clean run, no part
damaged), its _SUCCESS equal to the clean run's (wall time and the parts' layout aside: part boundaries
follow the flush clock), and `critbatch analyze --strict` exits 0. Leases live 10 s here
(CRITBATCH_LEASE_SECONDS), so outages also make trainers lose their lease to a later one.

Prints one line per round and a JSON summary (rounds, faults by kind, cells lost); exit 1 if any cell was
lost or a round could not be completed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

from critbatch.jobs.cell.layout import cell_prefix, success_key
from critbatch.jobs.cell.logschema import ipc_to_table
from critbatch.jobs.cli import main as cli
from critbatch.jobs.local.s3server import S3Server
from critbatch.jobs.store import S3Store
from critbatch.jobs.store.cellstate import cell_state
from critbatch.jobs.sweep.grid import load_grid

GRID = {
    "sweep": "soak",
    "dataset": {"name": "linreg", "options": {"n": 64, "d": 128, "spikes": 2, "spike_var": 20.0}},
    "model": "linear", "strategy": "oracle", "base_lr": 1.0, "base_batch": 4, "epochs": 250,
    "batch_size": [4, 8], "seed": 0, "optimizer": {"momentum": 0.0, "weight_decay": 0.0},
    "eval": {"points": 20}, "resources": {"gpus": 0, "cpu": 1, "memory": "1Gi"}, "checkpoint_seconds": 1.0,
}
FAULTS = ("kill_run", "kill_trainer", "second_run", "s3_outage", "truncate")
BUCKET = "soak"


class Soak:
    def __init__(self, work: Path, *, reduced: bool, seed: int):
        self.work = work
        self.reduced = reduced
        self.rng = random.Random(seed)
        grid = dict(GRID, epochs=150, batch_size=[8]) if reduced else GRID
        self.parallel = len(grid["batch_size"])
        self.grid_path = work / "grid.yaml"
        self.grid_path.write_text(yaml.safe_dump(grid))
        self.cells = load_grid(str(self.grid_path)).cells()
        self.server = S3Server(work / "s3", log_path=str(work / "weed.log"))
        self.env = None
        self.faults: Counter[str] = Counter()
        self.lost: list[str] = []

    # ---- processes -------------------------------------------------------------------

    def start(self) -> None:
        self.server.start()
        os.environ.update(self.server.env())  # for this process's own reads of the store
        self.env = {**os.environ, "CRITBATCH_LEASE_SECONDS": "10", "OMP_NUM_THREADS": "1",
                    "CUDA_VISIBLE_DEVICES": "", "CRITBATCH_SPOOL": str(self.work / "spool")}

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def run(self, prefix: str, tag: str) -> subprocess.Popen:
        logs = self.work / "logs" / prefix / tag
        cmd = [sys.executable, "-m", "critbatch.jobs.cli", "run", str(self.grid_path), "--store", self.url(prefix),
               "--parallel", str(self.parallel), "--log-dir", str(logs)]
        err = open(self.work / "logs" / f"{prefix}-{tag}.err", "ab")
        logs.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

    def trainers(self, prefix: str) -> list[int]:
        url = self.url(prefix).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"train" in argv and url in argv:
                    pids.append(int(entry.name))
        return pids

    def complete(self, prefix: str, tries: int = 12) -> bool:
        """`run` until it exits 0: 203 means a cell is still held (a lease not yet expired), so wait."""
        for _ in range(tries):
            proc = self.run(prefix, "complete")
            code = proc.wait(timeout=600)
            if code == 0:
                return True
            time.sleep(2.0)
        return False

    # ---- the store ----------------------------------------------------------------------

    def store(self, prefix: str) -> S3Store:
        return S3Store(BUCKET, prefix)

    def outcome(self, prefix: str) -> dict[str, dict]:
        """Per cell: its _SUCCESS less wall time and part layout, its step losses and evaluations."""
        store = self.store(prefix)
        out = {}
        for cell in self.cells:
            p = cell_prefix(cell.sweep, cell.id)
            state = cell_state(store, cell.sweep, cell.id)
            summary = json.loads(store.get_text(success_key(cell.sweep, cell.id)))
            summary.pop("wall_time_s")
            summary.pop("code_version")  # the tree's commit, which may move on during a long soak
            logs = summary.pop("logs")
            summary["rows"] = {kind: logs[kind]["rows"] for kind in logs}
            steps = [r for k in store.list(f"{p}/steps/") for r in ipc_to_table(store.get_bytes(k)).to_pylist()]
            evals = [r for k in store.list(f"{p}/evals/") for r in ipc_to_table(store.get_bytes(k)).to_pylist()]
            out[cell.id] = {
                "state": state.state, "problems": state.problems, "summary": summary,
                "steps": [r["step"] for r in steps], "losses": [r["train_loss"] for r in steps],
                "evals": sorted((r["step"], r["split"], r["metric"], r["loss"]) for r in evals),
            }
        return out

    def check(self, prefix: str, reference: dict[str, dict]) -> list[str]:
        """Cells that differ from the clean run, each with what is wrong."""
        bad = []
        try:
            got = self.outcome(prefix)
        except (KeyError, ValueError) as err:
            return [f"{prefix}: cannot read the cells back ({err})"]
        for cell_id, ref in reference.items():
            mine = got[cell_id]
            total = ref["summary"]["steps"]
            problems = []
            if mine["state"] != "done":
                problems.append(f"state {mine['state']}: {mine['problems']}")
            if mine["steps"] != list(range(1, total + 1)):
                problems.append(f"{len(mine['steps'])} step rows ({len(set(mine['steps']))} distinct) of {total}")
            for key in ("summary", "losses", "evals"):
                if mine[key] != ref[key]:
                    problems.append(f"{key} differ from the clean run")
            if problems:
                bad.append(f"{prefix}/{cell_id}: " + "; ".join(problems))
        with open(self.work / "logs" / f"{prefix}-analyze.err", "w") as err, contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(err):
            code = cli(["analyze", "--store", self.url(prefix), "--sweep", "soak", "--strict", "--bootstrap", "0"])
        if code != 0:
            bad.append(f"{prefix}: analyze --strict exited {code}")
        return bad

    # ---- faults -------------------------------------------------------------------------

    def truncate(self, prefix: str, wait: float = 30.0) -> bool:
        """Cut one part (waiting up to ``wait`` s for the first to appear); False if none could be cut."""
        store = self.store(prefix)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                keys = [k for k in store.list("soak/cells/") if "/part-" in k]
                if keys:
                    key = self.rng.choice(keys)
                    data = store.get_bytes(key)
                    store.put_bytes(key, data[: len(data) // 2])
                    return True
            except Exception:  # noqa: BLE001 - the server is down (an outage at the same moment): try again
                pass
            time.sleep(0.5)
        return False

    def outage(self, seconds: float) -> None:
        self.server.stop()
        time.sleep(seconds)
        self.server.start()

    def round(self, number: int, reference: dict[str, dict]) -> dict:
        prefix = f"round-{number:03d}"
        chosen = [f for f in FAULTS if self.rng.random() < 0.45] or [self.rng.choice(FAULTS)]
        started = time.monotonic()
        runs = [self.run(prefix, "first")]
        injected: list[str] = []
        outage_thread = None
        plan = sorted((self.rng.uniform(1.0, 6.0 if self.reduced else 10.0), f) for f in chosen)
        for at, fault in plan:
            time.sleep(max(0.0, at - (time.monotonic() - started)))
            if fault == "kill_run":
                os.killpg(runs[0].pid, signal.SIGKILL)
                runs[0].wait()
                runs[0] = self.run(prefix, f"after-kill-{len(injected)}")
            elif fault == "kill_trainer":
                pids = self.trainers(prefix)
                if not pids:
                    continue
                try:
                    os.kill(self.rng.choice(pids), signal.SIGKILL)
                except ProcessLookupError:
                    continue
            elif fault == "second_run":
                runs.append(self.run(prefix, "second"))
            elif fault == "s3_outage":
                seconds = self.rng.uniform(2.0, 3.0) if self.reduced else self.rng.uniform(10.0, 30.0)
                outage_thread = threading.Thread(target=self.outage, args=(seconds,))
                outage_thread.start()
            elif fault == "truncate":
                if not self.truncate(prefix):
                    continue
            injected.append(fault)
        if outage_thread is not None:
            outage_thread.join()
        for proc in runs:
            try:
                proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        completed = self.complete(prefix)
        leftover = self.trainers(prefix)
        bad = self.check(prefix, reference) if completed else [f"{prefix}: run never exited 0"]
        if leftover:
            bad.append(f"{prefix}: trainers still alive after the round: {leftover}")
        self.faults.update(injected)
        self.lost.extend(bad)
        return {"round": number, "faults": injected, "seconds": round(time.monotonic() - started, 1), "bad": bad}

    def reference(self) -> dict[str, dict]:
        assert self.complete("clean", tries=1), "the clean run failed"
        return self.outcome("clean")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reduced", action="store_true", help="2 cells, shorter runs, outages of 2-3 s")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="critbatch-soak-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    soak = Soak(work, reduced=args.reduced, seed=args.seed)
    soak.start()
    began = time.monotonic()
    rounds = []
    try:
        reference = soak.reference()
        for number in range(1, args.rounds + 1):
            result = soak.round(number, reference)
            rounds.append(result)
            print(f"round {number:3d}: {result['seconds']:5.1f} s  faults {','.join(result['faults']) or '-'}  "
                  f"{'LOST ' + '; '.join(result['bad']) if result['bad'] else 'whole'}", flush=True)
    finally:
        soak.server.stop()
    summary = {"rounds": len(rounds), "cells_per_round": len(soak.cells), "faults": dict(soak.faults),
               "lost": soak.lost, "cells_lost": len(soak.lost), "seconds": round(time.monotonic() - began, 1),
               "work": str(work)}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "per_round": rounds}, indent=2))
    return 1 if soak.lost else 0


if __name__ == "__main__":
    sys.exit(main())
