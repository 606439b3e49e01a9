"""Typed configs: every bad grid exits 2 through the real command line, one line per problem, nothing written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from critbatch.jobs import cli
from critbatch.jobs.cell.options import dataset_options, model_options
from critbatch.jobs.cell.spec import Cell, DatasetSpec
from critbatch.jobs.sweep.grid import grid_schema, parse_yaml, preset_dir, preset_names

BASE = {
    "sweep": "t", "dataset": {"name": "cifar10"}, "model": "resnet34", "strategy": "blr", "base_lr": 0.1,
    "base_batch": 64, "epochs": 1, "batch_size": 64,
}
LINREG = {"dataset": {"name": "linreg"}, "model": "linear", "strategy": "oracle"}
CITYSCAPES = {"dataset": {"name": "cityscapes", "options": {"size": [4, 512]}}, "model": "drn_d_22", "base_batch": 8,
              "batch_size": 8}
AUGMENTS = "none, crop, flip, crop_flip"

BAD = [  # name, changes to BASE, the lines expected on stderr (regexes, each a whole problem)
    ("model option unknown", {"model_options": {"depth": 50}},
     [r"model_options\.depth: unknown option for model 'resnet34'; allowed: none"]),
    ("model option in a list axis", {"model": "alexnet", "model_options": [{}, {"depth": 50}]},
     [r"model_options\[1\]\.depth: unknown option for model 'alexnet'; allowed: dropout"]),
    ("model option out of range", {"model": "alexnet", "model_options": {"dropout": 1.0}},
     [r"model_options\.dropout: 1\.0 is outside \[0, 1\)"]),
    ("dataset option bad choice", {"dataset": {"name": "cifar10", "options": {"augment": "bogus"}}},
     [rf"dataset\.options\.augment: unknown augment 'bogus'; allowed: {AUGMENTS}"]),
    ("dataset option wrong type", {**LINREG, "dataset": {"name": "linreg", "options": {"n": "abc"}}},
     [r"dataset\.options\.n: must be an integer, got 'abc'"]),
    ("dataset option too small", CITYSCAPES, [r"dataset\.options\.size\[0\]: must be >= 8, got 4"]),
    ("field wrong type", {"base_lr": "0.1", "seed": True},
     [r"base_lr: must be a number, got '0\.1'", r"seed: must be an integer, got True"]),
    ("value in a list", {"batch_size": [64, 128, 256, 0]}, [r"batch_size\[3\]: must be a positive integer, got 0"]),
    ("unknown choice", {"precision": "fp16"}, [r"precision: unknown precision 'fp16'; allowed: fp32, bf16"]),
    # An unknown key at every level, each listing the keys allowed there.
    ("unknown key: top", {"batchsize": 64}, [r"batchsize: unknown field; allowed: sweep, .*, batch_size, "]),
    ("unknown key: dataset", {"dataset": {"name": "cifar10", "fractions": 0.5}},
     [r"dataset\.fractions: unknown field; allowed: name, fraction, max_train, extra, options"]),
    ("unknown key: optimizer", {"optimizer": {"lr": 0.1}},
     [r"optimizer\.lr: unknown field; allowed: name, momentum, weight_decay, nesterov"]),
    ("unknown key: eval", {"eval": {"every": 10}}, [r"eval\.every: unknown field; allowed: points, train_subset"]),
    ("unknown key: noise", {"noise": {"period": 10}}, [r"noise\.period: unknown field; allowed: every"]),
    ("unknown key: resources", {"resources": {"gpu": 1}}, [r"resources\.gpu: unknown field; allowed: gpus, nodes, "]),
    ("unknown key: toleration", {"resources": {"tolerations": [{"key": "a", "effekt": "NoSchedule"}]}},
     [r"resources\.tolerations\[0\]\.effekt: unknown field; allowed: key, operator, value, effect"]),
    ("unknown key: analysis", {"analysis": {"cpus": 2}},
     [r"analysis\.cpus: unknown field; allowed: cpu, memory, deadline_seconds, backoff_limit, args"]),
    ("unknown key: dataset.options", {"dataset": {"name": "cifar10", "options": {"scale": 2}}},
     [r"dataset\.options\.scale: unknown option for dataset 'cifar10'; allowed: augment"]),
    ("unknown key: model_options", {"model": "alexnet", "model_options": {"p": 0.5}},
     [r"model_options\.p: unknown option for model 'alexnet'; allowed: dropout"]),
    # What used to be accepted and trained nonsense, or failed only inside the pod.
    ("clip_grad zero", {"clip_grad": 0}, [r"clip_grad: must be a positive number, got 0\.0"]),
    ("clip_grad negative", {"clip_grad": [1.0, -1.0]}, [r"clip_grad\[1\]: must be a positive number, got -1\.0"]),
    ("momentum 1", {"optimizer": {"momentum": 1.0}}, [r"optimizer\.momentum: 1\.0 is outside \[0, 1\)"]),
    ("momentum negative", {"optimizer": {"momentum": -0.1}}, [r"optimizer\.momentum: -0\.1 is outside \[0, 1\)"]),
    ("weight decay negative", {"optimizer": {"weight_decay": -1e-4}},
     [r"optimizer\.weight_decay: must be >= 0, got -0\.0001"]),
    ("nesterov without momentum", {"optimizer": {"momentum": 0.0, "nesterov": True}},
     [r"optimizer\.nesterov: Nesterov momentum needs momentum > 0"]),
    ("train subset zero", {"eval": {"train_subset": 0}}, [r"eval\.train_subset: must be a positive integer, got 0"]),
    ("eval points beyond the steps", {"eval": {"points": 10**9}},  # 50,000 / 64 = 781 steps
     [r"eval\.points: 1000000000 evaluations for a run of 781 steps; allowed: 2 to 782"]),
    ("eval points beyond a capped run", {"max_steps": 10, "eval": {"points": 500}},
     [r"eval\.points: 500 evaluations for a run of 10 steps; allowed: 2 to 200"]),
    ("warm-up longer than the run", {"strategy": ["blr", "lsr"], "warmup_epochs": 5, "epochs": 2},
     [r"warmup_epochs: a warm-up of 5\.0 epochs \(3905 steps\) is longer than the run \(1562 steps\); "
      r"allowed: 0 to 2 epochs$"]),
    ("analysis args unknown option", {"analysis": {"args": ["--bogus"]}},
     [r"analysis\.args: unrecognized arguments: --bogus"]),
    ("analysis args bad value", {"analysis": {"args": ["--efficiency", "high"]}},
     [r"analysis\.args: argument --efficiency: invalid float value: 'high'"]),
    ("analysis args not strings", {"analysis": {"args": ["--efficiency", 0.8]}},
     [r"analysis\.args\[1\]: must be a string, got 0\.8"]),
]

DUPLICATES = [  # YAML that repeats a key (the last one silently won)
    ("top", "batch_size: 64\nbatch_size: 128\n",
     [r"batch_size: repeated at line 10 column 1 \(first at line 9 column 1\); a key may appear once"]),
    ("nested", "dataset: {name: cifar10, name: mnist}\n",
     [r"dataset\.name: repeated at line 8 column 26 \(first at line 8 column 11\)"]),
    ("in a list", "dataset: [{name: mnist}, {name: cifar10, fraction: 0.5, fraction: 1.0}]\n",
     [r"dataset\[1\]\.fraction: repeated at line 8 column 57 \(first at line 8 column 42\)"]),
]


def write_grid(tmp_path: Path, changes: dict | None = None, extra_yaml: str = "") -> Path:
    """BASE with ``changes`` as a YAML file; ``extra_yaml`` is appended and replaces the keys it sets."""
    spec = {k: v for k, v in {**BASE, **(changes or {})}.items() if not re.search(rf"^{k}:", extra_yaml, re.M)}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False) + extra_yaml)
    return path


def assert_exit_2(argv: list[str], expected: list[str], capsys) -> list[str]:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    prefix = f"critbatch {argv[0]}: error: "
    assert lines and all(line.startswith(prefix) for line in lines), lines
    for pattern in expected:
        assert any(re.fullmatch(pattern + ".*", line[len(prefix):]) for line in lines), (pattern, lines)
    return lines


@pytest.mark.parametrize("name,changes,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_grid_exits_2_naming_the_path_and_writes_nothing(name, changes, expected, tmp_path, capsys):
    grid = write_grid(tmp_path, changes)
    assert_exit_2(["cells", str(grid)], expected, capsys)
    out = tmp_path / "manifests"
    assert_exit_2(["render", str(grid), "-o", str(out)], expected, capsys)
    assert not out.exists()


@pytest.mark.parametrize("name,text,expected", DUPLICATES, ids=[d[0] for d in DUPLICATES])
def test_a_repeated_yaml_key_is_an_error(name, text, expected, tmp_path, capsys):
    grid = write_grid(tmp_path, extra_yaml=text)
    assert_exit_2(["cells", str(grid)], expected, capsys)


def test_every_problem_of_a_grid_at_once(tmp_path, capsys):
    changes = {"sweep": "Bad_Name", "clip_grad": -1, "optimizer": {"momentum": 2.0}, "resources": {"gpu": 1},
               "model_options": [{}, {"depth": 50}]}
    lines = assert_exit_2(["cells", str(write_grid(tmp_path, changes))],
                          [r"sweep: 'Bad_Name' is not a DNS-1123 label", r"resources\.gpu: unknown field",
                           r"clip_grad: must be a positive number", r"optimizer\.momentum: 2\.0 is outside"], capsys)
    assert len(lines) == 4  # model_options[1] is checked once its cell's fields are valid


def test_render_output_at_or_under_a_file_exits_2(tmp_path, capsys):
    grid = write_grid(tmp_path)
    blocker = tmp_path / "taken"
    blocker.write_text("keep me\n")
    for out in (blocker, blocker / "sub"):
        assert_exit_2(["render", str(grid), "-o", str(out)], [r"--output: .* is at or under a file"], capsys)
    assert blocker.read_text() == "keep me\n"


def test_run_log_dir_that_is_a_file_exits_2_and_writes_nothing(tmp_path, capsys):
    blocker = tmp_path / "logs"
    blocker.write_text("")
    store = tmp_path / "store"
    argv = ["run", str(write_grid(tmp_path)), "--store", str(store), "--log-dir", str(blocker)]
    assert_exit_2(argv, [r"--log-dir: .* is at or under a file"], capsys)
    assert not store.exists()


# ---- the options models ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,augment", [("mnist", "none"), ("cifar10", "crop_flip"), ("cifar100", "crop_flip"),
                                          ("svhn", "crop"), ("cityscapes", "flip")])
def test_effective_dataset_options_fill_in_each_sets_default(name, augment):
    assert dataset_options(DatasetSpec(name=name)).augment == augment
    assert dataset_options(DatasetSpec(name=name, options={"augment": "none"})).augment == "none"


def test_effective_model_options_keep_what_the_cell_says():
    opts = model_options("lstm", {"nhid": 100, "dropout": 0.5})
    assert opts.model_dump() == {"emsize": 200, "nhid": 100, "nlayers": 2, "dropout": 0.5, "tied": False}


# ---- identity -----------------------------------------------------------------------------------------


def test_canonical_json_and_id_are_the_store_contract():
    cell = Cell.from_dict({k: v for k, v in BASE.items() if k != "sweep"})
    # Sorted keys, floats as floats (epochs 1 -> 1.0), ints as ints, options as written: ids of existing stores.
    assert cell.canonical_json() == (
        '{"accumulation":1,"base_batch":64,"base_lr":0.1,"batch_size":64,"clip_grad":null,"dataset":{"extra":false,'
        '"fraction":1.0,"max_train":null,"name":"cifar10","options":{}},"decay":"none","epochs":1.0,"eval":{"points":'
        '200,"train_subset":10000},"max_steps":null,"model":"resnet34","model_options":{},"noise":{"every":10},'
        '"optimizer":{"momentum":0.9,"name":"sgd","nesterov":false,"weight_decay":0.0005},"precision":"fp32",'
        '"seed":0,"strategy":"blr","warmup_epochs":0.0}')
    assert cell.id == "e122276264"
    assert json.loads(cell.to_json()) == {**json.loads(cell.canonical_json()), "sweep": "default"}


def test_a_changed_copy_has_its_own_id():
    cell = Cell.from_dict(BASE)
    assert cell.id  # computed and cached before the copy
    bigger = cell.model_copy(update={"batch_size": 128})
    assert bigger.id == Cell.from_dict({**BASE, "batch_size": 128}).id != cell.id
    assert json.loads(bigger.to_json())["batch_size"] == 128


# ---- the JSON Schema --------------------------------------------------------------------------------------

SCHEMA_FILE = Path(cli.__file__).parent / "sweep" / "grid.schema.json"


def test_committed_schema_is_what_critbatch_schema_prints(capsys):
    assert cli.main(["schema"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) == grid_schema()
    assert SCHEMA_FILE.read_text() == printed, "regenerate: critbatch schema > jobs/sweep/grid.schema.json"


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_points_at_the_schema_and_satisfies_it(name):
    text = (preset_dir() / f"{name}.yaml").read_text()
    assert text.splitlines()[0] == "# yaml-language-server: $schema=../grid.schema.json"
    jsonschema.validate(parse_yaml(text, name), json.loads(SCHEMA_FILE.read_text()))


@pytest.mark.parametrize("changes", [{"batchsize": 64}, {"dataset": {"name": "imagenet"}}, {"batch_size": [64, 0]},
                                     {"optimizer": {"momentum": 1.5}}, {"resources": {"cpu": "lots"}}])
def test_the_schema_rejects_what_validation_rejects(changes):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**BASE, **changes}, json.loads(SCHEMA_FILE.read_text()))
