"""The search's decisions without training: the ladder, the next batch sizes on synthetic k(m), the LR race."""

from __future__ import annotations

import math

import numpy as np
import pytest

from critbatch.jobs.search import decide, race
from critbatch.jobs.search.race import TrialView

B_TRUE, S_TRUE = 64.0, 100.0
GRID = [2 ** i for i in range(1, 13)]  # 2 .. 4096
SEEDS = (0, 1, 2)
#: Budget steps of every cell: generous, so nothing is censored unless a test says so.
BUDGET = 100_000


def measured(m: int, seed: int, noise: float = 0.1) -> float:
    """k(m) = S (1 + B/m), times a fixed lognormal factor per (m, seed): the 'training' of these tests."""
    rng = np.random.default_rng(1000 * seed + m)
    return S_TRUE * (1 + B_TRUE / m) * math.exp(noise * rng.standard_normal())


@pytest.mark.parametrize("batch_sizes, factor, expected", [
    (GRID, 4, [2, 8, 32, 128, 512, 2048]),        # every 4x; the largest left to the rule
    ([8, 16, 32, 64, 128, 256, 512], 4, [8, 32, 128]),
    ([2, 4, 8, 16, 32], 4, [2, 8, 32]),           # three points: the largest stays
    ([8, 16], 4, [8, 16]),
    ([10, 30, 100, 300, 1000], 3, [10, 30, 100, 300]),
])
def test_ladder(batch_sizes, factor, expected):
    assert decide.ladder(batch_sizes, factor) == expected


def test_next_batch_sizes_lie_around_the_knee():
    obs = [decide.Observation(m, measured(m, 0)) for m in (2, 8, 32, 128, 512, 2048)]
    before = decide.interval(decide.fit(obs))
    assert before.contains(B_TRUE)
    run = {o.batch_size for o in obs}
    candidates = ([decide.Candidate(m, 0, BUDGET) for m in GRID if m not in run]
                  + [decide.Candidate(m, 1, BUDGET, "seed") for m in sorted(run)])
    chosen = decide.choose(obs, candidates, count=3, confirm=0.25, budget=math.inf)
    assert len(chosen) == 3
    for c in chosen:
        assert B_TRUE / 8 <= c.candidate.batch_size <= 4 * B_TRUE, c.why()
        assert c.cost == pytest.approx(math.ceil(1.25 * c.predicted_k) * c.candidate.batch_size)
    # each pick narrows the (predicted) interval, and the first starts from the measured one
    assert chosen[0].before == before
    widths = [before.rel_width] + [c.after.rel_width for c in chosen]
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0]


def test_the_search_stops_once_the_interval_meets_its_target():
    """The loop of jobs/search/loop.py in miniature: the ladder, then waves of two, until (hi - lo) / B <= 0.3."""
    target = 0.3
    done = {(m, 0) for m in decide.ladder(GRID, 4)}
    obs = [decide.Observation(m, measured(m, s)) for m, s in done]
    waves = 0
    while decide.interval(decide.fit(obs)).rel_width > target:
        iv = decide.interval(decide.fit(obs))
        ms = {m for m, _ in done}
        candidates = [decide.Candidate(m, 0, BUDGET) for m in GRID if m not in ms]
        candidates += [decide.Candidate(m, next(s for s in SEEDS if (m, s) not in done), BUDGET, "seed")
                       for m in sorted(ms) if any((m, s) not in done for s in SEEDS)]
        chosen = decide.choose(obs, candidates, count=2, confirm=0.25, budget=math.inf)
        assert chosen, "the target is reachable on this grid"
        for c in chosen:
            assert iv.lo / decide.KNEE <= c.candidate.batch_size <= iv.hi * decide.KNEE
            done.add((c.candidate.batch_size, c.candidate.seed))
            obs.append(decide.Observation(c.candidate.batch_size, measured(c.candidate.batch_size, c.candidate.seed)))
        waves += 1
    final = decide.interval(decide.fit(obs))
    assert final.rel_width <= target and final.contains(B_TRUE)
    assert 1 <= waves <= 6 and len(done) < len(GRID) * len(SEEDS) / 2


def test_a_batch_size_that_would_run_out_of_budget_is_not_worth_its_samples():
    obs = [decide.Observation(m, measured(m, 0, noise=0.05)) for m in (2, 8, 32, 128)]
    f = decide.fit(obs)
    # k(4096) ~ S_min ~ 100: with a budget of 10 steps it would end censored, costing its whole budget for a
    # bound far below anything the interval allows
    seen, cost = decide.predict(f, decide.Candidate(4096, 0, 10), confirm=0.25)
    assert math.isinf(seen.k) and seen.bound == 10 and cost == 10 * 4096
    assert decide.choose(obs, [decide.Candidate(4096, 0, 10)], count=1, confirm=0.25, budget=math.inf) == []
    # and nothing is chosen past the budget left
    assert decide.choose(obs, [decide.Candidate(64, 0, BUDGET)], count=1, confirm=0.25, budget=100.0) == []


def test_with_one_seed_the_search_judges_the_interval_the_report_prints():
    # k(m) within 1 % of the hyperbola, one seed per batch size: the scatter about the fit alone is under 0.01
    # and its interval a few percent wide, where the report assumes the measured seed scatter (0.1) instead.
    obs = [decide.Observation(m, measured(m, 0, noise=0.01)) for m in (2, 8, 32, 128, 512, 2048)]
    run = {o.batch_size for o in obs}
    candidates = ([decide.Candidate(m, 0, BUDGET) for m in GRID if m not in run]
                  + [decide.Candidate(m, 1, BUDGET, "seed") for m in sorted(run)])
    bare = decide.interval(decide.fit(obs, seed_noise=0.0))
    report = decide.interval(decide.fit(obs))
    assert bare.rel_width < 0.1 and report.rel_width > 0.4 and report.contains(B_TRUE)
    # judged on the collapsed interval, nothing is worth running; on the report's, a second seed at the knee is
    assert decide.choose(obs, candidates, count=1, confirm=0.25, budget=math.inf, seed_noise=0.0) == []
    (chosen,) = decide.choose(obs, candidates, count=1, confirm=0.25, budget=math.inf)
    assert chosen.candidate.kind == "seed" and B_TRUE / 8 <= chosen.candidate.batch_size <= 4 * B_TRUE


def test_no_choice_without_a_fit():
    obs = [decide.Observation(8, 500.0), decide.Observation(32, 200.0)]
    assert decide.choose(obs, [decide.Candidate(16, 0, BUDGET)], count=1, confirm=0.25, budget=math.inf) == []


# ---- the learning-rate race --------------------------------------------------------------------------------


@pytest.mark.parametrize("total, eta, expected", [(1920, 3, [72, 214, 640, 1920]), (30, 3, [10, 30]),
                                                   (12, 3, [12]), (1000, 2, [125, 250, 500, 1000])])
def test_rungs(total, eta, expected):
    assert race.rungs(total, eta) == expected


def view(cid, status="incomplete", k=math.nan, last=100, loss=1.0):
    return TrialView(cid, status, k, last, loss)


@pytest.mark.parametrize("views, last_rung, go_on, out, winner, done", [
    # nobody crossed: the best third by loss goes on (halving)
    ([view("a", loss=0.5), view("b", loss=0.9), view("c", loss=0.7), view("d", loss=2.0), view("e", "diverged")],
     False, ["a", "c"], {"b", "d", "e"}, None, False),
    # one crossed and was confirmed: it wins; whoever has not crossed by then can only be slower
    ([view("a", "reached", k=40.0, last=50), view("b", k=60.0), view("c")], False, [], {"b", "c"}, "a", True),
    # the leader crossed but is not confirmed yet: it runs on alone
    ([view("a", k=80.0), view("b", k=95.0), view("c")], False, ["a"], {"b", "c"}, None, False),
    # the budget ran out for all: censored, the lowest final loss recorded as the winner
    ([view("a", "done", loss=0.4), view("b", "done", loss=0.3)], True, [], set(), "b", True),
    # last rung, nobody crossed yet: the ones alive run to their end
    ([view("a", loss=0.5), view("b", loss=0.9)], True, ["a", "b"], set(), None, False),
])
def test_race_verdicts(views, last_rung, go_on, out, winner, done):
    v = race.judge(views, 3, last_rung=last_rung)
    assert (v.go_on, set(v.out), v.winner, v.done) == (go_on, out, winner, done)
    assert all(isinstance(why, str) and why for why in v.out.values())
