"""The known-answer calibration (design section 7): a linreg oracle sweep, trained through `critbatch train`.

Over-parameterised least squares under Ma et al.'s oracle step has the
critical batch size m* = beta / lambda_1 + 1 (33.2 for the preset's data).
The analysis must recover it from the sweep's own speedup curve, within
+-30 %, with both estimates: McCandlish et al.'s fit (B_crit = beta/lambda_1 - 1
in theory, as k(m) ~ 1 / eta*(m)) and the batch size where the efficiency
falls to 0.5 (m0 + B_crit + m0 in theory).

The preset's budget is cut to 30 epochs and batch sizes from 4 (two seeds):
long enough that the default threshold lies past the first few steps of
full-batch descent, short enough to train in about half a minute.
"""

from __future__ import annotations

import json

import pytest

from critbatch.analysis.report import analyze, write_report
from critbatch.jobs.cli import main
from critbatch.jobs.sweep.grid import load_grid
from critbatch.jobs.store import open_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def linreg_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("linreg")
    raw = dict(load_grid("linreg").raw)
    raw.update({"sweep": "linreg-known-answer", "batch_size": [4, 8, 16, 32, 64, 128, 256, 512], "seed": [0, 1],
                "epochs": 30})
    grid = load_grid(raw)
    store_url = str(root / "store")
    store = open_store(store_url)
    store.put_text(f"{grid.sweep}/sweep.yaml", grid.sweep_yaml())
    for cell in grid.cells():
        code = main(["train", "--cell", json.dumps(cell.to_dict()), "--store", store_url, "--threads", "1",
                     "--progress", "none", "--data-root", str(root / "data")])
        assert code == 0
    derived = json.loads(store.get_text(f"{grid.sweep}/cells/{grid.cells()[0].id}/cell.json"))["derived"]
    analysis = analyze(store, [grid.sweep], bootstrap=300)
    return store, analysis, derived["beta"] / derived["lambda_1"] + 1


def test_critical_batch_size_matches_ma_bassily_belkin(linreg_sweep, cpu_env):
    _, analysis, m_star = linreg_sweep
    assert 25 < m_star < 45  # the preset's data: 512 samples, 1024 features, four spikes of variance 60
    (result,) = analysis.primary_results()
    s = result.summary
    assert s["threshold"] == "q25" and s["seeds"] == 2 and s["censored"] == ""
    assert s["b_crit_fit"] == pytest.approx(m_star, rel=0.30)
    assert s["b_crit_eff_interp"] == pytest.approx(m_star, rel=0.30)
    assert s["b_crit_eff"] == pytest.approx(m_star, rel=0.30)
    assert s["b_crit_fit_lo"] < s["b_crit_fit"] < s["b_crit_fit_hi"]
    # the regimes move forward: linear at the smallest batch sizes, stagnation at the largest
    regimes = [x["regime"] for x in result.per_m]
    assert regimes[0] == "linear" and regimes[-1] == "stagnation"
    assert regimes == sorted(regimes, key=["linear", "diminishing", "stagnation"].index)


def test_report_of_the_known_answer_sweep(linreg_sweep, cpu_env, capsys):
    store, analysis, _ = linreg_sweep
    key = write_report(store, analysis)
    html = store.get_text(key)
    assert "linreg-known-answer" in html and "oracle" in html
    table = store.get_text("linreg-known-answer/report/critical_batch_size.md")
    assert "linreg/linear/oracle" in table
    # regression has no accuracy: Table 2 reports the final test loss
    assert store.exists("linreg-known-answer/report/table2_test_accuracy.md")
