"""The report of a searched sweep: what ``critbatch search`` ran and skipped, and what it spent.

A sweep that ``critbatch search`` ran holds ``<sweep>/search.json``
(critbatch.jobs.search.state): the cells it ran and why, the learning-rate
races, each decision with B_crit's interval before and after, and the samples
spent against what the full grid would have cost. The report keeps its usual
headline (the same fit over the cells the store holds) and adds this section;
an explicit threshold the search used is the report's headline threshold
unless ``--threshold`` says otherwise.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from critbatch.jobs.store import Store


def read_search(store: Store, sweep: str) -> dict[str, Any] | None:
    """``<sweep>/search.json``, or None for a sweep no search ran (or an unreadable file, which is then ignored)."""
    try:
        doc = json.loads(store.get_text(f"{sweep}/search.json"))
    except (KeyError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "cells" in doc else None


def explicit_eps(doc: dict[str, Any]) -> float | None:
    """The search's eps when it was given (search.threshold or analysis.args), None when it was the default rule."""
    eps = (doc.get("threshold") or {}).get("eps")
    return float(eps) if isinstance(eps, (int, float)) else None


def section(sweep: str, doc: dict[str, Any], grid_cells: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The search's part of the report, as plain values: the template and summary.md both read it.

    ``grid_cells``: the full grid's cells as sweep.yaml lists them ({id, cell}), to name what was skipped.
    """
    full, spent = doc.get("full_grid") or {}, doc.get("spent") or {}
    cells = doc.get("cells") or {}
    roles = Counter(c.get("role", "?") for c in cells.values())
    out_of_race = sum(1 for c in cells.values() if c.get("out"))
    samples_by_role: Counter = Counter()
    for c in cells.values():
        samples_by_role[c.get("role", "?")] += c.get("samples") or 0
    ran = {c.get("grid_cell") for c in cells.values()}
    skipped = Counter()
    for entry in grid_cells or []:
        if entry.get("id") not in ran:
            skipped[int(entry["cell"]["batch_size"])] += 1
    threshold = doc.get("threshold") or {}
    eps_values = sorted({f"{v:.4g}" for v in (threshold.get("by_group") or {}).values()})
    curves = []
    for entry in (doc.get("groups") or {}).values():
        curves.append({"label": entry.get("label", "?"), "state": entry.get("state", "?"), "why": entry.get("why", ""),
                       "interval": _interval(entry.get("interval")), "batch_sizes": entry.get("batch_sizes", []),
                       "observations": entry.get("observations", 0)})
    decisions = [{"wave": d.get("wave"), "curve": d.get("label", "?"), "action": d.get("action", ""),
                  "why": d.get("why", ""), "before": _interval(d.get("interval_before")),
                  "predicted": _interval(d.get("interval_predicted")) if "interval_predicted" in d else "",
                  "after": _interval(d.get("interval_after"))} for d in doc.get("decisions") or []]
    samples, total = spent.get("samples", 0), full.get("samples", 0)
    return {
        "sweep": sweep, "status": doc.get("status", "?"),
        "spent": f"{samples:,} samples ({spent.get('steps', 0):,} steps) in {len(cells)} cells, "
                 f"{samples / total:.1%} of the full grid's {total:,} samples ({full.get('steps', 0):,} steps, "
                 f"{full.get('cells', 0)} cells run to their epoch budget)" if total else f"{samples:,} samples",
        "by_role": ", ".join(f"{role} {n} cells, {samples_by_role[role]:,} samples"
                             for role, n in sorted(roles.items())),
        "threshold": f"eps = {', '.join(eps_values) or '-'}: {threshold.get('source', 'not fixed yet')}",
        "races": f"{len(doc.get('races') or {})} learning-rate races; {out_of_race} trials stopped behind the winner "
                 "(no _SUCCESS: the analysis leaves them out)" if doc.get("races") else "",
        "skipped": ", ".join(f"m={m}: {n}" for m, n in sorted(skipped.items())) or "none",
        "curves": curves, "decisions": decisions,
    }


def markdown(s: dict[str, Any]) -> list[str]:
    """The section as summary.md lines."""
    out = [f"## The search ({s['sweep']}: {s['status']})", "",
           f"- spent: {s['spent']}", f"- by role: {s['by_role']}", f"- threshold: {s['threshold']}",
           f"- full-grid cells not run, by batch size: {s['skipped']}"]
    if s["races"]:
        out.append(f"- {s['races']}")
    out += [""] + [f"- {c['label']}: {c['state']}, B_crit {c['interval']} from batch sizes "
                   f"{', '.join(map(str, c['batch_sizes']))}" + (f" ({c['why']})" if c["why"] else "")
                   for c in s["curves"]]
    out += ["", "| wave | curve | action | interval before | predicted | after | why |",
            "|---|---|---|---|---|---|---|"]
    out += [f"| {d['wave']} | {d['curve']} | {d['action']} | {d['before']} | {d['predicted']} | {d['after']} | "
            f"{d['why'].replace('|', '/')} |" for d in s["decisions"]]
    return out + [""]


def _interval(iv: list | None) -> str:
    if not iv or iv[1] is None:
        return "no fit"
    lo, b, hi = iv
    return f"{_num(b)} [{_num(lo)}, {_num(hi)}]"


def _num(v: Any) -> str:
    if v == "inf":
        return "∞"
    v = float(v)
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
