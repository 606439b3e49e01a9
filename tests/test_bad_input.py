"""Bad input, however it arrives: one line naming the field or the file, exit code 2, nothing written, no traceback.

Each case runs through every command its input reaches: a grid through ``run``, ``render`` and ``cells``;
a store through ``run``, ``render``, ``analyze`` and ``train``; a cell through ``train``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from critbatch.jobs.cli import main
from critbatch.jobs.store import LocalStore
from factories import SMALL_GRID, write_grid

BINARY = bytes(range(256)) * 4
CELL = {k: v for k, v in SMALL_GRID.items() if k != "resources"} | {"batch_size": 8, "sweep": "small"}


def _text(name: str, text: str):
    def make(tmp: Path) -> Path:
        (tmp / name).write_text(text)
        return tmp / name
    return make


def _bytes(name: str, data: bytes):
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name
    return make


def _grid(**changes):
    return lambda tmp: write_grid(tmp / "grid.yaml", **changes)


#: Nine lines under batch_size that expand to 10^9 values.
LAUGHS = "batch_size:\n  - &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"  - &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))

#: name -> (how the grid is made in a folder, the one error line expected).
GRID_CASES = {
    "bucket with '_' and '!'": (_grid(store="s3://Bad_Bucket!/x"),
                                r"^store: bucket 'Bad_Bucket!' is not an S3 bucket name: 3 to 63 characters"),
    "bucket of 1 character": (_grid(store="s3://a/x"), r"^store: bucket 'a' is not an S3 bucket name"),
    "bucket like an IP address": (_grid(store="s3://192.168.5.4/x"), r"^store: bucket '192.168.5.4' .*IP address"),
    "binary grid file": (_bytes("grid.yaml", BINARY),
                         r"^grid '.*grid.yaml': not UTF-8 text \(byte 0x80 at offset 128\)"),
    "grid path is a directory": (lambda tmp: tmp, r"^grid: '.*' is a directory; give a file"),
    "warm-up past max_steps": (_grid(strategy="lsr", epochs=30, warmup_epochs=25, max_steps=20, batch_size=8),
                               r"^warmup_epochs: a warm-up of 25.0 epochs \(200 steps\) is longer than the run "
                               r"\(20 steps, capped by max_steps 20\); allowed: 0 to 2.5 epochs"),
    "budget of 1e12 epochs": (_grid(epochs=1e12, batch_size=8),
                              r"^epochs: 1e\+12 epochs imply 8e\+12 steps; allowed: at most 1e\+09 steps"),
    "recursive alias": (_text("grid.yaml", yaml.safe_dump({k: v for k, v in SMALL_GRID.items() if k != "seed"})
                              + "seed: &r [0, *r]\n"), r"^.*grid.yaml: an alias refers to a node that contains it"),
    "billion laughs": (_text("grid.yaml", LAUGHS + yaml.safe_dump({k: v for k, v in SMALL_GRID.items()
                                                                   if k != "batch_size"})),
                       r"^.*grid.yaml: expands \(through its aliases\) to more than 100000 values"),
    "nested 5000 deep": (_text("grid.yaml", "seed: " + "[" * 5000 + "]" * 5000 + "\n"),
                         r"^.*grid.yaml: nested deeper than 64 levels"),
    "control character (found by fuzzing)": (_text("grid.yaml", "sweep: a\x08\n"),
                                             r"^.*grid.yaml: not valid YAML \(unacceptable character #x0008"),
    "a number as a key (found by fuzzing)": (_text("grid.yaml", yaml.safe_dump(SMALL_GRID)
                                                   + "accumulation: [{'': null, 0E0: null}]\n"),
                                             r"^accumulation\[0\].0E0: the key 0E0 at line \d+ column \d+ is not a "
                                             r"name"),
    "linreg n of 10^12": (_grid(dataset={"name": "linreg", "options": {"n": 10**12, "d": 128}}),
                          r"^dataset.options: n = 1000000000000 samples of d = 128 features .*n x d at most"),
    "a value a megabyte long": (_grid(model="m" * 10**6),
                                r"^model: unknown model 'm+\.\.\. \(1000002 characters\); allowed: alexnet, "),
}


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_refused(code: int, out: str, err: str, command: str, pattern: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err) < 2000, err[:2000]
    lines = [line for line in err.splitlines() if line.startswith(f"critbatch {command}: error: ")]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0].removeprefix(f"critbatch {command}: error: ")), lines[0]
    assert out == ""


def _grid_argv(command: str, grid: str, tmp: Path) -> list[str]:
    return {
        "run": ["run", grid, "--store", str(tmp / "store"), "--log-dir", str(tmp / "logs")],
        "render": ["render", grid, "-o", str(tmp / "out")],
        "cells": ["cells", grid],
    }[command]


@pytest.mark.parametrize("command", ["run", "render", "cells"])
@pytest.mark.parametrize("case", sorted(GRID_CASES))
def test_a_bad_grid_is_one_line_and_writes_nothing(case, command, tmp_path, capsys):
    make, pattern = GRID_CASES[case]
    folder = tmp_path / "in"
    folder.mkdir()
    grid = str(make(folder))
    code, out, err = _run_cli(_grid_argv(command, grid, tmp_path), capsys)
    _assert_refused(code, out, err, command, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no store, logs or manifests


#: name -> (the --store given, the one error line expected).
STORE_CASES = {
    "bucket with '_' and '!'": ("s3://Bad_Bucket!/x", r"^store: bucket 'Bad_Bucket!' is not an S3 bucket name"),
    "bucket of 1 character": ("s3://a/x", r"^store: bucket 'a' is not an S3 bucket name"),
    "bucket ending -s3alias": ("s3://data-s3alias/x", r"^store: bucket 'data-s3alias' .*reserves"),
    "unknown scheme": ("gs://b/x", r"^store: unsupported scheme in 'gs://b/x'"),
}


def _store_argv(command: str, store: str, tmp: Path) -> list[str]:
    grid = str(write_grid(tmp / "in" / "grid.yaml"))
    return {
        "run": ["run", grid, "--store", store, "--log-dir", str(tmp / "logs")],
        "render": ["render", grid, "--store", store, "-o", str(tmp / "out")],
        "analyze": ["analyze", "--store", store, "--sweep", "small", "--output", str(tmp / "report")],
        "train": ["train", "--cell", json.dumps(CELL), "--store", store],
    }[command]


@pytest.mark.parametrize("command", ["run", "render", "analyze", "train"])
@pytest.mark.parametrize("case", sorted(STORE_CASES))
def test_a_bad_store_is_one_line_and_writes_nothing(case, command, tmp_path, capsys):
    store, pattern = STORE_CASES[case]
    (tmp_path / "in").mkdir()
    code, out, err = _run_cli(_store_argv(command, store, tmp_path), capsys)
    _assert_refused(code, out, err, command, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_render_names_a_local_store_as_a_path_not_a_directory(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "a-file").write_text("x")
    code, out, err = _run_cli(_store_argv("render", str(tmp_path / "a-file"), tmp_path), capsys)
    _assert_refused(code, out, err, "render", r"^store: '.*a-file' is a path on this machine, which pods cannot reach")


def _cell_file(data: bytes):
    def make(tmp: Path) -> str:
        (tmp / "cell.json").write_bytes(data)
        return str(tmp / "cell.json")
    return make


def _deep(n: int) -> str:
    return json.dumps({**CELL, "model_options": {}})[:-1] + ', "x": ' + "[" * n + "]" * n + "}"


#: name -> (the --cell given (made in a folder), the one error line expected).
CELL_CASES = {
    "binary file": (_cell_file(BINARY), r"^--cell '.*cell.json': not UTF-8 text \(byte 0x80 at offset 128\)"),
    "sweep ../../etc": (lambda tmp: json.dumps({**CELL, "sweep": "../../etc"}),
                        r"^--cell.sweep: '../../etc' is not a DNS-1123 label"),
    "sweep Bad_Name": (lambda tmp: json.dumps({**CELL, "sweep": "Bad_Name"}),
                       r"^--cell.sweep: 'Bad_Name' is not a DNS-1123 label"),
    "a key twice": (lambda tmp: json.dumps(CELL)[:-1] + ', "seed": 1}',
                    r"^--cell: not valid JSON \(key 'seed' appears twice in one object"),
    "nested 50,000 deep": (lambda tmp: _deep(50_000), r"^--cell: nested deeper than 64 levels"),
    "empty": (lambda tmp: "", r"^--cell: '' is neither a cell JSON file nor inline JSON"),
    "a directory": (lambda tmp: str(tmp), r"^--cell: '.*' is a directory; give a file"),
    "a list": (lambda tmp: "[1, 2, 3]", r"^--cell: no such file '\[1, 2, 3\]'"),
    "warm-up past max_steps": (lambda tmp: json.dumps({**CELL, "strategy": "lsr", "epochs": 30, "warmup_epochs": 25,
                                                       "max_steps": 20}),
                               r"^--cell.warmup_epochs: a warm-up of 25(\.0)? epochs \(200 steps\) is longer "),
    "budget of 1e12 epochs": (lambda tmp: json.dumps({**CELL, "epochs": 1e12}), r"^--cell.epochs: 1e\+12 epochs imply"),
}


@pytest.mark.parametrize("case", sorted(CELL_CASES))
def test_a_bad_cell_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    make, pattern = CELL_CASES[case]
    cell = make(tmp_path)
    before = sorted(tmp_path.iterdir())
    code, out, err = _run_cli(["train", "--cell", cell, "--store", str(tmp_path / "store")], capsys)
    _assert_refused(code, out, err, "train", pattern)
    assert sorted(tmp_path.iterdir()) == before


def test_indexed_options_without_cell_from_sweep_are_refused(tmp_path, capsys):
    argv = ["train", "--cell", json.dumps(CELL), "--store", str(tmp_path / "store"), "--resource-class", "cpu",
            "--index", "0"]
    code, out, err = _run_cli(argv, capsys)
    _assert_refused(code, out, err, "train", r"^--resource-class, --index: only with --cell-from-sweep")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("sweep, pattern", [
    ("small", r"^.*small/sweep.yaml: not UTF-8 text \(byte 0xff at offset 6\)"),
    ("../../etc", r"^--cell-from-sweep: '../../etc' is not a sweep name"),
])
def test_cell_from_sweep_refuses_a_damaged_sweep_yaml_and_a_bad_name(sweep, pattern, tmp_path, capsys):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("small/sweep.yaml", b"spec: \xff\xfe")
    argv = ["train", "--cell-from-sweep", sweep, "--resource-class", "cpu", "--sweep-digest", "0" * 12, "--index",
            "0", "--store", store.url]
    code, out, err = _run_cli(argv, capsys)
    _assert_refused(code, out, err, "train", pattern)
    assert store.list("") == ["small/sweep.yaml"]


@pytest.mark.parametrize("sweep", ["../../etc", "Bad_Name", ""])
def test_analyze_refuses_a_sweep_that_is_not_a_name(sweep, tmp_path, capsys):
    code, out, err = _run_cli(["analyze", "--store", str(tmp_path / "store"), "--sweep", sweep], capsys)
    _assert_refused(code, out, err, "analyze", r"^--sweep: '.*' is not a sweep name: a DNS-1123 label")
    assert not (tmp_path / "store").exists()


def test_analyze_checks_its_output_before_writing_the_report(tmp_path, capsys):
    from critbatch.analysis.synthetic import GroupSpec, write_sweep

    store = LocalStore(tmp_path / "store")
    write_sweep(store, "au", batch_sizes=[16, 32, 64], seeds=[0], groups=[GroupSpec()], flush_steps=200)
    before = store.list("")
    (tmp_path / "taken").write_text("a file")
    argv = ["analyze", "--store", store.url, "--sweep", "au", "--bootstrap", "0", "--output", str(tmp_path / "taken")]
    code, out, err = _run_cli(argv, capsys)
    _assert_refused(code, out, err, "analyze", r"^--output: '.*taken' is at or under a file; give a directory")
    assert store.list("") == before  # no report in the store either
