"""`critbatch status` calls a cell damaged, not done, when its _SUCCESS is unreadable or its parts are not all there."""

from __future__ import annotations

import json

import yaml

from critbatch.jobs.cell.layout import cell_prefix, success_key
from critbatch.jobs.store import LocalStore
from critbatch.jobs.sweep.grid import load_grid
from critbatch.jobs.cluster.markers import MarkerBook
from critbatch.jobs.cluster.status import cell_states, format_table
from factories import TINY


def test_status_shows_damaged_cells(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(TINY))
    grid = load_grid(str(path))
    whole, cut, unreadable = grid.cells()
    store = LocalStore(tmp_path / "store")
    for cell in (whole, cut):
        store.put_text(f"{cell_prefix('tiny', cell.id)}/cell.json", cell.to_json())
        store.put_bytes(f"{cell_prefix('tiny', cell.id)}/steps/part-000000.arrow", b"x" * 40)
        store.put_text(success_key("tiny", cell.id), json.dumps(
            {"status": "done", "steps": 3, "logs": {"steps": {"rows": 3, "parts": [40]}}}))
    store.put_bytes(f"{cell_prefix('tiny', cut.id)}/steps/part-000000.arrow", b"x" * 17)
    store.put_text(success_key("tiny", unreadable.id), '{"status": ')
    rows = {r["cell"]: r for r in cell_states(grid, MarkerBook(store, "tiny").read(), None)}
    assert rows[whole.id]["state"] == "done"
    assert (rows[cut.id]["state"], rows[cut.id]["why"]) == ("damaged", "steps part 000000 has 17 bytes, not 40")
    assert rows[unreadable.id]["state"] == "damaged" and rows[unreadable.id]["why"].startswith("_SUCCESS is unreadable")
    assert format_table(list(rows.values())).splitlines()[-1].startswith("done 1  diverged 0  damaged 2  ")


def test_status_reads_each_finished_cells_record(tmp_path):
    """A _SUCCESS beside a cell.json that is not the cell's record (garbage, a list, another cell's) is damaged
    for status and submit as for run and analyze; a repaired record makes it done again."""
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(TINY))
    grid = load_grid(str(path))
    cells = grid.cells()
    store = LocalStore(tmp_path / "store")
    records = {cells[0].id: "not json", cells[1].id: "[1, 2, 3]", cells[2].id: cells[0].to_json()}
    for cell in cells:
        store.put_text(f"{cell_prefix('tiny', cell.id)}/cell.json", records[cell.id])
        store.put_text(success_key("tiny", cell.id), json.dumps({"status": "done", "steps": 3, "cell_id": cell.id}))
    book = MarkerBook(store, "tiny")
    rows = {r["cell"]: r for r in cell_states(grid, book.read(), None)}
    for cell in cells:
        assert rows[cell.id]["state"] == "damaged", rows[cell.id]
        assert rows[cell.id]["why"].startswith("cell.json is not this cell's record"), rows[cell.id]
    store.put_text(f"{cell_prefix('tiny', cells[0].id)}/cell.json", cells[0].to_json())  # rewritten, new size
    rows = {r["cell"]: r for r in cell_states(grid, book.read(), None)}
    assert rows[cells[0].id]["state"] == "done" and rows[cells[1].id]["state"] == "damaged"
