"""Fuzzing the two readers of user input: the grid loader and the cell JSON reader. Whatever the bytes, the
answer is a grid or a cell, or a ConfigError (exit code 2): never another exception (a traceback, exit 1)."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.sweep.grid import load_grid
from critbatch.jobs.train.main import read_cell
from factories import SMALL_GRID

pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=800, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                     st.sampled_from(["lsr", "linreg", "linear", "s3://a/b", "s3://critbatch/x", "8Gi", "1e400",
                                      "-1", "0", "NaN", ".inf", "&a", "*a", "<<", "~"]))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
_fields = st.sampled_from(sorted({*SMALL_GRID, "store", "warmup_epochs", "max_steps", "stop", "model_options",
                                  "decay", "precision", "backend", "micro_batch", "accumulation", "analysis"}))
#: A small grid with some fields replaced by arbitrary values: deep enough to reach cell validation and sizing.
_grids = st.dictionaries(_fields, _values, max_size=4).map(lambda changes: {**SMALL_GRID, **changes})


def _refused_or_loaded(load, arg) -> None:
    try:
        load(arg)
    except ConfigError as err:
        assert err.problems and all(isinstance(p, str) and len(p) < 4000 for p in err.problems)


@FUZZ
@given(st.binary(max_size=400))
def test_grid_loader_takes_any_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "grid.yaml"
    path.write_bytes(data)
    _refused_or_loaded(load_grid, str(path))


@FUZZ
@given(_grids)
def test_grid_loader_takes_any_grid_shaped_yaml(tmp_path_factory, spec):
    path = tmp_path_factory.mktemp("fuzz") / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    _refused_or_loaded(load_grid, str(path))


@FUZZ
@given(st.text(max_size=300))
def test_grid_loader_takes_any_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "grid.yaml"
    path.write_text(text)
    _refused_or_loaded(load_grid, str(path))


_cells = st.dictionaries(st.sampled_from(sorted(Cell.model_fields) + ["id", "derived", "x"]), _values, max_size=4).map(
    lambda changes: {**{k: v for k, v in SMALL_GRID.items() if k != "resources"}, "batch_size": 8, **changes})


@FUZZ
@given(_cells)
def test_cell_reader_takes_any_cell_shaped_json(cell):
    _refused_or_loaded(read_cell, json.dumps(cell, allow_nan=True))


@FUZZ
@given(st.text(max_size=300).map(lambda t: "{" + t))
def test_cell_reader_takes_any_inline_text(text):
    _refused_or_loaded(read_cell, text)


@FUZZ
@given(st.binary(max_size=300))
def test_cell_reader_takes_any_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "cell.json"
    path.write_bytes(data)
    _refused_or_loaded(read_cell, str(path))
