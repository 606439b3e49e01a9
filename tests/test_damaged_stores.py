"""A store damaged on purpose: every command calls the same cells finished, `analyze` names the damage, and
`run` repairs what it can (then `analyze --strict` says Complete) or the report names why it cannot."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings

import pyarrow as pa
import pytest
import yaml

from critbatch.analysis.audit import audit
from critbatch.analysis.load import load_sweeps
from critbatch.analysis.synthetic import GroupSpec, write_sweep
from critbatch.jobs.cell.layout import cell_prefix, success_key
from critbatch.jobs.cell.logschema import ipc_to_table, table_to_ipc
from critbatch.jobs.cli import main
from critbatch.jobs.store import LocalStore
from critbatch.jobs.store.cellstate import DAMAGED, cell_state, sweep_states
from critbatch.jobs.sweep.grid import load_grid
from factories import write_grid


def _record(store, sweep, cell_id):
    return f"{cell_prefix(sweep, cell_id)}/cell.json"


def _garbage(store, sweep, ids):
    store.put_bytes(_record(store, sweep, ids[0]), b"\x00not json{")


def _deleted(store, sweep, ids):
    store.delete(_record(store, sweep, ids[0]))


def _a_list(store, sweep, ids):
    store.put_bytes(_record(store, sweep, ids[0]), b"[1,2,3]")


def _forged(store, sweep, ids):
    """The first cell's folder holds the second cell's record (a cell.json claiming another cell's id)."""
    store.put_bytes(_record(store, sweep, ids[0]), store.get_bytes(_record(store, sweep, ids[1])))


def _steps_many(store, sweep, ids):
    summary = json.loads(store.get_text(success_key(sweep, ids[0])))
    store.put_text(success_key(sweep, ids[0]), json.dumps({**summary, "steps": "many"}))


def _nan_part(store, sweep, ids):
    """Part 0's float columns NaN: the same size, so the _SUCCESS manifest still matches."""
    key = store.list(f"{cell_prefix(sweep, ids[0])}/steps/")[0]
    table = ipc_to_table(store.get_bytes(key))
    for name in ("lr", "train_loss", "wall_time_s"):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array([math.nan] * table.num_rows))
    data = table_to_ipc(table)
    assert len(data) == len(store.get_bytes(key))
    store.put_bytes(key, data)


def _sweep_yaml(store, sweep, ids):
    store.put_bytes(f"{sweep}/sweep.yaml", b"spec: {sweep: \xff\xfe}\n")


#: name -> (damage, what analyze names: a pattern of its warning line; whether the cell is damaged to run).
DAMAGE = {
    "cell.json garbage": (_garbage, r"absent: {sweep}/{id}: cell.json not a valid cell \(cell.json: not valid JSON",
                          True),
    "cell.json deleted": (_deleted, r"absent: {sweep}/{id}: cell no cell.json", True),
    "cell.json [1,2,3]": (_a_list, r"absent: {sweep}/{id}: cell.json not a valid cell \(cell.json: must be a JSON "
                                   r"object, got list\)", True),
    "cell.json of another cell": (_forged, r"absent: {sweep}/{id}: cell.json not a valid cell \(it describes cell "
                                           r"{other}, not {id}", True),
    "_SUCCESS steps 'many'": (_steps_many, r"skipped {sweep}/cells/{id}/_SUCCESS: unreadable \(steps is not a "
                                           r"count of steps \('many'\)\); cell treated as incomplete", True),
    "NaN in a steps part": (_nan_part, r"damaged: {sweep}/{id}: steps/part-000000.arrow damaged: non-finite "
                                       r"wall_time_s, train_loss", False),
    "sweep.yaml not UTF-8": (_sweep_yaml, r"skipped {sweep}/sweep.yaml: .*sweep.yaml: not UTF-8 text \(byte 0xff "
                                          r"at offset 14\); treated as missing", False),
}


def _listed_sweep(root) -> tuple[LocalStore, list[str]]:
    store = LocalStore(root)
    truth = write_sweep(store, "au", batch_sizes=[16, 32, 64], seeds=[0], groups=[GroupSpec()], flush_steps=200)
    ids = [c.id for c in truth.cells]
    store.put_text("au/sweep.yaml", yaml.safe_dump({"spec": {"sweep": "au"}, "cells": [{"id": i} for i in ids]}))
    return store, ids


def _analyze(store, sweep: str, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["analyze", "--store", store.url, "--sweep", sweep, "--bootstrap", "0", "--strict"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_every_command_sees_the_same_damage_and_analyze_names_it(damage, tmp_path):
    store, ids = _listed_sweep(tmp_path / "store")
    hurt, named, to_run = DAMAGE[damage]
    hurt(store, "au", ids)
    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from NaN reaching the numbers
        checked = audit(load_sweeps(store, ["au"], warn=lines.append))
    lines += [finding.line() for finding in checked.findings]
    warning = named.format(sweep="au", id=ids[0], other=ids[1])
    assert any(re.search(warning, line) for line in lines), lines
    # --strict exits 3 unless the damage is a sweep.yaml unread, which is one not there
    assert checked.complete == (damage == "sweep.yaml not UTF-8")
    # run and train (cellstate) call the cell damaged exactly where the analysis does not use it as finished
    assert (cell_state(store, "au", ids[0]).state == DAMAGED) == to_run
    assert (sweep_states(store, "au", ids)[ids[0]].state == DAMAGED) == to_run
    assert all(cell_state(store, "au", i).finished for i in ids[1:])


def test_two_sweeps_holding_one_cell_name_both_folders(tmp_path):
    store, ids = _listed_sweep(tmp_path / "store")
    for key in store.list(cell_prefix("au", ids[0]) + "/"):
        store.put_bytes(key.replace("au/", "bu/", 1), store.get_bytes(key))
    lines: list[str] = []
    load_sweeps(store, ["au", "bu"], warn=lines.append)
    assert lines == [f"skipped bu/cells/{ids[0]}: the same cell as au/cells/{ids[0]}, already loaded"]


# ---- repaired by `critbatch run` ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small grid run once to the end; each test damages a copy of its store."""
    root = tmp_path_factory.mktemp("trained")
    grid = write_grid(root / "grid.yaml")
    assert main(["run", str(grid), "--store", str(root / "store"), "--log-dir", str(root / "logs")]) == 0
    return root, grid, load_grid(str(grid)).cell_ids()


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_run_repairs_what_it_can_then_analyze_says_complete(damage, trained, tmp_path, capsys, cpu_env):
    root, grid, ids = trained
    shutil.copytree(root / "store", tmp_path / "store")
    store = LocalStore(tmp_path / "store")
    hurt, named, to_run = DAMAGE[damage]
    hurt(store, "small", ids)
    record = store.get_bytes(_record(store, "small", ids[1]))
    steps = store.list(f"{cell_prefix('small', ids[0])}/steps/")

    if damage == "cell.json deleted":  # status (and submit, from the same listing) see it too
        capsys.readouterr()
        assert main(["status", str(grid), "--no-cluster", "--store", store.url]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if ids[0] in line)
        assert "damaged" in row and "cell.json is missing" in row

    assert main(["run", str(grid), "--store", store.url, "--log-dir", str(tmp_path / "logs")]) == 0
    code, err = _analyze(store, "small", capsys)
    if damage == "NaN in a steps part":  # the manifest's sizes still match: run cannot see it, analyze names it
        assert code == 3
        assert re.search(named.format(sweep="small", id=ids[0]), err), err
        return
    assert code == 0, err
    assert "critbatch analyze: Complete: the answer rests on all 2 cells sweep.yaml lists." in err
    assert store.get_bytes(_record(store, "small", ids[1])) == record  # the other cell untouched
    if damage.startswith("cell.json"):  # a record alone is written again: the logs are kept, not trained again
        assert store.list(f"{cell_prefix('small', ids[0])}/steps/") == steps
        log = (tmp_path / "logs" / f"small-{ids[0]}.log").read_text()
        assert "wrote it again from the cell" in log

