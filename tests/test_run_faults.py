"""`critbatch run` owns its trainers and shares a store safely: killed or stopped, it leaves no trainer behind;
two runs of one grid train each cell once; a damaged cell is trained again."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from critbatch.jobs.cell.layout import cell_prefix, success_key
from critbatch.jobs.store import open_store
from critbatch.jobs.store.cellstate import cell_state
from critbatch.jobs.sweep.grid import load_grid
from critbatch.jobs.train.checkpoint import Checkpointer
from factories import TINY, steps_of

pytestmark = pytest.mark.slow

GRID = {**TINY, "sweep": "own", "epochs": 300, "batch_size": [4, 8], "checkpoint_seconds": 0.3}


def _grid(tmp_path: Path, **changes) -> tuple[Path, list]:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**GRID, **changes}))
    return path, load_grid(str(path)).cells()


def _run(grid: Path, url: str, logs: Path, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "critbatch.jobs.cli", "run", str(grid), "--store", url, "--parallel", "2",
           "--log-dir", str(logs)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def trainers_of(url: str) -> list[int]:
    """Pids of the processes training into ``url`` (their command line names the store)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in argv and url.encode() in argv:
            pids.append(int(entry.name))
    return pids


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _check_contract(store, cells) -> None:
    for cell in cells:
        summary = json.loads(store.get_text(success_key(cell.sweep, cell.id)))
        assert sorted(steps_of(store, cell_prefix(cell.sweep, cell.id))) == list(range(1, summary["steps"] + 1))
        assert cell_state(store, cell.sweep, cell.id).state == "done"


def test_sigkill_of_runs_group_at_random_moments_leaves_no_trainer(tmp_path, cpu_env):
    grid, cells = _grid(tmp_path)
    url = str(tmp_path / "store")
    rng = random.Random(os.getpid())
    for attempt in range(3):
        run = _run(grid, url, tmp_path / "logs", start_new_session=True)
        _wait(lambda: trainers_of(url) or run.poll() is not None, 60, "no trainer started")
        time.sleep(rng.uniform(0.0, 3.0))
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        _wait(lambda: not trainers_of(url), 10, f"trainers outlived the SIGKILL of run: {trainers_of(url)}")
    final = subprocess.run([sys.executable, "-m", "critbatch.jobs.cli", "run", str(grid), "--store", url,
                            "--log-dir", str(tmp_path / "logs")], capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    _check_contract(open_store(url), cells)


def test_sigterm_to_run_checkpoints_every_trainer_then_exits_143(tmp_path, cpu_env):
    grid, cells = _grid(tmp_path, epochs=2000)
    url = str(tmp_path / "store")
    store = open_store(url)
    run = _run(grid, url, tmp_path / "logs")
    prefixes = [cell_prefix(c.sweep, c.id) for c in cells]
    _wait(lambda: all(Checkpointer(store, p).complete_steps() for p in prefixes), 120, "no checkpoints")
    before = {p: Checkpointer(store, p).complete_steps()[-1] for p in prefixes}
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 143, err
    assert "SIGTERM: asking 2 running cells to checkpoint and stop" in err
    assert "2 stopped by SIGTERM after a checkpoint" in err
    assert not trainers_of(url)
    for p in prefixes:  # each trainer wrote a checkpoint on the way out, and none finished
        assert Checkpointer(store, p).complete_steps()[-1] > before[p]
        assert not store.exists(f"{p}/_SUCCESS")
    for cell in cells:
        log = (tmp_path / "logs" / f"{cell.sweep}-{cell.id}.log").read_text()
        assert "on SIGTERM (checkpointed); exit 143" in log


def test_two_runs_of_one_grid_train_each_cell_once(tmp_path, cpu_env):
    grid, cells = _grid(tmp_path, batch_size=[4, 8, 16])
    url = str(tmp_path / "store")
    runs = [_run(grid, url, tmp_path / f"logs{i}") for i in range(2)]
    errs = [r.communicate(timeout=300)[1] for r in runs]
    assert {r.returncode for r in runs} <= {0, 203}, errs
    done = sum(log.read_text().count(" done after ") for i in range(2) for log in (tmp_path / f"logs{i}").iterdir())
    assert done == len(cells), errs  # every cell trained by exactly one of them
    for run, err in zip(runs, errs):  # a run that found a cell in the other's hands names it, and exits 203
        assert (run.returncode == 203) == ("busy   own/" in err), err
    again = subprocess.run([sys.executable, "-m", "critbatch.jobs.cli", "run", str(grid), "--store", url,
                            "--log-dir", str(tmp_path / "logs2")], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and f"{len(cells)} of {len(cells)} own already done" in again.stderr
    _check_contract(open_store(url), cells)


def test_run_trains_damaged_cells_again(tmp_path, cpu_env):
    grid, cells = _grid(tmp_path, epochs=20)
    url = str(tmp_path / "store")
    store = open_store(url)
    cmd = [sys.executable, "-m", "critbatch.jobs.cli", "run", str(grid), "--store", url, "--log-dir",
           str(tmp_path / "logs")]
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    cut, unreadable = cells
    key = store.list(f"{cell_prefix(cut.sweep, cut.id)}/steps/")[0]
    store.put_bytes(key, store.get_bytes(key)[:100])
    store.put_text(success_key(unreadable.sweep, unreadable.id), "{")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"damaged {cut.id}: steps part 000000 has 100 bytes" in again.stderr
    assert f"damaged {unreadable.id}: _SUCCESS is unreadable" in again.stderr
    assert "2 trained, 0 already done" in again.stderr
    _check_contract(store, cells)
