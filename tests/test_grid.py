"""Grid specs: expansion into cells, every problem reported at once with its path, presets."""

from __future__ import annotations

import json

import pytest
import yaml

from critbatch.jobs import cli
from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.sweep.grid import MAX_CELLS, load_grid, max_sweep_length, preset_names

BASE = {
    "sweep": "t",
    "dataset": {"name": "cifar10"},
    "model": "resnet34",
    "strategy": "blr",
    "base_lr": 0.1,
    "base_batch": 64,
    "epochs": 1,
    "batch_size": 64,
    "resources": {"gpus": 1},
}


def spec(**changes):
    out = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        if value is _DROP:
            out.pop(key)
        else:
            out[key] = value
    return out


_DROP = object()


# ---- expansion ------------------------------------------------------------------------------------


def test_cross_product_of_every_list_axis():
    grid = load_grid(spec(strategy=["blr", "lsr", "srsr"], batch_size=[64, 128], seed=[0, 1]))
    cells = grid.cells()
    assert len(cells) == 3 * 2 * 2
    assert {(c.strategy, c.batch_size, c.seed) for c in cells} == {
        (s, b, r) for s in ("blr", "lsr", "srsr") for b in (64, 128) for r in (0, 1)
    }
    assert all(c.sweep == "t" for c in cells)
    assert len({c.id for c in cells}) == 12


def test_nested_mapping_axes_expand():
    grid = load_grid(spec(dataset={"name": "cifar10", "fraction": [0.25, 0.5, 1.0]},
                          optimizer={"momentum": [0.0, 0.9]}))
    cells = grid.cells()
    assert sorted({c.dataset.fraction for c in cells}) == [0.25, 0.5, 1.0]
    assert sorted({c.optimizer.momentum for c in cells}) == [0.0, 0.9]
    assert len(cells) == 6


def test_a_list_of_mappings_is_an_axis_and_each_mapping_expands():
    grid = load_grid(spec(dataset=[{"name": "mnist", "max_train": 50000},
                                   {"name": "svhn", "max_train": 50000, "fraction": [0.5, 1.0]}]))
    got = sorted((c.dataset.name, c.dataset.fraction, c.dataset.max_train) for c in grid.cells())
    assert got == [("mnist", 1.0, 50000), ("svhn", 0.5, 50000), ("svhn", 1.0, 50000)]


def test_ids_ignore_where_a_cell_runs():
    a = load_grid(spec())
    b = load_grid(spec(image="registry.example/critbatch:2", resources={"gpus": 4, "cpu": 32},
                       store="s3://other/x", namespace="ml", sweep="another"))
    assert [c.id for c in a.cells()] == [c.id for c in b.cells()]
    c = load_grid(spec(batch_size=128))
    assert c.cells()[0].id != a.cells()[0].id


def test_scientific_notation_is_a_number(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec()).replace("base_lr: 0.1", "base_lr: 1e-1"))
    assert load_grid(str(path)).cells()[0].base_lr == pytest.approx(0.1)


def test_int_and_float_spellings_give_one_id():
    assert load_grid(spec(epochs=1)).cells()[0].id == load_grid(spec(epochs=1.0)).cells()[0].id


@pytest.mark.parametrize("nodes,backend,expected", [(1, None, "job"), (2, None, "trainjob"),
                                                    (2, "trainjob", "trainjob"), (1, "pytorchjob", "pytorchjob")])
def test_backend_default(nodes, backend, expected):
    s = spec(resources={"gpus": 1, "nodes": nodes}, batch_size=64)
    if backend:
        s["backend"] = backend
    assert load_grid(s).backend == expected


def test_world_size_is_gpus_times_nodes_and_cpu_nodes_run_one_process():
    assert load_grid(spec(resources={"gpus": 4, "nodes": 2})).world_size == 8
    assert load_grid(spec(resources={"gpus": 0})).world_size == 1


def test_run_settings_defaults():
    grid = load_grid(spec())
    assert grid.namespace == "critbatch" and grid.store == "s3://critbatch/runs"
    assert grid.data_root == "s3://critbatch/runs"  # staged sets sit at <store>/datasets/<name>/
    assert grid.queue is None and grid.max_active == 0


def test_sweep_yaml_holds_spec_and_cells():
    grid = load_grid(spec(batch_size=[64, 128]))
    doc = yaml.safe_load(grid.sweep_yaml())
    assert doc["spec"]["batch_size"] == [64, 128]
    assert [c["id"] for c in doc["cells"]] == [c.id for c in grid.cells()]


def test_with_overrides_revalidates():
    grid = load_grid(spec())
    assert grid.with_overrides(store="s3://bkt/p", image="x:1").store == "s3://bkt/p"
    with pytest.raises(ConfigError, match="namespace: 'Bad' is not a DNS-1123 label"):
        grid.with_overrides(namespace="Bad")


# ---- bad specs: every problem at once, with its path ----------------------------------------------------

BAD = [
    ("unknown top-level key", spec(batchsize=64), [r"^batchsize: unknown field; allowed: .*batch_size"]),
    ("unknown nested key", spec(dataset={"name": "cifar10", "fractions": [0.5]}),
     [r"^dataset\.fractions: unknown field"]),
    ("unknown dataset", spec(dataset={"name": "imagenet"}), [r"^dataset\.name: unknown dataset 'imagenet'; allowed: cifar10"]),
    ("unknown model in a list", spec(model=["resnet34", "resnet999"]), [r"^model\[1\]: unknown model 'resnet999'"]),
    ("model does not fit the dataset", spec(model="lstm"), [r"^model: 'lstm' does not fit dataset 'cifar10'"]),
    ("unknown strategy", spec(strategy=["blr", "fast"]), [r"^strategy\[1\]: unknown strategy 'fast'; allowed: blr"]),
    ("non-integer batch size", spec(batch_size=[64, 96.5]), [r"^batch_size\[1\]: must be an integer, got 96\.5"]),
    ("non-positive batch size", spec(batch_size=[64, 0, -8]),
     [r"^batch_size\[1\]: must be a positive integer, got 0", r"^batch_size\[2\]: must be a positive integer"]),
    ("batch larger than the train set", spec(batch_size=[64, 65536]),
     [r"^batch_size\[1\]: 65536 is larger than the training set \(50000 examples\)"]),
    ("batch larger than a fraction of it", spec(dataset={"name": "cifar10", "fraction": [1.0, 0.25]},
                                                batch_size=[64, 16384]),
     [r"^batch_size\[1\]: 16384 is larger than the training set \(12500 examples\)"]),
    ("fraction outside (0, 1]", spec(dataset={"name": "cifar10", "fraction": [0.5, 0, 1.5]}),
     [r"^dataset\.fraction\[1\]: 0\.0 is outside \(0, 1\]", r"^dataset\.fraction\[2\]: 1\.5 is outside"]),
    ("fraction inside a list of datasets", spec(dataset=[{"name": "mnist"}, {"name": "svhn", "fraction": [2.0]}]),
     [r"^dataset\[1\]\.fraction\[0\]: 2\.0 is outside"]),
    ("sweep not DNS-1123", spec(sweep="CIFAR_10"), [r"^sweep: 'CIFAR_10' is not a DNS-1123 label"]),
    ("sweep too long for the names", spec(sweep="a" * 43), [r"^sweep: 'a{43}' is 43 characters; at most 42"]),
    ("fixed sizing: gpus do not divide the batch", spec(resources={"gpus": 8, "sizing": "fixed"},
                                                         batch_size=[64, 100, 36]),
     [r"^resources: world size 8 does not divide the batch of cell \w+ \(resnet34, batch 100\)",
      r"^resources: world size 8 does not divide the batch of cell \w+ \(resnet34, batch 36\)"]),
    ("fixed sizing: gpus x nodes do not divide the batch",
     spec(resources={"gpus": 4, "nodes": 3, "sizing": "fixed"}, batch_size=[96, 64]),
     [r"^resources: world size 12 does not divide the batch of cell \w+ \(resnet34, batch 64\)"]),
    ("missing required cell field", spec(base_lr=_DROP), [r"^base_lr: required field is missing"]),
    ("missing sweep", spec(sweep=_DROP), [r"^sweep: required field is missing"]),
    ("empty axis", spec(seed=[]), [r"^seed: an axis must list at least one value"]),
    ("repeated value", spec(batch_size=[64, 128, 64]), [r"^batch_size\[2\]: 64 repeats batch_size\[0\]"]),
    ("bad quantity", spec(resources={"cpu": "lots", "memory": "32GB"}),
     [r"^resources\.cpu: 'lots' is not a Kubernetes quantity", r"^resources\.memory: '32GB' is not"]),
    ("unknown resources key", spec(resources={"gpu": 1}), [r"^resources\.gpu: unknown field; allowed: gpus"]),
    ("unknown backend", spec(backend="slurm"), [r"^backend: unknown backend 'slurm'; allowed: job, pytorchjob"]),
    ("job backend on several nodes", spec(backend="job", resources={"nodes": 2}),
     [r"^backend: 'job' runs on one node"]),
    ("bad queue name", spec(queue="team queue"), [r"^queue: 'team queue' is not a valid label value"]),
    ("s3 store without a bucket", spec(store="s3:///runs"), [r"^store: 's3:///runs' names no bucket"]),
    ("unsupported store scheme", spec(store="gs://b/p"), [r"^store: unsupported scheme"]),
    ("oracle outside linreg", spec(strategy="oracle"), [r"^strategy: 'oracle' needs dataset 'linreg'"]),
]


@pytest.mark.parametrize("name,data,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_spec_reports_each_problem_with_its_path(name, data, expected):
    with pytest.raises(ConfigError) as info:
        load_grid(data)
    problems = info.value.problems
    for pattern in expected:
        assert any(__import__("re").search(pattern, p) for p in problems), (pattern, problems)


def test_every_problem_at_once_and_a_bad_value_reported_once():
    data = spec(sweep="Bad", strategy=["blr", "lsr", "nope"], batch_size=[64, -1], seed=[0, 1, 2],
                dataset={"name": "cifar10", "fraction": [0.5, 3.0]})
    with pytest.raises(ConfigError) as info:
        load_grid(data)
    problems = info.value.problems
    assert len(problems) == len(set(problems))
    assert sum(p.startswith("batch_size[1]:") for p in problems) == 1  # 3 strategies x 3 seeds, reported once
    assert sum(p.startswith("strategy[2]:") for p in problems) == 1
    assert any(p.startswith("sweep:") for p in problems)
    assert any(p.startswith("dataset.fraction[1]:") for p in problems)


def test_too_many_cells_is_an_error():
    with pytest.raises(ConfigError, match=f"at most {MAX_CELLS}"):
        load_grid(spec(seed=list(range(400)), base_lr=[0.1 + i / 1000 for i in range(300)]))


def test_name_budget_grows_with_nodes_for_multi_node_backends():
    assert max_sweep_length("job", 1) == 42
    assert max_sweep_length("pytorchjob", 4) == 42 - len("-worker-2")
    assert max_sweep_length("pytorchjob", 1) == 42 - len("-master-0")  # the master pod's hostname
    assert max_sweep_length("trainjob", 16) == 42 - len("-node-0-15")
    long = "a" * 40
    load_grid(spec(sweep=long))
    with pytest.raises(ConfigError, match="sweep: 'a{40}' is 40 characters; at most 33"):
        load_grid(spec(sweep=long, resources={"nodes": 4}, backend="pytorchjob"))


@pytest.mark.parametrize("command", ["cells", "render"])
def test_bad_spec_on_the_command_line_exits_2_and_writes_nothing(command, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec(batch_size=[64, 100000], sweep="Bad_Sweep")))
    out_dir = tmp_path / "manifests"
    argv = [command, str(path)] + (["-o", str(out_dir)] if command == "render" else [])
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "batch_size[1]: 100000 is larger than the training set" in captured.err
    assert "sweep: 'Bad_Sweep' is not a DNS-1123 label" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_missing_file_and_unknown_preset(capsys):
    with pytest.raises(ConfigError, match="no file 'nope.yaml' and no preset"):
        load_grid("nope.yaml")
    with pytest.raises(ConfigError, match="no preset of that name; presets: "):
        load_grid("no-such-preset")


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("sweep: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_grid(str(path))


# ---- presets -----------------------------------------------------------------------------------------------


def test_presets_exist():
    assert len(preset_names()) >= 1


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_expands_and_validates(name):
    grid = load_grid(name)
    cells = grid.cells()
    assert cells and len({c.id for c in cells}) == len(cells)
    raw = grid.raw
    assert isinstance(raw.get("description"), str) and raw["description"].strip(), "a preset says what it is"


def test_cli_presets_and_cells(capsys):
    assert cli.main(["presets"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing] == preset_names()
    name = preset_names()[0]
    assert cli.main(["cells", name]) == 0
    lines = capsys.readouterr().out.splitlines()
    grid = load_grid(name)
    assert [line.split("\t")[0] for line in lines] == [c.id for c in grid.cells()]
    first = json.loads(lines[0].split("\t")[1])
    assert first["sweep"] == grid.sweep and first["batch_size"] == grid.cells()[0].batch_size


@pytest.mark.parametrize("changes", [
    {},
    {"dataset": [{"name": "mnist", "max_train": 50000}, {"name": "cifar10", "fraction": [0.5, 1.0]}],
     "optimizer": {"momentum": [0.0, 0.9]}, "model": "alexnet", "model_options": [{}, {"dropout": 0.3}],
     "epochs": [1, 2.5]},
])
def test_precomputed_ids_and_json_match_the_cells(changes):
    grid = load_grid(spec(seed=[0, 1], **changes))
    cells = grid.cells()
    assert grid.cell_ids() == [c.id for c in cells]
    assert grid.cell_jsons() == [json.dumps(c.to_dict(), sort_keys=True, separators=(",", ":")) for c in cells]
