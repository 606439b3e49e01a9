"""The options of ``critbatch analyze``, defined once.

The command line, a grid's ``analysis.args`` (validated when the grid is
loaded, before anything is rendered) and the demo all read them through this
parser, so a grid cannot name an option the analysis Job would reject.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from .errors import ConfigError, ExitCode

#: The seed-to-seed scatter of log k measured on real training (benchmarks/bench_seed_noise.py,
#: docs/seed-noise.md), assumed by a one-seed fit: analysis.fit.SEED_SCATTER_FLOOR is this number.
SEED_NOISE = 0.1
#: Merrill et al.'s tolerance for the critical batch size of branch cells (docs/branches.md):
#: analysis.branches.DEFAULT_TOLERANCE is this number.
TOLERANCE = 0.01


def add_analyze_options(p: argparse.ArgumentParser) -> None:
    """The analysis options (not ``--store``/``--sweep``/``--output``, which say where, not how)."""
    p.add_argument("--threshold", type=float, action="append", default=None,
                   help="explicit loss threshold eps (repeatable); default: the paper's lower quartile")
    p.add_argument("--efficiency", type=float, default=0.5, help="efficiency level that defines the critical batch size")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over seeds")
    p.add_argument("--seed-noise", type=float, default=SEED_NOISE,
                   help="with one seed per batch size, the seed-to-seed scatter of log k the interval assumes "
                   f"(its own scatter cannot be measured); default {SEED_NOISE:g}, measured on real training "
                   "(docs/seed-noise.md); 0: the scatter about the fit alone, which one seed makes over-confident")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="branch cells: Merrill et al.'s tolerance CBS(t) is the largest batch whose loss after the "
                   "branch length is within this relative difference of the best smaller one's (docs/branches.md); "
                   f"default {TOLERANCE:g}")
    p.add_argument("--window", type=int, default=50, help="running-mean window (steps) when no full-set evaluation exists")
    p.add_argument("--strict", action="store_true",
                   help=f"exit {ExitCode.INCOMPLETE} (after writing the report) when the sweep is incomplete: a cell sweep.yaml lists is "
                   "absent or unfinished, its step rows fall short of or exceed _SUCCESS, or a part was skipped as "
                   "damaged; the analysis Job always passes it")


class _Raising(argparse.ArgumentParser):
    def error(self, message: str):  # argparse API: raise instead of exiting
        raise ConfigError(f"analysis.args: {message}")


def parse_analyze_args(argv: Sequence[str]) -> argparse.Namespace:
    """``analysis.args`` as ``critbatch analyze`` reads them; ConfigError naming the problem otherwise."""
    p = _Raising(prog="critbatch analyze", add_help=False)
    add_analyze_options(p)
    return p.parse_args([str(a) for a in argv])
