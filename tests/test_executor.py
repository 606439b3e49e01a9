"""The local executor: `critbatch run` trains a grid's cells as subprocesses, resumes after an interrupt."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from critbatch.jobs.cli import main
from critbatch.jobs.sweep.grid import load_grid
from critbatch.jobs.store import open_store
from critbatch.jobs.cell.layout import success_key
from factories import TINY, steps_of


def _grid_file(tmp_path, **changes):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


@pytest.mark.slow
def test_interrupt_then_rerun_trains_every_cell_once(tmp_path, any_store_url):
    grid_path = _grid_file(tmp_path)
    cells = load_grid(str(grid_path)).cells()
    store = open_store(any_store_url)
    cmd = [sys.executable, "-m", "critbatch.jobs.cli", "run", str(grid_path), "--store", any_store_url,
           "--parallel", "1", "--log-dir", str(tmp_path / "logs")]
    # A terminal's Ctrl-C reaches a foreground process: SIGINT handled as Python does by default, even when this
    # suite itself was started in the background (where the shell has it ignored, and children inherit that).
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not any(store.exists(success_key("tiny", c.id)) for c in cells):
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline, "no cell finished in time"
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)  # what Ctrl-C does
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    done_first = {c.id: store.get_text(success_key("tiny", c.id)) for c in cells
                  if store.exists(success_key("tiny", c.id))}
    assert 1 <= len(done_first) < len(cells)

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done_first)} of {len(cells)} tiny already done" in rerun.stderr
    for cell in cells:
        summary = store.get_text(success_key("tiny", cell.id))
        if cell.id in done_first:  # not trained again: the very same _SUCCESS
            assert summary == done_first[cell.id]
        assert json.loads(summary)["status"] == "done"
        steps = steps_of(store, f"tiny/cells/{cell.id}")
        total = json.loads(summary)["steps"]
        assert sorted(steps) == list(range(1, total + 1)), "every step exactly once"
    assert store.exists("tiny/sweep.yaml")


@pytest.mark.slow
def test_failed_cell_is_reported_and_others_go_on(tmp_path, capsys):
    # A cifar10 cell with no data staged fails at start-up (exit 2); the linreg cells still train.
    grid_path = tmp_path / "mixed.yaml"
    grid_path.write_text(yaml.safe_dump({**TINY, "batch_size": [4, 8]}))
    store_url = str(tmp_path / "store")
    assert main(["run", str(grid_path), "--store", store_url, "--log-dir", str(tmp_path / "logs")]) == 0
    bad = tmp_path / "bad.yaml"
    # Its pod's memory holds a ResNet-34 at batch 64 by the sizing's estimate (1Gi does not).
    bad.write_text(yaml.safe_dump({**TINY, "sweep": "bad", "dataset": {"name": "cifar10"}, "model": "resnet34",
                                   "strategy": "blr", "batch_size": [64],
                                   "resources": {"gpus": 0, "cpu": 1, "memory": "4Gi"}}))
    code = main(["run", str(bad), "--store", store_url, "--data-root", str(tmp_path / "nodata"),
                 "--log-dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err
    assert code == 1
    assert "FAILED bad/" in err and "exit code 2" in err
    assert "critbatch data stage" in err  # the tail of the cell's log says how to stage the data


@pytest.mark.parametrize("argv, message", [
    (["run", "no-such-grid"], "no file 'no-such-grid' and no preset"),
    (["run", "digits", "--parallel", "0"], "--parallel: must be at least 1"),
    (["run", "digits", "--store", "gs://x/y"], "unsupported scheme"),
])
def test_bad_input_exits_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "critbatch-out").exists()  # nothing written


@pytest.mark.slow
def test_progress_comes_from_the_trainers_json_lines(tmp_path, cpu_env, capsys):
    """The executor's reader on a real `critbatch train --progress json` log, with other output around it."""
    from factories import cell_json, read_rows, train

    from critbatch.jobs.cell.spec import Cell
    from critbatch.jobs.cell.layout import cell_prefix
    from critbatch.jobs.local.executor import CellRun, _read_progress

    url = str(tmp_path / "store")
    assert train(cell_json(max_steps=12), url, "--progress", "json") == 0
    out = capsys.readouterr().out
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert reports[-1]["step"] == 12 and {r["total"] for r in reports} == {12}
    assert [r["step"] for r in reports] == sorted(r["step"] for r in reports)

    cell = Cell.from_json(cell_json(max_steps=12))
    log = tmp_path / "cell.log"
    log.write_text(out + "a warning on stderr\n" + '{"step": 13, "tot')  # a line still being written
    run = CellRun(cell, log)
    _read_progress(run)
    last_loss = read_rows(open_store(url), cell_prefix("t", cell.id), "steps")[-1]["train_loss"]
    assert run.progress == (12, 12) and run.loss == pytest.approx(last_loss)


@pytest.mark.slow
def test_run_takes_the_grids_local_store_and_checkpoint_seconds(tmp_path, monkeypatch):
    from critbatch.jobs.train.checkpoint import Checkpointer

    monkeypatch.chdir(tmp_path)
    grid_path = _grid_file(tmp_path, batch_size=[8], store=str(tmp_path / "grid-store"), checkpoint_seconds=0.001)
    assert main(["run", str(grid_path), "--log-dir", str(tmp_path / "logs")]) == 0
    store = open_store(str(tmp_path / "grid-store"))
    (cell,) = load_grid(str(grid_path)).cells()
    assert json.loads(store.get_text(success_key("tiny", cell.id)))["status"] == "done"
    # 160 steps: checkpoints by the grid's clock (the default, 300 s, would make none in a run this short).
    # Each one syncs the step log into a part of its own (without them: about one per evaluation, 10);
    # _SUCCESS then pruned them (model.pt stays).
    prefix = f"tiny/cells/{cell.id}"
    assert len(store.list(f"{prefix}/steps/")) > 40
    assert Checkpointer(store, prefix).complete_steps() == [] and store.exists(f"{prefix}/model.pt")
    assert not (tmp_path / "critbatch-out").exists()
