"""The schedule the critical batch size implies, measured: a batch-size ramp against constant batches.

A ramp cell (``ramp`` in its fields; docs/ramp.md) trains at batch B first and
at larger multiples of it from later epochs on. Beside it a sweep holds the
constant-batch cells of the same problem: the same fields but batch_size (and
the accumulation that follows from it), without ramp. For a target loss eps
this module reads, per ramp cell and seed, the steps k to eps (the shared rule,
critbatch.jobs.cell.science.crossing, through compute.cell_crossing) and the
examples seen there (the ``samples_seen`` of the step log, which a ramp counts
at each epoch's batch) of

    the ramp,   constant B (its first batch),   constant final batch (its last),

and the steps saved against constant B, 100 (1 - k_ramp / k_B) %. Merrill et
al. 2025 (arXiv 2505.23971) report 43 % for a ramp following CBS(t).

The target: each explicit threshold of the analysis (``--threshold``), else the
ramp cell's own ``stop.threshold``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .compute import Group, Table, cell_crossing, flatten
from .load import CellSummary
from .plots import Artifact, markdown_table

#: Flattened fields that may differ between a ramp and its constant-batch cells.
OWN_FIELDS = ("sweep", "batch_size", "accumulation", "micro_batch")

COLUMNS = [("problem", "problem"), ("seed", "seed"), ("ramp", "ramp (batch from epoch)"), ("rule", "rule"),
           ("eps", "eps"), ("k_ramp", "steps, ramp"), ("k_first", "steps, constant B"),
           ("k_final", "steps, constant final"), ("examples_ramp", "examples, ramp"),
           ("examples_first", "examples, constant B"), ("examples_final", "examples, constant final"),
           ("steps_saved_pct", "steps saved vs B (%)"), ("examples_ratio", "examples ramp / B")]


def problem_key(cell: dict[str, Any]) -> str:
    """What a ramp shares with its constant-batch cells: every flattened field but OWN_FIELDS and the ramp."""
    flat = flatten(cell)
    return json.dumps({k: v for k, v in flat.items() if k not in OWN_FIELDS and k.split(".")[0] != "ramp"},
                      sort_keys=True, default=str)


def describe(ramp: dict[str, Any]) -> str:
    """``32@0 64@3 128@8``: each phase's batch at its first epoch."""
    return " ".join(f"{p['batch']}@{p['epoch']}" for p in ramp["phases"])


def ramp_rows(cells: list[CellSummary], thresholds: list[float] = ()) -> Table:
    """One row per ramp cell and target: steps and examples to eps of the ramp and of its two constant batches
    (NaN where a cell never reaches eps or is not in the sweep), the steps saved against constant B in percent and
    the examples' ratio."""
    constant: dict[tuple[str, int, int], CellSummary] = {}
    for c in cells:
        if c.cell.get("ramp") is None:
            constant.setdefault((problem_key(c.cell), c.seed, c.batch_size), c)
    rows: Table = []
    for c in cells:
        ramp = c.cell.get("ramp")
        if ramp is None:
            continue
        key = problem_key(c.cell)
        first = constant.get((key, c.seed, ramp["phases"][0]["batch"]))
        final = constant.get((key, c.seed, ramp["phases"][-1]["batch"]))
        trio = [x for x in (c, first, final) if x is not None]
        # One source for the three: the train-split evaluations where each has them, else the running means.
        source = "train_eval" if all(x.train_eval is not None and len(x.train_eval) >= 2 for x in trio) \
            else "running_mean"
        label = f"{c.cell['dataset']['name']}/{c.cell['model']}/{c.cell['strategy']}"
        group = Group(key, {}, trio, label=label, source=source)
        stop = (c.cell.get("stop") or {}).get("threshold")
        for eps in list(thresholds) or ([stop] if stop is not None else []):
            def at(x: CellSummary | None) -> tuple[float, float]:
                if x is None:
                    return math.nan, math.nan
                row = cell_crossing(group, x, f"eps={eps:g}", float(eps))
                return row["k"], row["samples"]

            (k_r, n_r), (k_b, n_b), (k_f, n_f) = at(c), at(first), at(final)
            rows.append({
                "problem": label, "seed": c.seed, "ramp": describe(ramp), "rule": ramp["rule"], "eps": float(eps),
                "source": source, "ramp_cell": c.id, "first_cell": first.id if first else "",
                "final_cell": final.id if final else "", "k_ramp": k_r, "k_first": k_b, "k_final": k_f,
                "examples_ramp": n_r, "examples_first": n_b, "examples_final": n_f,
                "steps_saved_pct": 100.0 * (1.0 - k_r / k_b) if k_b > 0 else math.nan,
                "examples_ratio": n_r / n_b if n_b > 0 else math.nan,
            })
    return rows


def ramp_table(cells: list[CellSummary], thresholds: list[float] = ()) -> Artifact:
    """The report's table of ramps against constant batches (missing where the sweep has no ramp cell)."""
    rows = ramp_rows(cells, thresholds)
    art = Artifact(
        "ramp_steps", "Batch-size ramp: steps and examples to the target",
        "Each ramp cell against the constant-batch cells of the same problem and seed, at its first batch B and "
        "its final batch: steps k and examples to the target loss eps (the explicit thresholds, else the ramp's "
        "stop threshold; first crossing interpolated in log loss), and the steps the ramp saves against constant "
        "B. NaN: never reached (or no such cell in the sweep).", rows, [k for k, _ in COLUMNS])
    if not any(c.cell.get("ramp") is not None for c in cells):
        art.missing = "no ramp cells in this sweep"
    elif not rows:
        art.missing = "no target loss: give --threshold or the ramp cells a stop threshold"
    else:
        art.markdown = markdown_table(rows, COLUMNS)
    return art
