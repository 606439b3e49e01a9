"""The audit: the report says whether its answer rests on the whole sweep, and `analyze --strict` exits 3 if not."""

from __future__ import annotations

import pyarrow as pa
import pytest
import yaml

from critbatch.analysis.audit import audit
from critbatch.analysis.load import load_sweeps
from critbatch.analysis.synthetic import GroupSpec, remove_success, truncate_part, write_sweep
from critbatch.jobs.cell.layout import cell_prefix
from critbatch.jobs.cell.logschema import ipc_to_table, part_key, table_to_ipc
from critbatch.jobs.cli import main
from critbatch.jobs.store import LocalStore

MS = [16, 32, 64, 128, 256]


@pytest.fixture
def sweep(tmp_path):
    """A synthetic sweep whose sweep.yaml lists its cells, as `critbatch run` and `submit` write it."""
    store = LocalStore(tmp_path / "store")
    truth = write_sweep(store, "au", batch_sizes=MS, seeds=[0], groups=[GroupSpec()], flush_steps=200)
    listing = {"spec": {"sweep": "au"}, "cells": [{"id": c.id} for c in truth.cells]}
    store.put_text("au/sweep.yaml", yaml.safe_dump(listing))
    return store, {c.batch_size: c for c in truth.cells}


def _extra_part(store, prefix: str) -> None:
    """Rows past _SUCCESS's count, in a part after the last (what a second trainer used to leave)."""
    keys = store.list(f"{prefix}/steps/")
    last = ipc_to_table(store.get_bytes(keys[-1]))
    shifted = last.set_column(last.schema.get_field_index("step"), "step",
                              pa.array([s + 10_000 for s in last.column("step").to_pylist()]))
    store.put_bytes(part_key(prefix, "steps", len(keys)), table_to_ipc(shifted))


DAMAGE = {
    "cell folder deleted": (lambda s, p: s.delete_prefix(p + "/"), "absent", "no cell folder in the store"),
    "last step part lost": (lambda s, p: s.delete(s.list(f"{p}/steps/")[-1]), "short", "step rows, _SUCCESS says"),
    "a part cut": (lambda s, p: truncate_part(s, s.list(f"{p}/steps/")[1]), "damaged",
                   "steps/part-000001.arrow corrupt or truncated"),
    "no _SUCCESS": (lambda s, p: remove_success(s, "au", p.rsplit("/", 1)[1]), "unfinished", "no readable _SUCCESS"),
    "rows after _SUCCESS": (_extra_part, "exceeds", "step rows, _SUCCESS says"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_each_way_of_missing_is_named(sweep, damage):
    store, cells = sweep
    hurt, kind, detail = DAMAGE[damage]
    cell = cells[64]
    hurt(store, cell_prefix("au", cell.id))
    checked = audit(load_sweeps(store, ["au"]))
    assert not checked.complete
    assert [(f.kind, f.cell) for f in checked.missing if f.kind == kind] == [(kind, f"au/{cell.id}")]
    assert detail in next(f.detail for f in checked.missing if f.kind == kind)
    assert {f.cell for f in checked.missing} == {f"au/{cell.id}"}  # the other cells are whole
    assert checked.headline().startswith("INCOMPLETE: the answer rests on 4 of the 5 cells sweep.yaml lists")


@pytest.mark.slow
def test_strict_analysis_exits_3_and_the_report_names_what_is_missing_first(sweep, tmp_path, capsys):
    store, cells = sweep
    argv = ["analyze", "--store", str(tmp_path / "store"), "--sweep", "au", "--bootstrap", "0", "--strict"]
    assert main(argv) == 0
    summary = (tmp_path / "store" / "au" / "report" / "summary.md").read_text()
    assert "**Complete: the answer rests on all 5 cells sweep.yaml lists.**" in summary

    gone = cells[256]
    store.delete_prefix(cell_prefix("au", gone.id) + "/")
    capsys.readouterr()
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert f"warning: absent: au/{gone.id}: no cell folder in the store" in err
    assert "--strict: exit 3, the sweep is incomplete" in err
    summary = (tmp_path / "store" / "au" / "report" / "summary.md").read_text()
    section = summary[summary.index("## Completeness"):summary.index("## The answer")]  # before the answer
    assert "**INCOMPLETE: the answer rests on 4 of the 5 cells sweep.yaml lists (1 absent)" in section
    assert f"- absent: au/{gone.id}: no cell folder in the store" in section
    html = (tmp_path / "store" / "au" / "report" / "index.html").read_text()
    assert html.index("INCOMPLETE: the answer rests on 4 of the 5") < html.index('class="answer"')


def test_a_sweep_without_a_listing_says_it_cannot_be_checked(tmp_path):
    store = LocalStore(tmp_path / "store")
    write_sweep(store, "nolist", batch_sizes=MS[:3], seeds=[0], groups=[GroupSpec()])
    checked = audit(load_sweeps(store, ["nolist"]))
    assert checked.complete
    assert checked.headline() == ("Not checked: no sweep.yaml lists the cells of nolist; the answer rests on "
                                  "the 3 cells found.")
