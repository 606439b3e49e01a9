"""LR strategies, step budgets and the shared evaluation grid (design section 4)."""

from __future__ import annotations

import pytest

from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.train.strategies import (
    base_total_steps,
    eval_steps,
    lr_at,
    oracle_lr,
    peak_lr,
    total_steps,
    warmup_steps,
)

SPE = 10  # steps per epoch used throughout


def make_cell(**kw) -> Cell:
    base = {
        "dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "blr", "batch_size": 256,
        "base_lr": 0.1, "base_batch": 64, "epochs": 10, "warmup_epochs": 2,
    }
    base.update(kw)
    return Cell.from_dict(base)


@pytest.mark.parametrize(
    "strategy, step, expected",
    [
        ("blr", 0, 0.1),
        ("blr", 99, 0.1),
        ("lsr", 0, 0.1),  # warm-up starts at eta_0
        ("lsr", 10, 0.1 + 0.3 * 10 / 20),  # halfway through the 2-epoch (20-step) warm-up
        ("lsr", 20, 0.4),  # eta_0 * 256 / 64 once warmed up
        ("lsr", 99, 0.4),
        ("srsr", 0, 0.2),  # eta_0 * sqrt(4), no warm-up
        ("srsr", 99, 0.2),
        ("longer", 0, 0.1),
        ("longer", 399, 0.1),
    ],
)
def test_lr_per_strategy(strategy, step, expected):
    assert lr_at(make_cell(strategy=strategy), step, SPE, {}) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "strategy, batch, epochs, max_steps, expected",
    [
        ("blr", 256, 10, None, 100),
        ("lsr", 256, 10, None, 100),
        ("longer", 256, 10, None, 400),  # 10 epochs * 256 / 64
        ("longer", 64, 10, None, 100),
        ("blr", 256, 10, 37, 37),
        ("blr", 256, 0.01, None, 1),  # at least one step
    ],
)
def test_total_steps(strategy, batch, epochs, max_steps, expected):
    cell = make_cell(strategy=strategy, batch_size=batch, epochs=epochs, max_steps=max_steps)
    assert total_steps(cell, SPE) == expected


def test_warmup_only_for_lsr():
    assert warmup_steps(make_cell(strategy="lsr"), SPE) == 20
    for strategy in ("blr", "srsr", "longer"):
        assert warmup_steps(make_cell(strategy=strategy), SPE) == 0


def test_step_decay_after_half_and_three_quarters():
    cell = make_cell(strategy="lsr", decay="step")  # 100 steps, peak 0.4 after 20 warm-up steps
    assert lr_at(cell, 49, SPE) == pytest.approx(0.4)
    assert lr_at(cell, 50, SPE) == pytest.approx(0.04)
    assert lr_at(cell, 74, SPE) == pytest.approx(0.04)
    assert lr_at(cell, 75, SPE) == pytest.approx(0.004)
    assert lr_at(cell, 10, SPE) == pytest.approx(0.25)  # warm-up unaffected


def test_cosine_decay_from_end_of_warmup():
    cell = make_cell(strategy="lsr", decay="cosine")
    assert lr_at(cell, 20, SPE) == pytest.approx(0.4)
    assert lr_at(cell, 60, SPE) == pytest.approx(0.2)  # halfway through the 80 post-warm-up steps
    assert lr_at(cell, 100, SPE) == pytest.approx(0.0, abs=1e-15)
    blr = make_cell(strategy="blr", decay="cosine")  # no warm-up: cosine over all 100 steps
    assert lr_at(blr, 50, SPE) == pytest.approx(0.05)


def test_oracle_is_ma_et_al_step():
    derived = {"beta": 1200.0, "lambda_1": 35.0}
    for m in (1, 8, 32, 128):
        cell = Cell.from_dict({
            "dataset": {"name": "linreg"}, "model": "linear", "strategy": "oracle", "batch_size": m,
            "base_lr": 1.0, "base_batch": 1, "epochs": 1,
        })
        expected = m / (1200.0 + (m - 1) * 35.0)
        assert lr_at(cell, 0, SPE, derived) == pytest.approx(expected, rel=1e-12)
        assert lr_at(cell, 7, SPE, derived) == pytest.approx(expected, rel=1e-12)
    assert oracle_lr(1, 1200.0, 35.0) == pytest.approx(1 / 1200.0)
    # Past m* = beta / lambda_1 + 1 the step saturates at 1 / lambda_1.
    assert oracle_lr(10**7, 1200.0, 35.0) == pytest.approx(1 / 35.0, rel=1e-4)


def test_oracle_without_derived_figures_fails():
    cell = Cell.from_dict({
        "dataset": {"name": "linreg"}, "model": "linear", "strategy": "oracle", "batch_size": 8,
        "base_lr": 1.0, "base_batch": 1, "epochs": 1,
    })
    with pytest.raises(ValueError, match="beta and lambda_1"):
        peak_lr(cell, {})


def test_eval_grid_is_log_spaced_with_ends():
    cell = make_cell(batch_size=64, eval={"points": 20})
    steps = eval_steps(cell, 1000, 1000)
    assert steps[0] == 0 and steps[1] == 1 and steps[-1] == 1000
    assert steps == sorted(set(steps))
    assert 15 <= len(steps) <= 21  # about `points`, fewer where rounding merges the first few
    # Log-spaced: the ratio of consecutive grid points past the merged region is about 1000^(1/19).
    ratios = [b / a for a, b in zip(steps[-6:-1], steps[-5:])]
    assert all(abs(r - 1000 ** (1 / 19)) < 0.05 for r in ratios)


def test_eval_grid_shared_across_batch_sizes():
    """Every batch size evaluates on the same iterations (up to its own total), plus its final step."""
    n_train = 1437
    cells = {m: make_cell(batch_size=m, epochs=20, eval={"points": 30}) for m in (16, 64, 256, 1024)}
    base = base_total_steps(cells[64], n_train // 64)
    grids = {}
    for m, cell in cells.items():
        total = total_steps(cell, n_train // m)
        grids[m] = (total, eval_steps(cell, total, base))
    reference = set(grids[16][1]) - {grids[16][0]}  # the smallest batch runs longest
    for m, (total, steps) in grids.items():
        assert steps[-1] == total
        assert set(steps) == {s for s in reference if s <= total} | {total}, m
    # Past the base budget the same ratio carries on (batch 16 trains 4x longer than batch 64).
    assert grids[16][1][-2] > base


def test_eval_grid_base_of_one_step():
    cell = make_cell(eval={"points": 5})
    assert eval_steps(cell, 1, 1) == [0, 1]
    assert eval_steps(cell, 3, 1)[-1] == 3
