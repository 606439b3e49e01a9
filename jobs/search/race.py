"""The learning-rate race at one batch size: successive halving on steps to eps.

Where a grid lists several values of a metaparameter (base LRs, momenta), the
analysis takes, per batch size, the trial with the fewest steps to eps
(Shallue et al.'s steps-to-result). Running every trial to its end finds it
at the cost of all of them; the race finds the same winner from a fraction:

- the trials run together, rung by rung: to ``rungs[0]`` steps, then the
  ones still in it to ``rungs[1]``, ... (``critbatch train --pause-at``; the
  last rung is the epoch budget), each a factor ``eta`` (``search.halving``)
  past the one before;
- once some trial has crossed eps, at k, every trial that has not crossed by
  then is out, and so is every one that crossed later: their k can only be
  larger. That cut is exact. The trial with the smallest k goes on alone
  until its crossing is confirmed (the stop rule's window) and wins;
- at a rung where none has crossed yet, the 1/eta of them with the lowest
  training loss at that step go on and the rest are out (successive
  halving): the one heuristic cut, the bet that a trial far behind at a
  rung will not reach eps first.

A trial put out keeps its checkpoint and logs (no ``_SUCCESS``): the analysis
sees it as not finished and leaves it out of steps-to-result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..cell.logschema import STATUS_DIVERGED, STATUS_DONE, STATUS_REACHED

#: At most this many rungs below the budget; none shorter than MIN_RUNG steps.
MAX_RUNGS = 3
MIN_RUNG = 8


@dataclass(frozen=True)
class TrialView:
    """What the store says about one trial at a rung."""

    cell_id: str
    status: str  # done | reached | diverged | incomplete
    k: float  # its first crossing of eps (NaN: none yet)
    last_step: int
    loss: float  # its training loss at the rung's step (the last evaluation at or before it)

    @property
    def finished(self) -> bool:
        return self.status in (STATUS_DONE, STATUS_REACHED, STATUS_DIVERGED)


@dataclass(frozen=True)
class Verdict:
    """The trials that go on (to the next rung, or to their end), those put out and why, and the winner."""

    go_on: list[str]
    out: dict[str, str]
    winner: str | None
    done: bool


def rungs(total: int, eta: int) -> list[int]:
    """Steps at which the race ranks its trials: total / eta^j for j = n..1, the budget ``total`` last."""
    n = 0
    while n < MAX_RUNGS and total / eta ** (n + 1) >= MIN_RUNG:
        n += 1
    return [math.ceil(total / eta ** j) for j in range(n, 0, -1)] + [total]


def judge(views: list[TrialView], eta: int, *, last_rung: bool) -> Verdict:
    """The race after its trials reached the same rung (or finished); see the module docstring."""
    out: dict[str, str] = {}
    alive = []
    for v in views:
        if v.status == STATUS_DIVERGED:
            out[v.cell_id] = f"diverged at step {v.last_step}"
        else:
            alive.append(v)
    crossed = [v for v in alive if math.isfinite(v.k)]
    if crossed:
        best = min(crossed, key=lambda v: (v.k, v.cell_id))
        for v in alive:
            if v is best:
                continue
            out[v.cell_id] = (f"behind: crossed eps at step {v.k:.0f}, after {best.k:.0f}" if math.isfinite(v.k) else
                              f"behind: no crossing by step {v.last_step}, where another crossed at {best.k:.0f}")
        if best.finished:
            return Verdict([], out, best.cell_id, True)
        return Verdict([best.cell_id], out, None, False)  # to confirm its crossing
    if all(v.finished for v in alive):  # the budget ran out for every one: the analysis sees them censored
        winner = min(alive, key=lambda v: (v.loss if math.isfinite(v.loss) else math.inf, v.cell_id), default=None)
        return Verdict([], out, winner.cell_id if winner else None, True)
    if last_rung or len(alive) == 1:
        return Verdict([v.cell_id for v in alive if not v.finished], out, None, False)
    ranked = sorted(alive, key=lambda v: (v.loss if math.isfinite(v.loss) else math.inf, v.cell_id))
    keep = max(1, math.ceil(len(ranked) / eta))
    for v in ranked[keep:]:
        out[v.cell_id] = (f"halved out: loss {v.loss:.4g} at step {v.last_step}, against {ranked[keep - 1].loss:.4g} "
                          f"for the last one kept ({keep} of {len(ranked)} go on)")
    return Verdict([v.cell_id for v in ranked[:keep]], out, None, False)
