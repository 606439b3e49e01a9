"""Audit: does the answer rest on the whole sweep? What sweep.yaml lists, against what the store holds.

A cell deleted from the store, a cell still running, a step log shorter than
its ``_SUCCESS`` says, a part skipped as damaged: each moves the threshold and
the fitted critical batch size, and none of them stops the analysis. This
step names every one, for the first section of the report (beside the
answer) and for ``critbatch analyze --strict``, which exits with
ExitCode.INCOMPLETE (3) when anything is missing, after writing the report.

What counts as missing (:attr:`Audit.complete` is False):

    absent       listed in sweep.yaml, not in the store (or without a readable cell.json)
    unfinished   no readable ``_SUCCESS`` (still running, stopped, or its marker unreadable)
    short        fewer distinct step rows than ``_SUCCESS``'s steps (or eval rows than its manifest's)
    exceeds      more than that (written after ``_SUCCESS``: a second trainer)
    damaged      a part skipped as corrupt or truncated, or a gap in a cell's part numbers

Cells in the store that sweep.yaml does not list are named too (``unlisted``),
but do not make the sweep incomplete. A sweep without a sweep.yaml listing its
cells (an imported or synthetic one) cannot be checked for absent cells, and
says so.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import yaml

from .load import INCOMPLETE, Loaded

#: Kinds of finding that make a sweep incomplete, in the order the report lists them.
MISSING = ("absent", "unfinished", "short", "exceeds", "damaged")


@dataclass(frozen=True)
class Finding:
    kind: str  # one of MISSING, or "unlisted"
    cell: str  # <sweep>/<cell-id>
    detail: str

    def line(self) -> str:
        return f"{self.kind}: {self.cell}: {self.detail}"


@dataclass
class Audit:
    listed: int  # cells sweep.yaml lists (over the sweeps that have one)
    used: int  # of them, finished and whole
    found: int  # cells loaded, listed or not
    findings: list[Finding] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # sweeps without a listing

    @property
    def missing(self) -> list[Finding]:
        return [f for f in self.findings if f.kind in MISSING]

    @property
    def complete(self) -> bool:
        return not self.missing

    def headline(self) -> str:
        """One line: whether the answer rests on a complete sweep."""
        unchecked = (f"; no sweep.yaml lists the cells of {', '.join(self.unchecked)}" if self.unchecked else "")
        if not self.listed:
            return f"Not checked:{unchecked[1:]}; the answer rests on the {self.found} cells found."
        if self.complete:
            return f"Complete: the answer rests on all {self.listed} cells sweep.yaml lists{unchecked}."
        counts = Counter(f.kind for f in self.missing)
        what = ", ".join(f"{counts[k]} {k}" for k in MISSING if counts[k])
        return (f"INCOMPLETE: the answer rests on {self.used} of the {self.listed} cells sweep.yaml lists "
                f"({what}); it may move once they are there{unchecked}.")


def _listed(text: str | None) -> list[str] | None:
    """The cell ids a sweep.yaml lists, None when it lists none (or is not a grid's sweep.yaml)."""
    if not text:
        return None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    cells = doc.get("cells") if isinstance(doc, dict) else None
    if not isinstance(cells, list):
        return None
    return [str(c["id"]) for c in cells if isinstance(c, dict) and "id" in c]


def audit(loaded: Loaded) -> Audit:
    """Every way the loaded cells fall short of the sweeps' listings (pure: the loaded summaries in, findings out)."""
    findings: list[Finding] = []
    listed: dict[str, set[str]] = {}
    unchecked = []
    for sweep in loaded.sweeps:
        ids = _listed(loaded.sweep_yaml.get(sweep))
        if ids is None:
            unchecked.append(sweep)
        else:
            listed[sweep] = set(ids)
    loaded_ids = {(c.sweep, c.id) for c in loaded.cells}
    bad: set[tuple[str, str]] = set()

    skipped_by_cell: dict[tuple[str, str], list[str]] = {}
    for item in loaded.skipped:
        parts = item.key.split("/")
        if len(parts) >= 3 and parts[1] == "cells":
            skipped_by_cell.setdefault((parts[0], parts[2]), []).append(f"{'/'.join(parts[3:]) or 'cell'} "
                                                                          f"{item.reason}")
    for sweep, ids in sorted(listed.items()):
        for cell_id in sorted(ids - {i for s, i in loaded_ids if s == sweep}):
            why = "; ".join(skipped_by_cell.get((sweep, cell_id), [])) or "no cell folder in the store"
            findings.append(Finding("absent", f"{sweep}/{cell_id}", why))
            bad.add((sweep, cell_id))

    for c in loaded.cells:
        name = f"{c.sweep}/{c.id}"
        if c.sweep in listed and c.id not in listed[c.sweep]:
            findings.append(Finding("unlisted", name, "in the store, not in sweep.yaml (used in the analysis)"))
        if c.status == INCOMPLETE:
            findings.append(Finding("unfinished", name, f"no readable _SUCCESS; {c.step_rows} steps logged"))
            bad.add((c.sweep, c.id))
        else:
            expected = int(c.success.get("steps", 0))
            for kind, rows, want in _row_checks(c, expected):
                if rows != want:
                    findings.append(Finding("short" if rows < want else "exceeds", name,
                                            f"{rows} {kind} rows, _SUCCESS says {want}"))
                    bad.add((c.sweep, c.id))
        for reason in skipped_by_cell.get((c.sweep, c.id), []):
            if not reason.startswith("_SUCCESS"):
                findings.append(Finding("damaged", name, reason))
                bad.add((c.sweep, c.id))
    used = sum(1 for s, ids in listed.items() for i in ids if (s, i) in loaded_ids and (s, i) not in bad)
    order = {k: n for n, k in enumerate(MISSING + ("unlisted",))}
    findings.sort(key=lambda f: (order[f.kind], f.cell))
    return Audit(sum(len(ids) for ids in listed.values()), used, len(loaded.cells), findings, unchecked)


def _row_checks(c, expected_steps: int) -> list[tuple[str, int, int]]:
    """(kind, rows logged, rows _SUCCESS accounts for): distinct steps (not for a cell imported from another
    study, which has evaluations only), and eval rows when ``_SUCCESS`` has a manifest."""
    checks = [] if c.derived.get("imported_from") else [("step", c.step_rows, expected_steps)]
    manifest = (c.success or {}).get("logs")
    if isinstance(manifest, dict) and isinstance((manifest.get("evals") or {}).get("rows"), int):
        checks.append(("eval", c.eval_rows, manifest["evals"]["rows"]))
    return checks
