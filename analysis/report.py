"""The report: ``critbatch analyze`` (also what the analysis Job runs).

    critbatch analyze --store ./critbatch-out --sweep digits-blr
    critbatch analyze --store s3://critbatch/runs --sweep cifar10-resnet34 --threshold 0.05 --bootstrap 2000
    critbatch analyze --store s3://critbatch/runs --sweep a --sweep b --output ./report-a-b

Load (analysis.load), compute (analysis.compute), plot (analysis.plots), then
write ``index.html`` (self-contained: figures inline as data URIs, tables
inline, links only to the files beside it), the PNGs, CSVs and
``summary.md`` to ``<store>/<sweep>/report/``. Several sweeps analysed
together write to ``<first sweep>/report/with-<second>+<third>.../`` so each
sweep's own report stays as it was.
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime as dt
import html
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jinja2
import yaml

from . import branches, compute, plots, ramp, searched
from .compute import CurveResult, Group
from .audit import audit as audit_sweep
from .fit import MEASURED_COVERAGE, MEASURED_REAL_COVERAGE, SEED_SCATTER_FLOOR
from .load import INCOMPLETE, Loaded, load_sweeps
from .plots import Artifact, fmt
from critbatch.jobs.cell.version import code_version
from critbatch.jobs.cell.errors import ConfigError, ExitCode
from critbatch.jobs.cell.inputs import output_dir
from critbatch.jobs.store import S3Store, Store, open_store
from critbatch.jobs.cell.layout import report_prefix, sweep_problem


@dataclass
class Analysis:
    """Everything computed from the loaded sweeps (no I/O)."""

    loaded: Loaded
    groups: list[Group]
    thresholds: compute.Table
    crossings: compute.Table
    results: list[CurveResult]  # every group x threshold that has a speedup curve
    primary: str  # the threshold the figures use
    final: compute.Table
    artifacts: list[Artifact] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    searches: dict[str, dict] = field(default_factory=dict)  # sweep -> its search.json, for a searched sweep
    branches: list[branches.BranchPoint] = field(default_factory=list)  # the branch cells, per base and point

    def primary_results(self) -> list[CurveResult]:
        return [r for r in self.results if r.threshold == self.primary]


def validate_options(thresholds: list[float] | None, efficiency: float, bootstrap: int, window: int,
                     sweeps: list[str] = (), seed_noise: float = SEED_SCATTER_FLOOR,
                     tolerance: float = branches.DEFAULT_TOLERANCE) -> None:
    problems = []
    problems.extend(f"--sweep: {problem}" for problem in map(sweep_problem, sweeps) if problem)
    for eps in thresholds or []:
        if not (math.isfinite(eps) and eps > 0):
            problems.append(f"--threshold: must be a positive loss value, got {eps}")
    if not (0 < efficiency <= 1):
        problems.append(f"--efficiency: must be in (0, 1], got {efficiency}")
    if bootstrap < 0:
        problems.append(f"--bootstrap: must be >= 0 (0: no intervals), got {bootstrap}")
    if window < 1:
        problems.append(f"--window: must be a positive number of steps, got {window}")
    if not (0 <= seed_noise <= 2):
        problems.append(f"--seed-noise: must be a scatter of log k in [0, 2] (0: none assumed), got {seed_noise}")
    if not (0 < tolerance < 1):
        problems.append(f"--tolerance: must be a relative loss difference in (0, 1), got {tolerance}")
    if problems:
        raise ConfigError(problems)


def compute_all(loaded: Loaded, *, thresholds: list[float] | None = None, efficiency: float = 0.5,
                bootstrap: int = 1000, seed_noise: float = SEED_SCATTER_FLOOR,
                tolerance: float = branches.DEFAULT_TOLERANCE) -> Analysis:
    """Compute step: groups, thresholds, speedup curves, critical batch sizes, final metrics; the branch
    cells apart (the critical batch size over training, analysis.branches)."""
    explicit = list(thresholds or [])
    groups = compute.group_cells(loaded.cells)
    thr, crossings = compute.steps_to_threshold(groups, explicit)
    primary = f"eps={explicit[0]:g}" if explicit else compute.DEFAULT_THRESHOLD
    results = []
    for t in thr:
        if not math.isfinite(t["eps"]):
            continue
        g = next(g for g in groups if g.label == t["group"])
        r = compute.speedup_curve(g, t["threshold"], t["eps"], crossings, level=efficiency, bootstrap=bootstrap,
                                  seed_noise=seed_noise)
        if r.per_m:
            results.append(r)
    final = compute.final_metrics(groups)
    points = branches.branch_points(loaded.cells, tolerance=tolerance, seed_noise=seed_noise)
    for p in points:  # a grid on the same problem: its headline B_crit beside the local ones
        p.global_b = next((r.fit.b_crit for r in results if r.threshold == primary and r.fit.ok and
                           branches.same_problem(r.group.cells[0].cell, p.cell)), None)
    settings = {"efficiency": efficiency, "bootstrap": bootstrap, "window": loaded.window, "seed_noise": seed_noise,
                "thresholds": explicit, "bootstrap_seed": compute.BOOTSTRAP_SEED, "tolerance": tolerance}
    return Analysis(loaded, groups, thr, crossings, results, primary, final, settings=settings, branches=points)


def make_artifacts(a: Analysis) -> list[Artifact]:
    """Plot step: every figure and table of the report."""
    primary = {r.group.label: r for r in a.primary_results()}
    trials = {label: {x["batch_size"]: x["trial"] for x in r.per_m} for label, r in primary.items()}
    jobs: list[Callable[[], Artifact]] = [
        lambda: plots.train_contour_figure(a.groups, trials),
        lambda: plots.speedup_family_figure(
            "fig2_speedup_strategies", "Fig. 2 left: speedup per learning-rate strategy",
            "Speedup s(m; m0) per strategy with the ideal linear line, one panel per problem; the strategies "
            "of a problem share one threshold (the default rule applied to all their cells), so their curves "
            "compare; bands: 95 % bootstrap interval over seeds; open triangles: upper bounds of batch sizes "
            "that never reached the threshold.", "strategy", a.groups, primary, "strategy"),
        lambda: plots.accuracy_linapprox_figure(a.groups, a.final),
        lambda: plots.speedup_family_figure(
            "fig3_speedup_models", "Fig. 3 left: speedup across models",
            "Speedup curves of models trained on the same data with the same strategy.", "model", a.groups,
            primary, "model"),
        lambda: plots.speedup_family_figure(
            "fig3_speedup_datasets", "Fig. 3 right: speedup across datasets",
            "Speedup curves of one model on different datasets (same strategy).", "dataset", a.groups, primary,
            "dataset.name"),
        lambda: plots.speedup_family_figure(
            "fig4_speedup_fractions", "Fig. 4: speedup across dataset fractions",
            "Speedup curves of one model trained on fractions of the training set; each curve's threshold is "
            "the lower quartile of its own largest batch size's losses (unless given explicitly).", "fraction",
            a.groups, primary, "dataset.fraction"),
        lambda: plots.test_contour_figure(a.groups, trials),
        lambda: plots.table2(a.groups, a.final),
        lambda: plots.speedup_efficiency_figure(a.primary_results()),
        lambda: plots.critical_table(sorted(a.results, key=lambda r: r.threshold != a.primary)),
        lambda: plots.noise_scale_figure(a.results),
        lambda: plots.tradeoff_figure(a.primary_results()),
        lambda: plots.time_figure(a.primary_results()),
        lambda: plots.branches_figure(a.branches),
        lambda: ramp.ramp_table(a.loaded.cells, a.settings["thresholds"]),
    ]
    # One after the other: matplotlib does not promise thread safety, and the GIL would serialise it anyway.
    return [job() for job in jobs]


def analyze(store: Store, sweeps: list[str], *, thresholds: list[float] | None = None, efficiency: float = 0.5,
            bootstrap: int = 1000, window: int = 50, workers: int | None = None,
            warn: Callable[[str], None] | None = None, seed_noise: float = SEED_SCATTER_FLOOR,
            tolerance: float = branches.DEFAULT_TOLERANCE) -> Analysis:
    """Load, compute and plot; returns the analysis with its artifacts (nothing is written)."""
    sweeps = list(dict.fromkeys(sweeps))  # a sweep named twice is analysed once
    validate_options(thresholds, efficiency, bootstrap, window, sweeps, seed_noise, tolerance)
    loaded = load_sweeps(store, sweeps, window=window, workers=workers, warn=warn)
    searches = {s: doc for s in sweeps if (doc := searched.read_search(store, s)) is not None}
    if not thresholds:  # a searched sweep's headline is at the eps its search stopped its cells at
        thresholds = [eps for doc in searches.values() if (eps := searched.explicit_eps(doc)) is not None][:1] or None
    a = compute_all(loaded, thresholds=thresholds, efficiency=efficiency, bootstrap=bootstrap, seed_noise=seed_noise,
                    tolerance=tolerance)
    a.searches = searches
    a.artifacts = make_artifacts(a)
    return a


def report_location(sweeps: list[str]) -> str:
    """``<sweep>/report`` for one sweep; ``<first>/report/with-<second>+...`` for several."""
    base = report_prefix(sweeps[0])
    return base if len(sweeps) == 1 else f"{base}/with-{'+'.join(sweeps[1:])}"


def render_files(a: Analysis, *, store_url: str) -> dict[str, bytes]:
    """The report's files by name: index.html, summary.md, PNGs, CSVs, Markdown tables."""
    files: dict[str, bytes] = {}
    for art in a.artifacts:
        if art.missing:
            continue
        if art.png:
            files[f"{art.name}.png"] = art.png
        files[f"{art.name}.csv"] = art.csv_bytes()
        if art.markdown:
            files[f"{art.name}.md"] = art.markdown.encode()
    files["speedup.csv"] = plots.table_csv([x for r in a.results for x in r.per_m],
                                           ["group", "threshold", "eps", "batch_size", "trial", "trials", "seeds",
                                            "seeds_reached", "k_mean", "k_sd", "censored", "k_lower_bound",
                                            "speedup", "speedup_lo", "speedup_hi", "ideal", "efficiency", "regime",
                                            "fit_k", "wall_s", "samples", "tokens"])
    files["thresholds.csv"] = plots.table_csv(a.thresholds)
    files["cells.csv"] = plots.table_csv(a.crossings)
    files["final_metrics.csv"] = plots.table_csv(a.final, plots.FINAL_COLUMNS)
    ctx = _context(a, store_url, sorted(files) + ["summary.md"])
    files["summary.md"] = _summary_md(a, ctx).encode()
    ctx["files"] = sorted(files)
    files["index.html"] = _TEMPLATE.render(**ctx).encode()
    return files


def write_report(store: Store, a: Analysis, *, output: str | None = None,
                 log: Callable[[str], None] = print) -> str:
    """Write the report to the store (and ``output``); returns the key of index.html."""
    prefix = report_location(a.loaded.sweeps)
    files = render_files(a, store_url=store.url)
    # Old files of a previous report that this one does not produce would be stale: remove them
    # (only direct children, so combined reports in subfolders stay).
    for key in store.list(prefix + "/"):
        rest = key[len(prefix) + 1:]
        if "/" not in rest and rest not in files:
            store.delete(key)
    workers = 16 if isinstance(store, S3Store) else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda item: store.put_bytes(f"{prefix}/{item[0]}", item[1]), sorted(files.items())))
    log(f"critbatch analyze: wrote {len(files)} files to {store.join(prefix)}/")
    if output:
        out = Path(output).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (out / name).write_bytes(data)
        log(f"critbatch analyze: copied the report to {out}/")
    log(f"critbatch analyze: open {store.join(prefix + '/index.html')}")
    return f"{prefix}/index.html"


def cli_analyze(args: argparse.Namespace) -> int:
    """``critbatch analyze``: the report of one or several sweeps."""
    if args.output:
        output_dir(args.output, "--output")  # before the work, not after the report is in the store
    store = open_store(args.store)
    store.check()

    def warn(line: str) -> None:
        print(f"critbatch analyze: warning: {line}", file=sys.stderr)

    a = analyze(store, list(args.sweep), thresholds=args.threshold, efficiency=args.efficiency,
                bootstrap=args.bootstrap, window=args.window, warn=warn, seed_noise=args.seed_noise,
                tolerance=args.tolerance)
    for c in a.loaded.incomplete:
        warn(f"cell {c.sweep}/{c.id} (m={c.batch_size}, seed={c.seed}) has no _SUCCESS: incomplete, "
             f"{c.last_step} steps logged")
    checked = audit_sweep(a.loaded)
    for finding in checked.findings:
        if finding.kind != "unfinished":  # said just above
            warn(finding.line())
    print(f"critbatch analyze: {checked.headline()}", file=sys.stderr)
    write_report(store, a, output=args.output)
    if args.strict and not checked.complete:
        print(f"critbatch analyze: --strict: exit {ExitCode.INCOMPLETE}, the sweep is incomplete", file=sys.stderr)
        return ExitCode.INCOMPLETE
    return 0


# ---- rendering -------------------------------------------------------------------------------

def _context(a: Analysis, store_url: str, files: list[str]) -> dict:
    cells = a.loaded.cells
    status = collections.Counter(c.status for c in cells)
    versions = collections.Counter(c.code_version for c in cells)
    primary = a.primary_results()
    figures = []
    for art in a.artifacts:
        figures.append({
            "name": art.name, "title": art.title, "caption": art.caption, "missing": art.missing,
            "img": "data:image/png;base64," + base64.b64encode(art.png).decode() if art.png else None,
            "csv": f"{art.name}.csv" if not art.missing and f"{art.name}.csv" in files else None,
            "png": f"{art.name}.png" if art.png else None,
            "md": f"{art.name}.md" if art.markdown else None,
            "table": _md_to_html(art.markdown) if art.markdown and not art.missing else None,
        })
    groups = []
    for g in a.groups:
        r = next((x for x in primary if x.group is g), None)
        thr = next((t for t in a.thresholds if t["group"] == g.label and t["threshold"] == a.primary), None)
        groups.append({
            "label": g.label, "cells": len(g.cells), "seeds": " ".join(map(str, g.seeds)),
            "batch_sizes": " ".join(map(str, g.batch_sizes)),
            "source": _source_text(g.source, a.loaded.window),
            "trials": ", ".join(g.trial_fields) or "one value",
            "eps": fmt(thr["eps"]) if thr else "–",
            "eps_from": thr.get("from_batch_size") if thr else None,
            "eps_shared": thr.get("shared_with", "") if thr else "",
            "provisional": bool(thr and thr.get("provisional")),
            "rows": [{k: (fmt(v) if not isinstance(v, str) else v) for k, v in x.items()} for x in r.per_m]
            if r else [],
        })
    diverged = [c for c in cells if c.status == "diverged"]
    nodata = [r for r in a.crossings if r["threshold"] == a.primary and r["use"] == "no data"]
    near = [t for t in a.thresholds if t["near_initial"]]
    return {
        "title": "critbatch report: " + ", ".join(a.loaded.sweeps),
        "sweeps": a.loaded.sweeps,
        "store": store_url,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "analysis_version": code_version(),
        "cell_versions": sorted(versions.items()),
        "status": {k: status.get(k, 0) for k in ("done", "reached", "diverged", INCOMPLETE)},
        "ncells": len(cells),
        "sweep_yaml": [(s, *_spec_text(a.loaded.sweep_yaml.get(s))) for s in a.loaded.sweeps],
        "settings": a.settings,
        "primary": a.primary,
        "window": a.loaded.window,
        "figures": figures,
        "missing": [f for f in figures if f["missing"]],
        "groups": groups,
        "skipped": a.loaded.skipped,
        "incomplete": [c for c in cells if c.status == INCOMPLETE],
        "diverged": diverged,
        "nodata": nodata,
        "near": [{**t, "eps_text": fmt(t["eps"]), "initial_text": fmt(t["initial_loss"])} for t in near],
        "notes": [(c, n) for c in cells for n in c.notes],
        "files": files,
        "definitions": _DEFINITIONS.format(window=a.loaded.window, level=a.settings["efficiency"],
                                           bootstrap=a.settings["bootstrap"], coverage=_coverage_text(),
                                           seed_noise=a.settings["seed_noise"],
                                           real_coverage=_real_coverage_text()),
        "answers": answers(a),
        "over_training": over_training(a),
        "ramps": ramps(a),
        "search": [searched.section(s, doc, _grid_cells(a.loaded.sweep_yaml.get(s))) for s, doc in a.searches.items()],
        "audit": _audit_context(a),
    }


def _audit_context(a: Analysis) -> dict:
    checked = audit_sweep(a.loaded)
    return {"complete": checked.complete, "headline": checked.headline(),
            "findings": [f.line() for f in checked.findings]}


def _grid_cells(text: str | None) -> list[dict] | None:
    """The cells sweep.yaml lists ({id, cell}), or None without a readable one."""
    try:
        doc = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return None
    return doc.get("cells") if isinstance(doc, dict) and isinstance(doc.get("cells"), list) else None


def _spec_text(text: str | None) -> tuple[str | None, str | None]:
    """(the grid spec as written, the whole sweep.yaml): a sweep.yaml holding ``spec`` and every expanded
    cell shows the spec at the top and the cells folded away."""
    if not text:
        return None, None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return text, None
    if isinstance(doc, dict) and isinstance(doc.get("spec"), dict):
        return yaml.safe_dump(doc["spec"], sort_keys=False, default_flow_style=None, width=110), text
    return text, None


def _source_text(source: str, window: int) -> str:
    if source == "train_eval":
        return "train-split evaluations"
    return f"running mean of minibatch losses over {window} steps"


_DEFINITIONS = (
    "Training-loss curve: the train-split evaluations when at least half the group's cells have them (cells "
    "without have no curve), else the running mean of minibatch losses over min({window} steps, a quarter of the "
    "steps so far), placed at the centre of its window (no lag). k(m; eps): first step where the curve is <= eps, "
    "interpolated in log(loss) between the bracketing logged points. Default threshold (q25, paper 4.3): lower "
    "quartile of the loss values over the run of the largest batch size that finished and learned (last loss "
    "below 90 % of the first), evenly weighted in iterations, seeds and trials pooled; the strategies of one "
    "problem share it (the rule applied to all their cells), so their speedups compare. Thresholds along the run: "
    "the same rule at the 75th, 50th and 10th percentile. k(m): geometric mean over the seeds of the winning trial "
    "(fewest mean steps); seeds that never reached eps enter as bounds (a batch size none of whose seeds reached "
    "eps is censored). Speedup s = k(m0)/k(m), m0 the smallest batch size that reached eps; efficiency "
    "e = s m0/m. Regimes: linear while e >= 0.8, stagnation from the first doubling that gains < 10 %, "
    "diminishing returns between. Critical batch size B_crit: McCandlish et al.'s k(m) = S_min (1 + B_crit/m), "
    "B_crit >= 0, fitted in log space by maximum likelihood with every seed one observation and seeds that never "
    "reached eps as censored (Tobit) terms; E_min = S_min B_crit samples. Its 95 % interval: profile likelihood, "
    "cut at n log(1 + F(1, n-2)/(n-2)) (the small-sample calibration of a Gaussian regression). With several "
    "seeds per batch size the scatter is measured from them; with one seed it cannot be (a few uncensored batch "
    "sizes fix S_min and B_crit and leave the scatter near 0), so the fit assumes at least the seed-to-seed "
    "scatter of log k measured on real training, {seed_noise:g} (--seed-noise; docs/seed-noise.md), and calls "
    "the interval indicative. Measured coverage of that interval on synthetic "
    "sweeps (15 % lognormal seed noise, the largest batch sizes censored by the budget): {coverage}; "
    "leave-one-seed-out on eight seeds of real training: {real_coverage}. "
    "'m at e = {level:g}, from m0': the batch size where the efficiency falls to {level:g}, interpolated in log m; "
    "under the model it is (m0 + B_crit)/{level:g} - B_crit, so it depends on m0, and the B_crit it implies is "
    "shown beside it. Zhang et al.'s batch size: 20 % more steps than perfect scaling from m0, 1.2 m0 + "
    "0.2 B_crit from the fit. B_simple(eps): tr(Sigma)/|G|^2 from the two-batch estimator with the finite-"
    "population correction, as a ratio of sums over a window ending where each cell crosses eps (the last half of "
    "its steps, at least 20 measurements), cells weighed equally; a lower bound where |G|^2 is not 2 standard "
    "errors above 0. Speedup bands: 95 % percentile bootstrap over seeds ({bootstrap} resamples). Cells still "
    "running count only once they crossed eps."
)


def _coverage_text() -> str:
    return "; ".join(f"{p:.0%} with {s} seed{'s' if s > 1 else ''}" for s, p in MEASURED_COVERAGE.items())


def _real_coverage_text() -> str:
    return "; ".join(f"{c}/{n} = {c / n:.0%} with {s} seed{'s' if s > 1 else ''}"
                     for s, (c, n) in MEASURED_REAL_COVERAGE.items() if n)


def answers(a: "Analysis") -> list[dict]:
    """The box at the top of the report, per group: the critical batch size, how it was measured, what to do."""
    out = []
    for r in a.primary_results():
        s = r.summary
        lin, stag = s["linear_until"], s["stagnation_from"]
        regimes = [f"linear (e >= 0.8) up to m = {fmt(lin)}" if math.isfinite(lin) else "never linear from m0",
                   f"stagnation from m = {fmt(stag)}" if math.isfinite(stag) else "no stagnation within the "
                   "batch sizes measured"]
        measured = (f"{s['fit_observations']} observations ({s['seeds']} seed(s) x {s['batch_sizes']} batch sizes"
                    f"{', ' + str(s['fit_censored']) + ' censored' if s['fit_censored'] else ''}) at eps = "
                    f"{fmt(r.eps)} ({r.threshold}); {s['fit_method'] or 'no fit'}")
        if r.fit.ok:
            b = r.fit.b_crit
            top = max(x["batch_size"] for x in r.per_m)
            beyond = " (beyond the batch sizes measured)" if 4 * b > top else ""
            act = compute.round_to_act
            action = (f"Up to m ≈ {act(b / 4)}, doubling the batch size nearly halves the steps (saves >= 40 %); "
                      f"past m ≈ {act(4 * b)}{beyond}, doubling it saves under 10 % of the steps at 1.8x the "
                      f"compute (examples) or more.")
            headline = f"B_crit = {fmt(b)}, 95 % interval [{fmt(r.fit.b_lo)}, {fmt(r.fit.b_hi)}]"
            if r.fit.one_seed:
                headline += (" (indicative: one seed per batch size, so the interval assumes the seed-to-seed "
                             f"scatter measured on real training, {r.fit.floor:g} in log k; run 3 seeds for an "
                             "interval a rerun reproduces)" if r.fit.floor > 0 else
                             " (one seed per batch size, no seed noise assumed: a rerun may land outside it)")
        else:
            action = (f"No critical batch size from these cells: {s['fit_problem']}. Measured directly: "
                      f"{regimes[0]}, {regimes[1]}.")
            headline = "B_crit: " + s["fit_problem"]
        out.append({"group": r.group.label, "headline": headline, "measured": measured,
                    "regimes": "; ".join(regimes), "action": action,
                    "efficiency": f"m at e = {s['level']:g}, from m0 = {fmt(s['m0'])}: {fmt(s['m_eff_interp'])} "
                                  f"(implies B_crit = {fmt(s['m_eff_implied_b'])})",
                    "b_simple": f"B_simple(eps) = {s['b_simple_text']}"})
    return out


def _bases(a: "Analysis") -> list[list[branches.BranchPoint]]:
    bases: dict[tuple, list[branches.BranchPoint]] = {}
    for p in a.branches:
        bases.setdefault((p.sweep, p.base), []).append(p)
    return list(bases.values())


def over_training(a: "Analysis") -> list[str]:
    """The answer box's lines on the critical batch size over training, one per base run with branches."""
    return [line for pts in _bases(a) if (line := branches.trend(pts))]


def ramps(a: "Analysis") -> list[str]:
    """Per base run with branches, the batch-size ramp its critical batch size over training implies (a grid
    snippet)."""
    return [snippet for pts in _bases(a) if (snippet := branches.ramp_snippet(pts))]


def _md_to_html(md: str) -> str:
    lines = [ln for ln in md.strip().splitlines() if ln.strip()]
    if len(lines) < 2:
        return ""
    def cells(line: str) -> list[str]:
        return [html.escape(c.strip()) for c in line.strip().strip("|").split("|")]
    head = "".join(f"<th>{c}</th>" for c in cells(lines[0]))
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in cells(ln)) + "</tr>" for ln in lines[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_md(a: Analysis, ctx: dict) -> str:
    out = [f"# {ctx['title']}", ""]
    out += [f"- store: `{ctx['store']}`", f"- analysed: {ctx['created']} with critbatch {ctx['analysis_version']}",
            f"- cells: {ctx['ncells']} (" + ", ".join(f"{k} {v}" for k, v in ctx["status"].items()) + ")",
            "- cell code versions: " + ", ".join(f"`{v}` ({n})" for v, n in ctx["cell_versions"]),
            f"- figures use threshold `{a.primary}`; efficiency level {a.settings['efficiency']:g}; "
            f"{a.settings['bootstrap']} bootstrap resamples", ""]
    out += ["## Completeness", "", f"**{ctx['audit']['headline']}**", ""]
    out += [f"- {line}" for line in ctx["audit"]["findings"]] + ([""] if ctx["audit"]["findings"] else [])
    out += ["## The answer", ""]
    for box in ctx["answers"]:
        out += [f"### {box['group']}", "", f"**{box['headline']}**", "", f"- measured: {box['measured']}",
                f"- regimes: {box['regimes']}", f"- {box['efficiency']}", f"- {box['b_simple']}", "",
                box["action"], ""]
    if ctx["over_training"]:
        out += ["## The critical batch size over training", ""] + [f"- {line}" for line in ctx["over_training"]]
        table = next((x for x in a.artifacts if x.name == "cbs_over_training" and not x.missing), None)
        out += ["", table.markdown, ""] if table is not None else [""]
        for snippet in ctx["ramps"]:
            out += ["The batch-size ramp it implies, as a grid snippet (docs/ramp.md):", "", "```yaml", snippet, "```",
                    ""]
    for s in ctx["search"]:
        out += searched.markdown(s)
    for f in ctx["figures"]:
        if f["name"] == "critical_batch_size" and f["table"]:
            out += ["## Critical batch size", "", next(x for x in a.artifacts if x.name == f["name"]).markdown, ""]
    for f in ctx["figures"]:
        if f["name"] == "table2_test_accuracy" and not f["missing"]:
            out += ["## Table 2: final test metric", "", next(x for x in a.artifacts if x.name == f["name"]).markdown,
                    ""]
    out += ["## Figures", ""]
    for f in ctx["figures"]:
        if f["missing"]:
            continue
        links = [f"[CSV]({f['csv']})"] + ([f"[PNG]({f['png']})"] if f["png"] else [])
        out.append(f"- {f['title']}: " + " ".join(links))
    if ctx["missing"]:
        out += ["", "Not in this sweep: " + "; ".join(f"{f['name']} ({f['missing']})" for f in ctx["missing"])]
    if ctx["near"]:
        out += ["", "## Thresholds to read with care", ""]
        out += [f"- {t['group']}, {t['threshold']}: eps = {t['eps_text']} is at least 90 % of the initial loss "
                f"({t['initial_text']}); speedups there measure the first steps only" for t in ctx["near"]]
    out += ["", "## Methods and definitions", "", ctx["definitions"]]
    if ctx["skipped"]:
        out += ["", "## Skipped", ""] + [f"- `{s.key}`: {s.reason}" for s in ctx["skipped"]]
    if ctx["incomplete"]:
        out += ["", "## Incomplete cells (no _SUCCESS)", ""]
        out += [f"- `{c.sweep}/{c.id}` m={c.batch_size} seed={c.seed}: {c.last_step} steps logged"
                for c in ctx["incomplete"]]
    if ctx["nodata"]:
        out += ["", "## Cells without the group's training-loss curve (not used)", ""]
        out += [f"- `{r['sweep']}/{r['cell_id']}` ({r['group']}) m={r['batch_size']} seed={r['seed']}"
                for r in ctx["nodata"]]
    if ctx["diverged"]:
        out += ["", "## Diverged cells", ""]
        out += [f"- `{c.sweep}/{c.id}` m={c.batch_size} seed={c.seed}: diverged at step {c.diverged_at}"
                for c in ctx["diverged"]]
    return "\n".join(out) + "\n"


#: The page, a Jinja template beside this module (read once, at import).
_TEMPLATE = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True,
    undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
).get_template("index.html.j2")
