"""Every shipped preset's SGD cell keeps its id, and its trace its first 50 losses, bit for bit.

The golden file (tests/golden/sgd-presets.json) was written by tests/sgdtrace.py before the optimizers
other than SGD, the rules, the schedules and the token budgets were added.
"""

from __future__ import annotations

import json

import pytest

from sgdtrace import GOLDEN, TRACE_STEPS, first_cells, trace_cell, trace_losses

PINNED = json.loads(GOLDEN.read_text())
#: Presets whose trace takes a few seconds (the rest train a ResNet, VGG, DRN or LSTM for 50 steps: slow).
QUICK_MODELS = ("digits_cnn", "linear", "mnist1d_cnn", "mnist1d_mlp", "mnist1d_gru")


def test_every_preset_keeps_its_first_cell():
    cells = first_cells()
    assert set(PINNED) <= set(cells)  # presets added since keep no pin; none pinned may disappear
    for preset, pin in PINNED.items():
        assert cells[preset].canonical_json() == pin["cell"], preset
        assert cells[preset].id == pin["cell_id"], preset
        trace = trace_cell(cells[preset])
        assert (trace.id, trace.canonical_json()) == (pin["trace_id"], pin["trace_cell"]), preset


@pytest.mark.parametrize("preset", [
    pytest.param(name, marks=() if json.loads(pin["cell"])["model"] in QUICK_MODELS else pytest.mark.slow)
    for name, pin in sorted(PINNED.items())
])
def test_trace_losses_are_bit_identical(preset, tmp_path, cpu_env):
    trace = trace_cell(first_cells()[preset])
    losses = trace_losses(trace, tmp_path)
    assert len(losses) == TRACE_STEPS
    assert [float.hex(v) for v in losses] == PINNED[preset]["losses"]
