"""The pod launcher (jobs/train/launch.py): the container's exit code is the trainer's.

Several processes through torch.distributed.run are exercised by tests/test_pods.py, which runs the
rendered pods; here the one-process path, the code a container reports, and the GPU check.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from critbatch.jobs.cell.errors import ExitCode
from critbatch.jobs.cli import main as cli
from critbatch.jobs.train import launch

DIGITS = {"dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "blr", "batch_size": 16, "base_lr": 0.05,
          "base_batch": 16, "epochs": 1, "max_steps": 2, "sweep": "t", "eval": {"points": 2}}


@pytest.mark.parametrize("returncode, code", [(0, 0), (1, 1), (2, 2), (202, 202), (-15, 143), (-9, 137), (-2, 130)])
def test_container_exit_code(returncode, code):
    assert launch.container_exit_code(returncode) == code


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # cli is imported here already; not in a pod
def test_one_process_runs_the_trainer_in_the_launcher(tmp_path, monkeypatch, capsys):
    """No torchrun for one process: the cell's exit code (here a bad cell's) is the launcher's."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    cell = json.dumps({**DIGITS, "batch_size": 5000})
    argv = ["--standalone", "--nproc-per-node=1", "-m", "critbatch.jobs.cli", "train", "--cell", cell,
            "--store", str(tmp_path / "store")]
    assert launch.main(argv) == ExitCode.CONFIG
    assert "cell.batch_size: 5000 is larger than the training set (1437 examples)" in capsys.readouterr().err
    assert sys.argv[0] == "critbatch.jobs.cli"  # the module saw the command line torchrun would have given it


@pytest.mark.slow
def test_one_process_program_replaces_the_launcher():
    """``--no-python PROGRAM``: exec'd, so its exit code is the process's."""
    result = subprocess.run([sys.executable, "-m", "critbatch.jobs.train.launch", "--nproc-per-node=1", "--no-python",
                             "sh", "-c", "exit 7"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 7, result.stderr


def test_cuda_asked_for_and_none_seen_exits_with_its_own_code(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    store = tmp_path / "store"
    assert cli(["train", "--cell", json.dumps(DIGITS), "--store", str(store), "--device", "cuda"]) == ExitCode.NO_DEVICE
    err = capsys.readouterr().err
    assert "--device cuda: torch" in err and "sees no CUDA device" in err and "not training on the CPU" in err
    assert not any(store.rglob("*.json")), "nothing is written before the device is checked"
