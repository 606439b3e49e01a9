"""`critbatch import shallue`: Shallue et al.'s released layout, written small by the test, through the analysis."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from critbatch.analysis.report import analyze
from critbatch.jobs.cli import main
from critbatch.jobs.store import LocalStore

B_CRIT, TAU0 = 96.0, 40.0
BATCH_SIZES = [8, 16, 32, 64, 128, 256, 512, 1024]
LRS = [0.01, 0.03, 0.1, 0.3]  # the trials of each study; the best is 0.1 at m < 128, 0.3 above


def _write_trial(study_dir, trial_id, status, lr, m, steps, loss, columns=("train/cross_entropy_error",)):
    d = study_dir / str(trial_id)
    d.mkdir(parents=True)
    (d / "metadata.json").write_text(json.dumps({
        "_internal_study_name": "x", "_internal_trial_id": trial_id, "status": status, "trial_id": trial_id,
        "steps": int(steps[-1]), "parameters": {"learning_rate": lr, "momentum": 0.9, "label_smoothing": 0.01}}))
    with open(d / "measurements.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", *columns, "test/cross_entropy_error"])
        for s, v in zip(steps, loss):
            w.writerow([int(s), *([v] * len(columns)), v + 0.1])


@pytest.fixture
def tree(tmp_path):
    """One workload: per batch size a study of four learning rates, plus an INFEASIBLE and an INCOMPLETE trial.

    Trial loss 2 exp(-step / tau), tau = TAU0 (1 + B/m) x a penalty away from the best learning rate x a
    +-4 % factor per study (the scatter the one-seed interval is made of).
    """
    root = tmp_path / "batch_science"
    rng = np.random.default_rng(7)
    for m in BATCH_SIZES:
        study = root / "cifar_10" / "resnet_8" / "nesterov_momentum" / str(m)
        study.mkdir(parents=True)
        budget = int(TAU0 * (1 + B_CRIT / m) * 6)
        (study / "study.json").write_text(json.dumps({
            "batch_size": m, "dataset": "cifar_10", "model": "resnet_8", "optimizer": "nesterov_momentum",
            "early_stopping": False, "train_steps": budget, "parameter_configs": {}}))
        steps = np.unique(np.round(np.geomspace(1, budget, 40)).astype(int))
        steps = np.concatenate([[0], steps])
        best = 0.1 if m < 128 else 0.3
        scatter = math.exp(0.04 * rng.standard_normal())
        for i, lr in enumerate(LRS):
            tau = TAU0 * (1 + B_CRIT / m) * (1 + abs(math.log10(lr / best))) * scatter
            _write_trial(study, i, "COMPLETE", lr, m, steps, 2 * np.exp(-steps / tau))
        loss = 2 * np.exp(-steps / (TAU0 * (1 + B_CRIT / m) / 3))
        loss[len(loss) // 2:] = np.nan  # diverged half way: it must not win
        _write_trial(study, 10, "INFEASIBLE", 3.0, m, steps, loss)
        _write_trial(study, 11, "INCOMPLETE", 0.05, m, steps[:5], 2 * np.exp(-steps[:5] / 1e4))
    return root


@pytest.mark.slow
def test_import_then_fit_recovers_the_critical_batch_size(tree, tmp_path, capsys):
    store_dir = tmp_path / "store"
    assert main(["import", "shallue", str(tree), "--store", str(store_dir), "--sweep", "shallue"]) == 0
    out = capsys.readouterr().out
    assert "cifar_10/resnet_8/nesterov_momentum: batch sizes 8 16 32 64 128 256 512 1024" in out
    assert f"{len(BATCH_SIZES) * 6} trials" in out
    store = LocalStore(store_dir)
    a = analyze(store, ["shallue"], thresholds=[0.05], bootstrap=0)
    assert len(a.groups) == 1
    g = a.groups[0]
    assert g.label.startswith("cifar_10/resnet_8/tuned") and g.trial_fields == ("base_lr",)
    assert {c.status for c in g.cells} == {"done", "diverged", "incomplete"}
    r = next(x for x in a.results if x.threshold == "eps=0.05")
    # steps-to-result: per batch size the best learning rate of the search wins
    assert [x["trial"] for x in r.per_m] == [f"base_lr={0.1 if m < 128 else 0.3:g}" for m in BATCH_SIZES]
    s = r.summary
    assert s["b_crit"] == pytest.approx(B_CRIT, rel=0.10)
    assert s["b_crit_lo"] <= B_CRIT <= s["b_crit_hi"]
    assert "one seed" in s["fit_method"]
    cell = json.loads(next(store_dir.rglob("cell.json")).read_text())
    assert cell["derived"]["imported_from"] == "shallue2018" and "label_smoothing" in cell["derived"]["parameters"]


def test_trials_without_the_curve_are_skipped_and_named(tree, tmp_path, capsys):
    study = tree / "cifar_10" / "resnet_8" / "nesterov_momentum" / "8"
    _write_trial(study, 20, "COMPLETE", 0.1, 8, np.array([0, 10]), [2.0, 1.0], columns=("train/other",))
    assert main(["import", "shallue", str(tree), "--store", str(tmp_path / "s"), "--sweep", "x",
                 "--workload", "cifar_10/*"]) == 0
    err = capsys.readouterr().err
    assert "skipped cifar_10/resnet_8/nesterov_momentum/8/20: measurements.csv has no column " \
           "'train/cross_entropy_error'" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{tmp}/nowhere"], "is not a directory"),
        (["{tree}", "--workload", "mnist/*"], "--workload: no workload under"),
        (["{tree}", "--curve", "val/error"], "no usable trial"),
        (["{tree}/cifar_10/resnet_8/nesterov_momentum/8/0"], "no study.json under"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tree, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, tree=tree) for a in argv]
    code = main(["import", "shallue", *argv, "--store", str(tmp_path / "store"), "--sweep", "x"])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
