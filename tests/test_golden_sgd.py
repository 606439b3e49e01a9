"""Every shipped preset's SGD cell keeps its id, and its trace its first 50 losses, bit for bit.

The golden file (tests/golden/sgd-presets.json) was written by tests/sgdtrace.py before the optimizers
other than SGD, the rules, the schedules and the token budgets were added. Its losses are pinned per machine
(sgdtrace.machine()); on a machine it does not know, the steps whose losses agree across the pinned machines
(those that do not yet depend on round-off) are checked to 1e-3, and a warning says how to pin the machine.
"""

from __future__ import annotations

import json
import warnings

import pytest

from sgdtrace import GOLDEN, HEAVY_MODELS, TRACE_STEPS, first_cells, machine, trace_cell, trace_losses

PINNED = json.loads(GOLDEN.read_text())
#: Presets whose trace takes a few seconds (the rest train a CNN, an MLP, a ResNet, VGG, DRN or LSTM for 50 steps:
#: over 10 s each, slow).
QUICK_MODELS = ("linear",)
#: Two pinned machines agree to this relative difference on a step: its loss does not depend on round-off yet.
AGREE = 1e-5
#: How far a machine the file does not know may be from the pins on those steps.
ACROSS_MACHINES = 1e-3


def test_every_preset_keeps_its_first_cell():
    cells = first_cells()
    assert set(PINNED) <= set(cells)  # presets added since keep no pin; none pinned may disappear
    for preset, pin in PINNED.items():
        assert cells[preset].canonical_json() == pin["cell"], preset
        assert cells[preset].id == pin["cell_id"], preset
        trace = trace_cell(cells[preset])
        assert (trace.id, trace.canonical_json()) == (pin["trace_id"], pin["trace_cell"]), preset


def _traces() -> list:
    """One parameter per distinct trace cell (two presets may share one: their first cells train alike)."""
    first: dict[str, str] = {}
    for name, pin in sorted(PINNED.items()):
        first.setdefault(pin["trace_id"], name)
    out = []
    for trace_id, name in sorted(first.items(), key=lambda kv: kv[1]):
        model = json.loads(PINNED[name]["cell"])["model"]
        also = [n for n, p in sorted(PINNED.items()) if p["trace_id"] == trace_id and n != name]
        out.append(pytest.param(name, id=name + "".join(f"+{n}" for n in also),
                                marks=() if model in QUICK_MODELS else pytest.mark.slow))
    return out


def test_presets_sharing_a_trace_pin_the_same_losses():
    for trace_id in {p["trace_id"] for p in PINNED.values()}:
        sharing = [p["losses"] for p in PINNED.values() if p["trace_id"] == trace_id]
        assert all(losses == sharing[0] for losses in sharing), trace_id


def _values(hexes: list[str]) -> list[float]:
    return [float.fromhex(h) for h in hexes]


def machine_independent_steps(by_machine: dict[str, list[str]], steps: int) -> int:
    """How many leading steps every pinned machine's losses agree on to AGREE (relative)."""
    traces = [_values(losses[:steps]) for losses in by_machine.values()]
    n = 0
    while n < steps and all(abs(t[n] - traces[0][n]) <= AGREE * abs(traces[0][n]) for t in traces):
        n += 1
    return n


def test_the_pinned_machines_agree_before_round_off_grows():
    """The steps checked on an unknown machine: every trace's first loss (before any update) is the same on the
    pinned machines, and the traces that train gently (MNIST-1D, digits, linreg, the LSTM) agree to 1e-5 for
    all 50 steps; the ResNet-34 traces at batch 8 part within two steps (their losses reach 20-50)."""
    agreed = {name: machine_independent_steps(pin["losses"], HEAVY_MODELS.get(json.loads(pin["trace_cell"])["model"],
                                                                                 TRACE_STEPS))
              for name, pin in PINNED.items()}
    assert len(next(iter(PINNED.values()))["losses"]) >= 2, "two machines pinned"
    assert min(agreed.values()) >= 1, agreed
    gentle = ("digits", "fig2-table2-mnist1d-cnn", "fig3-models-mnist1d", "linreg", "table1-wikitext2-lstm")
    assert all(agreed[name] == TRACE_STEPS for name in gentle), agreed


@pytest.mark.parametrize("preset", _traces())
def test_trace_losses_are_bit_identical(preset, tmp_path, cpu_env):
    check_trace(preset, tmp_path, machine())


def test_a_machine_the_file_does_not_know_is_checked_to_a_tolerance_and_told_how_to_pin(tmp_path, cpu_env):
    with pytest.warns(UserWarning, match=r"linreg: no losses pinned for this machine \(a new CPU\); its first 50 of "
                                         r"50 were checked to 0.001\. Pin it: python tests/sgdtrace.py --machine"):
        check_trace("linreg", tmp_path, "a new CPU")
    pinned = PINNED["linreg"]["losses"]
    damaged = {name: [float.hex(float.fromhex(h) * (1 + 2 * ACROSS_MACHINES)) if i == 7 else h
                      for i, h in enumerate(losses)] for name, losses in pinned.items()}
    with pytest.raises(AssertionError, match=r"\(7, "):
        check_trace("linreg", tmp_path / "again", "a new CPU", damaged)


def check_trace(preset, work, here, pins=None):
    trace = trace_cell(first_cells()[preset])
    steps = HEAVY_MODELS.get(trace.model, TRACE_STEPS)
    losses = trace_losses(trace, work, steps)
    assert len(losses) == steps
    pins = pins or PINNED[preset]["losses"]
    if here in pins:
        assert [float.hex(v) for v in losses] == pins[here][:steps]
        return
    agreed = machine_independent_steps(pins, steps)
    for name, pinned in pins.items():
        for step, (got, want) in enumerate(zip(losses[:agreed], _values(pinned))):
            assert abs(got - want) <= ACROSS_MACHINES * abs(want), (step, got, want, name)
    warnings.warn(f"{preset}: no losses pinned for this machine ({here}); its first {agreed} of {steps} were "
                  f"checked to {ACROSS_MACHINES:g}. Pin it: python tests/sgdtrace.py --machine")
