"""The one-seed interval against real training: leave-one-seed-out coverage on stored k(m) of eight seeds.

tests/data/seed_noise.json holds every cell's steps to threshold (or its censoring bound) of the laptop problems,
eight seeds each (four for the costlier ones), written by ``benchmarks/bench_seed_noise.py collect``: this test
trains nothing, it fits. The interval the analysis gives (the scatter floored at the measured seed noise) must
hold the all-seed estimate in at least 85 % of the one-seed fits and 90 % of the three-seed fits, pooled over the
problems; the fit without the floor is kept beside it to show why the floor is there.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from critbatch.analysis.fit import MEASURED_REAL_COVERAGE, SEED_SCATTER_FLOOR
from critbatch.analysis.seednoise import Coverage, Observations, coverage, pooled_over, pooled_scatter, report_markdown

DATA = json.loads((Path(__file__).parent / "data" / "seed_noise.json").read_text())
PROBLEMS = {name: p for name, p in DATA["problems"].items() if "@" not in name}
#: About 1,000 fits (every seed and every set of three, per problem and method): a few tens of seconds.
pytestmark = pytest.mark.slow


def _headline(name: str) -> Observations:
    p = PROBLEMS[name]
    return Observations.of(p["k"][p["thresholds"][0]])


@functools.cache
def _coverage(name: str, method: str, seeds: int) -> Coverage:
    return coverage(_headline(name), method, seeds)


def _pooled(method: str, seeds: int) -> tuple[int, int]:
    covered = trials = 0
    for name in PROBLEMS:
        c = _coverage(name, method, seeds)
        covered, trials = covered + c.covered, trials + c.trials
    return covered, trials


def test_the_stored_curves_are_the_ones_the_benchmark_describes():
    eight = ("cnn-blr", "cnn-srsr", "mlp-blr", "mlp-srsr", "digits-blr", "linreg-oracle")
    assert set(eight) <= set(PROBLEMS)
    for name in eight:
        obs = _headline(name)
        assert obs.seeds() == list(range(8)), name
        assert len(np.unique(obs.m)) >= 7, name


def test_the_floor_is_the_seed_noise_measured_on_real_training():
    pooled = {name: pooled_scatter(_headline(name)) for name in PROBLEMS}
    assert 0.03 < min(pooled.values()) and max(pooled.values()) < 0.2, pooled  # MLP 0.043 .. GPT 0.185
    # the floor is the scatter pooled over the problems (0.097), rounded
    assert SEED_SCATTER_FLOOR == pytest.approx(pooled_over([_headline(n) for n in PROBLEMS]), abs=0.006)


def test_one_seed_intervals_with_the_floor_hold_the_eight_seed_answer():
    covered, trials = _pooled("floor", 1)
    assert trials >= 4 * 8 + 4
    assert covered / trials >= 0.85, (covered, trials)


def test_three_seed_intervals_with_the_floor_hold_the_eight_seed_answer():
    covered, trials = _pooled("floor", 3)
    assert covered / trials >= 0.90, (covered, trials)


def test_without_the_floor_one_seed_intervals_are_overconfident():
    before, trials = _pooled("profile", 1)
    after, _ = _pooled("floor", 1)
    assert before / trials < 0.85 <= after / trials, (before, after, trials)


@pytest.mark.parametrize("name", ["cnn-blr", "mlp-blr"])
def test_a_one_seed_interval_is_no_longer_a_few_percent_wide(name):
    c = _coverage(name, "floor", 1)
    assert c.widths and math.isfinite(c.reference)
    assert np.median(c.widths) > 1.3  # hi/lo: one seed cannot pin B_crit to a few percent


def test_the_benchmark_table_is_written_from_the_same_file():
    one = {**PROBLEMS["digits-blr"], "thresholds": PROBLEMS["digits-blr"]["thresholds"][:1]}
    text = report_markdown({"problems": {"digits-blr": one}})
    profile, floor = _coverage("digits-blr", "profile", 1), _coverage("digits-blr", "floor", 1)
    assert f"| digits-blr | {one['thresholds'][0]} (headline) | 8.4 | profile | {profile.covered}/8 |" in text
    assert f"| digits-blr | {one['thresholds'][0]} (headline) | 8.4 | floor | {floor.covered}/8 |" in text
    assert "Pooled over the problems at their headline eps" in text


def test_the_report_quotes_the_coverage_this_file_gives():
    assert MEASURED_REAL_COVERAGE == {1: _pooled("floor", 1), 3: _pooled("floor", 3)}
