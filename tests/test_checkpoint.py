"""Checkpoints on a local directory and on the loopback S3 server."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from critbatch.jobs.train.checkpoint import Checkpointer
from critbatch.jobs.store import open_store

PREFIX = "sweep/cells/abc123"


def _state(step: int) -> dict:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "data": {"epoch": 3, "batch": 17},
        "log_parts": {"steps": 5, "evals": 2},
        "lr": 0.05,
        "name": "cell",
    }


@pytest.fixture
def ckpt(any_store_url):
    return Checkpointer(open_store(any_store_url), PREFIX, keep=2)


def test_round_trip_restores_tensors_rng_and_plain_values(ckpt):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = _state(step=100)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.save(100, state)

    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    loaded = ckpt.load_latest()
    assert loaded["step"] == 100 and loaded["lr"] == 0.05 and loaded["name"] == "cell"
    assert loaded["data"] == {"epoch": 3, "batch": 17} and loaded["log_parts"] == {"steps": 5, "evals": 2}
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    momentum = state["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], momentum)

    # The restored generators continue exactly where the saved ones were.
    torch.set_rng_state(loaded["rng"]["torch"])
    np.random.set_state(loaded["rng"]["numpy"])
    random.setstate(loaded["rng"]["python"])
    assert torch.equal(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_no_checkpoint_gives_none(ckpt):
    assert ckpt.load_latest() is None
    assert ckpt.complete_steps() == []


def test_checkpoint_without_marker_is_ignored(ckpt):
    ckpt.save(10, {"step": 10})
    # A process killed between the state and the marker leaves this behind.
    ckpt.store.put_bytes(f"{PREFIX}/checkpoint/step-{20:010d}/state.pt", b"half a checkpoint")
    assert ckpt.complete_steps() == [10]
    assert ckpt.load_latest() == {"step": 10}


def test_keep_prunes_older_checkpoints_and_stale_incomplete_ones(ckpt):
    ckpt.store.put_bytes(f"{PREFIX}/checkpoint/step-{5:010d}/state.pt", b"stale")
    for step in (10, 20, 30, 40):
        ckpt.save(step, {"step": step})
    assert ckpt.complete_steps() == [30, 40]
    keys = ckpt.store.list(f"{PREFIX}/checkpoint/")
    assert keys == [f"{PREFIX}/checkpoint/step-{s:010d}/{name}" for s in (30, 40) for name in ("COMPLETE", "state.pt")]
    assert ckpt.load_latest() == {"step": 40}


def test_load_latest_returns_the_newest_complete(ckpt):
    for step in (7, 300, 45):  # save order is not step order
        ckpt.save(step, {"step": step})
    assert ckpt.load_latest() == {"step": 300}


def test_saving_the_same_step_again_replaces_it(ckpt):
    ckpt.save(10, {"step": 10, "v": 1})
    ckpt.save(10, {"step": 10, "v": 2})
    assert ckpt.complete_steps() == [10]
    assert ckpt.load_latest() == {"step": 10, "v": 2}


def test_unloadable_newest_falls_back_to_older(local_store, capsys):
    ckpt = Checkpointer(local_store, PREFIX)
    ckpt.save(1, {"step": 1})
    ckpt.save(2, {"step": 2})
    local_store.put_bytes(f"{PREFIX}/checkpoint/step-{2:010d}/state.pt", b"not a torch file")
    assert ckpt.load_latest() == {"step": 1}
    assert "cannot load step 2" in capsys.readouterr().err


def test_keep_must_be_positive(local_store):
    with pytest.raises(ValueError, match="keep must be >= 1"):
        Checkpointer(local_store, PREFIX, keep=0)
