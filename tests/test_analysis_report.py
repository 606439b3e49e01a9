"""`critbatch analyze` end to end: the report, what it names when logs are damaged, local and S3 stores."""

from __future__ import annotations

import base64
import re
import shutil

import pytest

from critbatch.analysis.synthetic import GroupSpec, corrupt_part, remove_success, truncate_part, write_sweep
from critbatch.jobs.cli import main
from critbatch.jobs.cell.logschema import part_key
from critbatch.jobs.store import LocalStore, open_store
from critbatch.jobs.cell.layout import cell_prefix

MS = [16, 32, 64, 128, 256]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["analyze", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _links(html: str) -> list[str]:
    return re.findall(r'href="([^"]+)"', html)


@pytest.mark.slow
def test_report_is_self_contained_with_provenance(tmp_path, capsys):
    store = LocalStore(tmp_path / "store")
    truth = write_sweep(store, "sw", batch_sizes=MS, seeds=[0, 1], groups=[GroupSpec(b_noise=50.0)],
                        sweep_yaml="sweep: sw\nmodel: resnet34  # the grid as expanded\n")
    code, out, err = _run(capsys, "--store", str(tmp_path / "store"), "--sweep", "sw", "--bootstrap", "50",
                          "--output", str(tmp_path / "copy"))
    assert code == 0, err
    report = tmp_path / "store" / "sw" / "report"
    assert f"wrote" in out and str(report) in out
    html = (report / "index.html").read_text()
    # configuration and code version at the top, before the first figure
    top = html[: html.index("<figure")]
    assert "model: resnet34  # the grid as expanded" in top and "synthetic (10)" in top
    # links: relative, to files that exist beside it; images: inline PNG data URIs
    links = _links(html)
    assert links and all("/" not in href and (report / href).is_file() for href in links)
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(images) >= 5 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "<img" not in html.replace("<img src=\"data:image/png;base64,", "")  # no other image source
    # every figure drawn has its CSV; figures without data are listed as not in this sweep
    for name in ("fig1_train_loss_contours", "fig2_accuracy_linapprox", "speedup_efficiency",
                 "critical_batch_size", "time_to_threshold"):
        assert (report / f"{name}.png").is_file() and (report / f"{name}.csv").is_file()
    for name in ("fig2_speedup_strategies", "fig3_speedup_models", "fig3_speedup_datasets",
                 "fig4_speedup_fractions", "fig5_test_loss_contours"):
        assert not (report / f"{name}.png").exists()
        assert re.search(rf"Not in this sweep.*\({name}\)", html, re.S)
    # Table 2: the final accuracies as constructed, in percent
    table2 = (report / "table2_test_accuracy.md").read_text()
    for m in MS:
        acc = truth.find(batch_size=m, seed=0).test_metric
        assert f"| {m} | {100 * acc:.2f} |" in table2
    crit = (report / "critical_batch_size.csv").read_text()
    assert crit.startswith("group,threshold,eps,") and "b_simple" in crit
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(p.name for p in report.iterdir())
    assert "summary.md" in links


@pytest.mark.slow
def test_damaged_logs_are_skipped_and_named(tmp_path, capsys):
    root = tmp_path / "store"
    store = LocalStore(root)
    truth = write_sweep(store, "sw", batch_sizes=MS, seeds=[0], groups=[GroupSpec()], flush_steps=100,
                        diverge={(0, 256, 0): 30}, incomplete={(0, 128, 0): 40})
    corrupt_key = part_key(cell_prefix("sw", truth.find(batch_size=16).id), "steps", 3)
    truncated_key = part_key(cell_prefix("sw", truth.find(batch_size=32).id), "steps", 1)
    no_evals_key = part_key(cell_prefix("sw", truth.find(batch_size=64).id), "evals", 0)
    corrupt_part(store, corrupt_key)
    truncate_part(store, truncated_key)
    truncate_part(store, no_evals_key, keep=0.9)
    code, out, err = _run(capsys, "--store", str(root), "--sweep", "sw", "--bootstrap", "0")
    assert code == 0, err
    html = (root / "sw" / "report" / "index.html").read_text()
    summary = (root / "sw" / "report" / "summary.md").read_text()
    diverged, running = truth.find(batch_size=256), truth.find(batch_size=128)
    for text in (err, html, summary):
        assert corrupt_key in text and truncated_key in text and no_evals_key in text
        assert running.id in text  # no _SUCCESS: named as incomplete
    assert "corrupt or truncated" in err
    assert f"diverged at step 30" in html and "Incomplete cells" in html
    assert "without the group's training-loss curve" in html  # the cell whose only evals part is broken
    # the cell with a corrupt steps part still counts: its evaluations are intact
    cells = (root / "sw" / "report" / "cells.csv").read_text().splitlines()
    row = next(line for line in cells if truth.find(batch_size=16).id in line and ",q25," in line)
    assert ",reached," in row


def test_duplicate_parts_count_once(tmp_path, capsys):
    root = tmp_path / "store"
    store = LocalStore(root)
    truth = write_sweep(store, "sw", batch_sizes=[16, 64], groups=[GroupSpec()], train_evals=False,
                        flush_steps=100, minibatch_noise=0.0)
    prefix = cell_prefix("sw", truth.find(batch_size=16).id)
    # a resumed cell that re-uploaded part 2's rows as part 50 (rows identical: dedupe must not change results)
    store.put_bytes(part_key(prefix, "steps", 50), store.get_bytes(part_key(prefix, "steps", 2)))
    from critbatch.analysis.load import load_sweeps

    cell = next(c for c in load_sweeps(store, ["sw"]).cells if c.id == truth.find(batch_size=16).id)
    assert cell.duplicates == 100 and cell.last_step == truth.find(batch_size=16).last_step
    assert any("duplicate step rows" in n for n in cell.notes)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sweep", "nothing"], "--sweep nothing: no cells under"),
        (["--sweep", "sw", "--efficiency", "1.5"], "--efficiency: must be in (0, 1]"),
        (["--sweep", "sw", "--threshold", "-1"], "--threshold: must be a positive loss value"),
        (["--sweep", "sw", "--window", "0"], "--window: must be a positive number"),
        (["--sweep", "../sw"], "--sweep: '../sw' is not a sweep name"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv, message):
    root = tmp_path / "store"
    write_sweep(LocalStore(root), "sw", batch_sizes=[16, 32], epochs=0.1)
    code, _, err = _run(capsys, "--store", str(root), *argv)
    assert code == 2
    assert message in err
    assert not (root / "sw" / "report").exists()


@pytest.mark.slow
def test_several_sweeps_write_a_combined_report(tmp_path, capsys):
    root = tmp_path / "store"
    store = LocalStore(root)
    write_sweep(store, "a", batch_sizes=MS, groups=[GroupSpec(strategy="blr")], epochs=1)
    write_sweep(store, "b", batch_sizes=MS, groups=[GroupSpec(strategy="lsr")], epochs=1)
    assert _run(capsys, "--store", str(root), "--sweep", "a", "--bootstrap", "0")[0] == 0
    code, out, err = _run(capsys, "--store", str(root), "--sweep", "a", "--sweep", "b", "--bootstrap", "0")
    assert code == 0, err
    combined = root / "a" / "report" / "with-b"
    assert str(combined) in out
    # BLR from one sweep beside LSR from the other: Fig. 2 left and Fig. 5 exist only together
    assert (combined / "fig2_speedup_strategies.png").is_file()
    assert (combined / "fig5_test_loss_contours.png").is_file()
    assert not (root / "a" / "report" / "fig2_speedup_strategies.png").exists()
    assert (root / "a" / "report" / "index.html").is_file()  # the single-sweep report is still there
    assert not (root / "b" / "report").exists()


@pytest.mark.slow
@pytest.mark.s3
def test_s3_store_end_to_end(s3_url, tmp_path, capsys):
    store = open_store(s3_url)
    truth = write_sweep(store, "sw", batch_sizes=[16, 64, 256], seeds=[0, 1], groups=[GroupSpec()], epochs=1,
                        flush_steps=1000)
    corrupt_part(store, part_key(cell_prefix("sw", truth.cells[0].id), "steps", 0))
    code, out, err = _run(capsys, "--store", s3_url, "--sweep", "sw", "--bootstrap", "20",
                          "--output", str(tmp_path / "copy"))
    assert code == 0, err
    assert f"{s3_url}/sw/report/" in out
    keys = store.list("sw/report/")
    assert "sw/report/index.html" in keys and "sw/report/critical_batch_size.csv" in keys
    html = store.get_text("sw/report/index.html")
    assert all(f"sw/report/{href}" in keys for href in _links(html))
    assert part_key(cell_prefix("sw", truth.cells[0].id), "steps", 0) in html
    assert (tmp_path / "copy" / "index.html").read_text() == html
    shutil.rmtree(tmp_path / "copy")


def test_process_pool_loads_the_same_as_threads(tmp_path):
    from critbatch.analysis.load import load_sweeps

    store = LocalStore(tmp_path / "store")
    write_sweep(store, "sw", batch_sizes=[16, 64], seeds=[0, 1], groups=[GroupSpec(b_noise=30.0)], epochs=0.5)
    threads = load_sweeps(store, ["sw"], processes=False)
    procs = load_sweeps(store, ["sw"], processes=True, workers=2)
    assert [c.id for c in threads.cells] == [c.id for c in procs.cells]
    for a, b in zip(threads.cells, procs.cells):
        assert (a.noise.sums == b.noise.sums).all() and len(a.noise) == len(b.noise) > 0
        assert (a.train_eval.values == b.train_eval.values).all()
        assert (a.running_mean.values == b.running_mean.values).all()


def test_sweep_yaml_with_expanded_cells_shows_the_spec_first():
    from critbatch.analysis.report import _spec_text

    text = "spec:\n  sweep: sw\n  batch_size: [8, 16]\ncells:\n- id: abc\n  cell: {batch_size: 8}\n"
    spec, full = _spec_text(text)
    assert spec.startswith("sweep: sw\nbatch_size: [8, 16]") and "cells" not in spec
    assert full == text
    assert _spec_text("sweep: sw\n") == ("sweep: sw\n", None)
    assert _spec_text(None) == (None, None)
