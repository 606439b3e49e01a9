"""The known answer without the oracle: linreg under a learning rate searched per batch size (the best trial wins).

Under the oracle step eta*(m) the steps to threshold are 1/eta*(m) by
construction (tests/test_analysis_linreg.py). Here every batch size gets the
same grid of constant learning rates (preset ``linreg-lr-grid``, one seed),
the analysis keeps each batch size's fastest trial (Shallue et al.'s steps-
to-result), and the critical batch size comes out of training: it must agree
with Ma, Bassily and Belkin's m* = beta / lambda_1 + 1 within 20 %. Read late
in the run (threshold q10), where the asymptotic rate their analysis bounds
dominates (measured: 37 [30, 46] against m* = 33.2); early thresholds see
the four spiked directions, which larger batches keep speeding up (B_crit is
about 80 at q75 and q50).
"""

from __future__ import annotations

import json

import pytest

from critbatch.analysis.report import analyze
from critbatch.jobs.cli import main
from critbatch.jobs.store import open_store
from critbatch.jobs.sweep.grid import load_grid

pytestmark = pytest.mark.slow


def test_critical_batch_size_emerges_from_a_learning_rate_search(tmp_path, cpu_env):
    grid = load_grid("linreg-lr-grid")
    store_url = str(tmp_path / "store")
    store = open_store(store_url)
    store.put_text(f"{grid.sweep}/sweep.yaml", grid.sweep_yaml())
    for cell in grid.cells():
        assert main(["train", "--cell", cell.to_json(), "--store", store_url, "--threads", "1",
                     "--progress", "none", "--data-root", str(tmp_path / "data")]) == 0
    derived = json.loads(store.get_text(f"{grid.sweep}/cells/{grid.cells()[0].id}/cell.json"))["derived"]
    m_star = derived["beta"] / derived["lambda_1"] + 1
    a = analyze(store, [grid.sweep], bootstrap=0)
    late = next(r for r in a.results if r.threshold == "q10")
    s = late.summary
    assert s["censored"] == "" and s["fit_problem"] == ""
    # the grid's fastest rate grows with m until the full batch's stability limit, then stays there
    winners = [float(x["trial"].split("=")[1]) for x in late.per_m]
    assert winners == sorted(winners) and winners[0] < winners[-1]
    assert s["b_crit"] == pytest.approx(m_star, rel=0.20)
    assert s["b_crit_lo"] < m_star < s["b_crit_hi"]
