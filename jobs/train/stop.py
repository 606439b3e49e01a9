"""Stop at the threshold: a cell that only has to reach eps ends once its training loss has crossed it for good.

A batch-size search needs k(m; eps), the first step at which a cell's
training loss is at or below eps, not the rest of the epoch budget: a small
batch size crosses long before its budget ends. The cell's ``stop`` field
(critbatch.jobs.cell.spec.StopSpec) asks for it; this component watches the
train-split evaluations and says when to stop.

The confirmation window. The first evaluation at step s whose loss is <= eps
opens a window of w = max(confirm_evals, ceil(confirm * s)) steps, checked by
``confirm_evals`` extra evaluations spread evenly over it (by default 3 over
25 % of the steps so far). The cell stops at the window's end if every one of
them is <= eps too; one above eps voids the window, and the next evaluation at
or below eps opens another. Only the window's own evaluations judge it, so
how densely a cell evaluates otherwise (``expect``) does not make the rule
stricter or looser. Why relative: k spans two or three decades across
a sweep and the fit reads it in log space, so the window should be the same
fraction of every cell's run, and 25 % is the cost a reached cell pays on top
of its k (a small batch's budget is often ten times its k). Why it is enough:
the train-split loss is a full evaluation, so what can lift it back above eps
is the SGD noise in the weights, which is largest just after the crossing and
shrinks as the loss keeps falling; three evaluations over the next quarter of
the run, all at or below eps, rule out a single lucky dip.

k is the first crossing, interpolated between the evaluation before it and the
one at it, linearly in log(loss): the rule the analysis applies to the same
curve (critbatch.jobs.cell.science.crossing, called by both), so ``_SUCCESS``'s
k is the k the report reads. The stop keeps only the evaluation before the
current one, and it counts a loss as at or below eps only when it is finite;
a previous evaluation that is not finite brackets nothing, so k is then the
current step (the analysis, holding the whole curve, looks further back).

With ``expect`` (the step a fit predicts for the crossing) the evaluations
between expect/2 and 2 expect are DENSITY times as frequent as the sweep's
shared grid, so the crossing is located where it happens.
"""

from __future__ import annotations

import math
from typing import Any

from ..cell.science import crossing
from ..cell.spec import StopSpec

#: How much denser than the shared evaluation grid the evaluations around the expected crossing are.
DENSITY = 4


def dense_steps(spec: StopSpec | None, total: int, base_total: int, points: int) -> set[int]:
    """Extra evaluation steps from expect/2 to 2 expect, at the shared grid's ratio to the power 1/DENSITY."""
    if spec is None or spec.expect is None:
        return set()
    ratio = max(2, base_total) ** (1.0 / (DENSITY * (max(2, points) - 1)))
    lo, hi = max(1.0, spec.expect / 2), min(float(total), 2.0 * spec.expect)
    out, x = set(), lo
    while x <= hi:
        out.add(round(x))
        x *= ratio
    return out


class ThresholdStop:
    """Watches the train-split loss at each evaluation; ``observe`` returns True once the crossing is confirmed."""

    def __init__(self, spec: StopSpec):
        self.spec = spec
        self.k: float | None = None  # the first crossing (interpolated), once seen
        self.window: tuple[int, ...] = ()  # the evaluation steps of the open window; () when none is open
        self.confirmed_at: int | None = None
        self.voided = 0  # windows voided by a loss back above eps
        self._last: tuple[int, float] | None = None  # the previous evaluation (step, loss)

    def wants_eval(self, step: int) -> bool:
        """Whether ``step`` is one of the open window's evaluations."""
        return step in self.window

    def observe(self, step: int, loss: float) -> bool:
        """The evaluation at ``step``; True when it closes a window whose evaluations all stayed <= eps."""
        eps = self.spec.threshold
        below = math.isfinite(loss) and loss <= eps
        if below and self.k is None:
            before = [self._last] if self._last is not None and math.isfinite(self._last[1]) else []
            steps, values = zip(*before, (step, loss))
            self.k = crossing(steps, values, eps)
        self._last = (step, loss)
        if self.window:
            if step not in self.window:  # the window is judged by its own evaluations only
                return False
            if not below:
                self.window, self.voided = (), self.voided + 1
            elif step == self.window[-1]:
                self.confirmed_at = step
                return True
            return False
        if below:
            n = self.spec.confirm_evals
            width = max(n, math.ceil(self.spec.confirm * step))
            self.window = tuple(sorted({step + math.ceil(width * (j + 1) / n) for j in range(n)}))
        return False

    def summary(self) -> dict[str, Any] | None:
        """What ``_SUCCESS`` records of a confirmed stop (None when the run did not stop at the threshold)."""
        if self.confirmed_at is None:
            return None
        return {"threshold": self.spec.threshold, "k": self.k, "confirmed_at": self.confirmed_at,
                "confirm": self.spec.confirm, "confirm_evals": self.spec.confirm_evals, "voided": self.voided}

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "window": list(self.window), "voided": self.voided,
                "last": list(self._last) if self._last is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k, self.window, self.voided = state.get("k"), tuple(state.get("window") or ()), state.get("voided", 0)
        last = state.get("last")
        self._last = (int(last[0]), float(last[1])) if last else None
