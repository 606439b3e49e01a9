"""`critbatch demo --quick`: both sweeps end to end (train, analyze, report), as a new user runs them."""

from __future__ import annotations

import pytest

from critbatch.jobs.cli import main
from critbatch.jobs.local.demo import QUICK, SWEEPS, demo_grids
from critbatch.jobs.store import open_store


def test_quick_grids_are_reduced_versions_of_the_presets():
    full, quick = demo_grids(False), demo_grids(True)
    assert [g.sweep for g in full] == list(SWEEPS)
    assert [g.sweep for g in quick] == [f"{s}-quick" for s in SWEEPS]
    for f, q in zip(full, quick):
        assert len(q.cells()) < len(f.cells())
        assert {c.batch_size for c in q.cells()} == set(QUICK[f.sweep]["batch_size"])


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store_url = str(tmp_path / "out")
    assert main(["demo", "--quick", "--store", store_url]) == 0
    out = capsys.readouterr().out
    store = open_store(store_url)
    for sweep in ("mnist1d-cnn-blr-quick", "linreg-quick"):
        index = store.get_text(f"{sweep}/report/index.html")
        assert sweep in index
        assert store.exists(f"{sweep}/report/critical_batch_size.csv")
        assert f"report: {store_url}/{sweep}/report/index.html" in out
    lines = [line for line in out.splitlines() if "critical batch size" in line]
    assert [line.split(":")[0] for line in lines] == ["mnist1d-cnn-blr-quick", "linreg-quick"]
    # one critical batch size per problem, with its interval, or in words why there is none
    assert all(line.count("B_crit = ") + line.count("no fit") == 1 for line in lines)
    assert "B_crit = " in lines[1] and "analytic beta/lambda_1 - 1 =" in lines[1]
    # A second run finds every cell done and trains nothing.
    assert main(["demo", "--quick", "--store", store_url]) == 0
    assert "already done (their _SUCCESS exists): skipped" in capsys.readouterr().err
