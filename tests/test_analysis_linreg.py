"""The known-answer calibration (design section 7): a linreg oracle sweep, trained through `critbatch train`.

Over-parameterised least squares under Ma et al.'s oracle step has the
critical batch size m* = beta / lambda_1 + 1 (33-34 for the preset's data,
which follows from the seed). The oracle step makes k(m) proportional to
1 / eta*(m) = (beta + (m - 1) lambda_1) / m = lambda_1 (1 + (beta/lambda_1 - 1)/m),
so McCandlish et al.'s fit must give B_crit = beta/lambda_1 - 1 within 10 %,
and the batch size where the efficiency from m0 falls to 0.5 must be
(m0 + B)/0.5 - B = B + 2 m0 within 10 %. That still reads back the oracle's
schedule; tests/test_analysis_linreg_grid.py lets the critical batch size
emerge from a learning-rate search instead.

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
    analysis = analyze(store, [grid.sweep], bootstrap=300)
    seeds = {}
    for cell in grid.cells():
        d = json.loads(store.get_text(f"{grid.sweep}/cells/{cell.id}/cell.json"))["derived"]
        seeds[cell.seed] = d["beta"] / d["lambda_1"] + 1
    return store, analysis, sum(seeds.values()) / len(seeds)


def test_critical_batch_size_matches_ma_bassily_belkin(linreg_sweep, cpu_env):
    _, analysis, m_star = linreg_sweep
    assert 30 < m_star < 37  # the preset's data: 512 samples, 1024 features, four spikes of variance 60
    (result,) = analysis.primary_results()
    s = result.summary
    assert s["threshold"] == "q25" and s["seeds"] == 2 and s["censored"] == "" and s["m0"] == 4
    b = m_star - 2  # beta / lambda_1 - 1
    assert s["b_crit"] == pytest.approx(b, rel=0.10)
    assert s["b_crit_lo"] < s["b_crit"] < s["b_crit_hi"]
    assert s["m_eff_interp"] == pytest.approx(b + 2 * s["m0"], rel=0.10)
    assert s["m_eff_implied_b"] == pytest.approx(b, rel=0.10)
    # the regimes move forward: linear at the smallest batch sizes, stagnation at the largest
    regimes = [x["regime"] for x in result.per_m]
    assert regimes[0] == "linear" and regimes[-1] == "stagnation"
    assert regimes == sorted(regimes, key=["linear", "diminishing", "stagnation"].index)


def test_noise_scale_beside_the_fit_along_the_run(linreg_sweep, cpu_env):
    """B_simple(eps) is resolved and steady past the first quartile of the run; on this data it is an order
    of magnitude above B_crit (tr(Sigma)/|G|^2 ignores the Hessian, whose four spikes dominate here)."""
    _, analysis, m_star = linreg_sweep
    along = {r.threshold: r.summary for r in analysis.results}
    assert set(along) == {"q75", "q50", "q25", "q10"}
    late = [along[t] for t in ("q50", "q25", "q10")]
    assert all(not s["b_simple_bound"] and s["b_simple_cells"] == 16 for s in late)
    values = [s["b_simple"] for s in late]
    assert max(values) / min(values) < 1.5 and min(values) > 5 * m_star
    assert all(s["b_crit"] == pytest.approx(m_star - 2, rel=0.15) for s in late)


def test_report_of_the_known_answer_sweep(linreg_sweep, cpu_env, capsys):
    store, analysis, _ = linreg_sweep
    key = write_report(store, analysis)
    html = store.get_text(key)
    assert "linreg-known-answer" in html and "oracle" in html
    table = store.get_text("linreg-known-answer/report/critical_batch_size.md")
    assert "linreg/linear/oracle" in table
    # the answer first: the box before the first figure, the methods after the last
    start = html.index('<section class="answer">')
    box = html[start:html.index("</section>", start)]
    assert html.index('<section class="answer">') < html.index("<figure")
    assert "B_crit = " in box and "95 % interval" in box and "doubling the batch size" in box
    assert html.index("Methods and definitions") > html.rindex("<figure")
    assert store.exists("linreg-known-answer/report/b_crit_vs_b_simple.png")
    assert store.exists("linreg-known-answer/report/steps_examples_tradeoff.png")
    # regression has no accuracy: Table 2 reports the final test loss
    assert store.exists("linreg-known-answer/report/table2_test_accuracy.md")
