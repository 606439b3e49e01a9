"""The ``search:`` block of a grid spec: how ``critbatch search`` looks for the critical batch size.

    search: {budget: 0.25, target: 1.0, ladder: 4}

A grid's cells are every batch size it could run; the search runs only the
ones that move the answer (critbatch.jobs.search). Validated with the grid,
before anything runs; its JSON Schema is part of the grid's.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from ..cell.validation import PositiveFloat, PositiveInt, Range, Strict


class SearchSpec(Strict):
    """What a search may spend, when it is done, and where it starts."""

    budget: Annotated[float, Range(0, 1, low_open=True)] = Field(
        0.25, description="the samples the search may spend, as a fraction of what the full grid would")
    target: PositiveFloat = Field(
        1.0, description="stop once B_crit's 95 % interval is this narrow relative to B_crit: (hi - lo) / B_crit")
    ladder: Annotated[float, Range(1, low_open=True)] = Field(
        4.0, description="the first batch sizes: the grid's, every `ladder` x from the smallest")
    threshold: PositiveFloat | None = Field(
        None, description="an explicit loss threshold eps; default: the grid's analysis.args --threshold, else "
        "the paper's lower quartile of the largest batch size's run (those cells run first)")
    confirm: Annotated[float, Range(0, 4, low_open=True)] = Field(
        0.25, description="the stop rule's confirmation window, as a fraction of the steps to the crossing")
    confirm_evals: Annotated[int, Range(1, 20)] = Field(3, description="evaluations inside that window")
    halving: Annotated[int, Range(2, 10)] = Field(
        3, description="successive halving of learning-rate trials: 1 in `halving` goes on at each rung")
    wave: PositiveInt | None = Field(
        None, description="cells added per round after the first (default: --parallel here, the grid's "
        "max_active or 4 on a cluster)")
