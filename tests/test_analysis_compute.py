"""The pure compute functions of the analysis, on small hand-made inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from critbatch.analysis import compute
from critbatch.analysis.load import dense_grid, running_mean


@pytest.mark.parametrize(
    "speedup, expected",
    [
        # e: 1, .95, .85 (linear), .71, .53, .35 (diminishing; gains 1.67, 1.5, 1.33), then gain 1.05 -> stagnation
        ([1, 1.9, 3.4, 5.67, 8.5, 11.33, 11.9], ["linear"] * 3 + ["diminishing"] * 3 + ["stagnation"]),
        # stagnation never ends even if a later doubling gains again
        ([1, 2, 2.1, 4.2], ["linear", "linear", "stagnation", "stagnation"]),
        # a batch size that never reached the threshold
        ([1, 2, math.nan, 3.0], ["linear", "linear", "not reached", "stagnation"]),
    ],
)
def test_regimes(speedup, expected):
    ms = 16 * 2 ** np.arange(len(speedup), dtype=float)
    s = np.array(speedup, dtype=float)
    assert compute.regimes(ms, s, s * 16 / ms) == expected


def test_regimes_scale_the_gain_to_one_doubling():
    # m 16 -> 64 is two doublings: a gain of 1.2 in total is 1.095 per doubling (< 10 %): stagnation.
    ms = np.array([16.0, 64.0])
    s = np.array([1.0, 1.2])
    assert compute.regimes(ms, s, s * 16 / ms) == ["linear", "stagnation"]


def test_efficiency_estimate():
    ms = np.array([16, 32, 64, 128, 256, 512], float)
    b = 256.0
    e = (ms[0] + b) / (ms + b)  # McCandlish: e(m) = (m0 + B) / (m + B)
    largest, interp = compute.efficiency_estimate(ms, e, 0.5)
    assert largest == 256
    assert 256 < interp < 512
    # the level is never met past m0 -> m0; never met at all -> NaN
    assert compute.efficiency_estimate(ms, e, 0.99)[0] == 16
    assert math.isnan(compute.efficiency_estimate(ms, e * 0.1, 0.5)[0])


def _rows(entries):
    return [{"group": "g", "threshold": "q25", "cell_id": f"{m}-{s}-{t}", "batch_size": m, "seed": s, "trial": t,
             "use": "reached" if math.isfinite(k) else "censored", "k": k,
             "k_bound": math.nan if math.isfinite(k) else 500.0, "wall_s": 1.0, "samples": 2.0}
            for m, s, t, k in entries]


def test_best_trial_takes_fewest_mean_steps_and_keeps_its_seeds():
    rows = _rows([
        (16, 0, "base_lr=0.1", 100.0), (16, 1, "base_lr=0.1", 110.0),
        (16, 0, "base_lr=0.2", 90.0), (16, 1, "base_lr=0.2", math.inf),  # censored seed: mean inf, loses
        (32, 0, "base_lr=0.1", 60.0), (32, 1, "base_lr=0.1", 70.0),
        (32, 0, "base_lr=0.2", 50.0), (32, 1, "base_lr=0.2", 55.0),
    ])
    best = compute.best_trials(rows)
    assert [b.trial for b in best] == ["base_lr=0.1", "base_lr=0.2"]
    assert best[0].k.tolist() == [100.0, 110.0]
    assert best[1].k.tolist() == [50.0, 55.0]
    assert best[0].trials_tried == 2


def test_running_mean_is_centred_and_short_early():
    # window = min(3, a quarter of the rows so far, at least 1): 1 row up to row 7, 2 rows at 8..11, then 3
    loss = np.arange(1.0, 15.0)
    steps = np.arange(1.0, 15.0)
    centres, means = running_mean(loss, 3, steps=steps)
    assert means.tolist() == centres.tolist()  # a linear curve: the mean sits at the window's centre
    assert centres[:7].tolist() == steps[:7].tolist()
    assert centres[7:11].tolist() == [7.5, 8.5, 9.5, 10.5] and centres[11:].tolist() == [11.0, 12.0, 13.0]


def test_running_mean_and_divergence():
    loss = np.array([4.0, 2.0, 6.0, 1.0, 1.0, 1.0, 1.0, math.nan, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    _, rm = running_mean(loss, 2)
    assert rm[:7].tolist() == [4.0, 2.0, 6.0, 1.0, 1.0, 1.0, 1.0]
    assert np.isinf(rm[7:9]).all()  # windows holding the NaN (2 rows from row 8 on)
    assert rm[9] == 1.0


def test_dense_grid_is_log_spaced_and_keeps_ends():
    steps = np.arange(1, 100001)
    idx = dense_grid(steps)
    g = steps[idx].astype(float)
    assert g[0] == 1 and g[-1] == 100000
    assert np.all(np.diff(g) > 0)
    late = g[g > 200]
    assert np.all((late[1:] / late[:-1] <= 1.005) | (np.diff(late) == 1))  # 0.5 % or one step
    assert len(idx) < 2600
