"""Plot and tabulate: the paper's figures and tables, each with the CSV behind it.

Every function takes computed tables and returns an :class:`Artifact`: the
PNG (matplotlib's Agg canvas, no display, no pyplot state), the rows of its
CSV and, for tables, Markdown. A figure the sweep has no data for comes back
with ``missing`` set to the reason and is listed in the report as "not in
this sweep".
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import NullFormatter
from matplotlib.figure import Figure

from .compute import CurveResult, Group, Table, contour_grid, families

MAX_PANELS = 12
#: Lighter colours for lower loss, as in the paper's contour plots.
CONTOUR_CMAP = "viridis_r"
CONTOUR_DECADES = 1e-6


@dataclass
class Artifact:
    name: str  # file stem: <name>.png, <name>.csv, <name>.md
    title: str
    caption: str
    rows: Table = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    png: bytes | None = None
    markdown: str | None = None
    missing: str | None = None  # why it is not drawn

    def csv_bytes(self) -> bytes:
        return table_csv(self.rows, self.columns)


def table_csv(rows: Table, columns: list[str] | None = None) -> bytes:
    columns = columns or (list(rows[0]) if rows else [])
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return out.getvalue().encode()


def _csv_value(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else repr(float(v))
    if isinstance(v, np.integer):
        return int(v)
    return "" if v is None else v


def fmt(v: Any, digits: int = 3) -> str:
    """A number for a table cell; NaN and None become an en dash."""
    if v is None:
        return "–"
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "–" if math.isnan(v) else ("∞" if v > 0 else "-∞")
        if v != 0 and (abs(v) >= 10 ** 5 or abs(v) < 10 ** -3):
            return f"{v:.{digits}g}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(rows: Table, columns: list[tuple[str, str]]) -> str:
    """Markdown of ``rows``; ``columns`` = [(key, header)]."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _panels(n: int, width: float = 4.6, height: float = 3.6, cols: int = 3) -> tuple[Figure, list]:
    cols = max(1, min(cols, n))
    rows = int(math.ceil(n / cols))
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _log2_axis(ax, ms) -> None:
    ax.set_xscale("log", base=2)
    if len(ms):
        ax.set_xticks(ms)
        ax.set_xticklabels([f"$2^{{{int(round(math.log2(m)))}}}$" if _pow2(m) else f"{m:g}" for m in ms],
                           fontsize=7)
        ax.minorticks_off()


def _pow2(m: float) -> bool:
    return m > 0 and abs(math.log2(m) - round(math.log2(m))) < 1e-9


# ---- speedup curves ---------------------------------------------------------------------

def _speedup_panel(ax, results: list[CurveResult], label: Callable[[CurveResult], str], bands: bool = True) -> None:
    all_ms: set[float] = set()
    m0s = []
    for r in results:
        rows = r.per_m
        ms = np.array([x["batch_size"] for x in rows], dtype=float)
        s = np.array([x["speedup"] for x in rows], dtype=float)
        all_ms.update(ms.tolist())
        if r.summary["m0"] == r.summary["m0"]:
            m0s.append(r.summary["m0"])
        (line,) = ax.plot(ms, s, marker="o", ms=4, label=label(r))
        if bands and r.bands:
            bm = np.array(sorted(r.bands), dtype=float)
            lo = np.array([r.bands[int(m)][0] for m in bm])
            hi = np.array([r.bands[int(m)][1] for m in bm])
            ax.fill_between(bm, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        # Censored batch sizes: the speedup is at most k(m_0) / (their lower bound on k).
        cens = [x for x in rows if x["censored"] and math.isfinite(x["k_lower_bound"])]
        k0 = next((x["k_mean"] for x in rows if x["batch_size"] == r.summary["m0"]), math.nan)
        if cens and math.isfinite(k0):
            ax.scatter([x["batch_size"] for x in cens], [k0 / x["k_lower_bound"] for x in cens],
                       marker="v", facecolors="none", edgecolors=line.get_color(), s=40, zorder=3)
    ms = np.array(sorted(all_ms))
    if len(ms) and m0s:
        m0 = min(m0s)
        ax.plot(ms, ms / m0, "k--", lw=1, label="ideal (linear)")
    ax.set_yscale("log", base=2)
    _log2_axis(ax, ms)
    ax.set_xlabel("batch size m")
    ax.set_ylabel("speedup s(m; m$_0$)")
    ax.legend(fontsize=7)
    ax.grid(True, which="major", alpha=0.3)


SPEEDUP_COLUMNS = ["group", "threshold", "eps", "batch_size", "trial", "seeds", "seeds_reached", "k_mean", "k_sd",
                   "censored", "k_lower_bound", "speedup", "speedup_lo", "speedup_hi", "ideal", "efficiency",
                   "regime"]


def speedup_family_figure(name: str, title: str, caption: str, axis: str, groups: list[Group],
                          results: dict[str, CurveResult], label_field: str) -> Artifact:
    """Speedup curves of groups that differ only along ``axis`` (Figs. 2 left, 3, 4)."""
    art = Artifact(name, title, caption, columns=["family"] + SPEEDUP_COLUMNS)
    fams = [f for f in families(groups, axis) if any(g.label in results for g in f)]
    if not fams:
        art.missing = f"no groups that differ only in {axis}"
        return art
    fams = fams[:MAX_PANELS]
    fig, axes = _panels(len(fams))
    for i, (ax, fam) in enumerate(zip(axes, fams)):
        res = [results[g.label] for g in fam if g.label in results]
        _speedup_panel(ax, res, lambda r: _field_label(r.group, label_field))
        ax.set_title(_family_title(fam, axis), fontsize=9)
        for r in res:
            art.rows += [{"family": i, **x} for x in r.per_m]
    fig.suptitle(title, fontsize=11)
    art.png = _png(fig)
    return art


def _field_label(g: Group, field_name: str) -> str:
    v = g.fields.get(field_name)
    if field_name == "dataset.fraction":
        return f"{100 * v:g} %"
    return str(v)


def _family_title(fam: list[Group], axis: str) -> str:
    g = fam[0]
    parts = []
    if axis != "dataset":
        parts.append(str(g.fields["dataset.name"]))
    if axis != "model":
        parts.append(str(g.fields["model"]))
    if axis != "strategy":
        parts.append(str(g.fields["strategy"]))
    return "/".join(parts)


def speedup_efficiency_figure(results: list[CurveResult]) -> Artifact:
    """Every group: speedup with the ideal line and seed bands; efficiency with the regimes marked."""
    art = Artifact("speedup_efficiency", "Speedup and scaling efficiency per group",
                   "Left: s(m; m0) = k(m0)/k(m), dashed the ideal linear speedup, bands the 95 % bootstrap "
                   "interval over seeds, open triangles the upper bound of batch sizes that never reached the "
                   "threshold. Right: efficiency e(m) = s m0/m; markers by regime (circle linear, square "
                   "diminishing returns, cross stagnation); dotted the efficiency level of the critical batch size.",
                   columns=SPEEDUP_COLUMNS)
    if not results:
        art.missing = "no group reached any threshold"
        return art
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    _speedup_panel(ax1, results, lambda r: r.group.label)
    markers = {"linear": "o", "diminishing": "s", "stagnation": "x"}
    all_ms: set[float] = set()
    for r in results:
        ms = np.array([x["batch_size"] for x in r.per_m], dtype=float)
        e = np.array([x["efficiency"] for x in r.per_m], dtype=float)
        all_ms.update(ms.tolist())
        (line,) = ax2.plot(ms, e, lw=1, label=r.group.label)
        for regime, marker in markers.items():
            sel = [i for i, x in enumerate(r.per_m) if x["regime"] == regime]
            if sel:
                ax2.scatter(ms[sel], e[sel], marker=marker, color=line.get_color(), s=25)
        art.rows += r.per_m
    level = results[0].summary["level"]
    ax2.axhline(level, color="k", ls=":", lw=1)
    ax2.axhline(0.8, color="0.6", ls="--", lw=0.8)
    _log2_axis(ax2, sorted(all_ms))
    ax2.set_ylim(0, 1.1)
    ax2.set_xlabel("batch size m")
    ax2.set_ylabel("efficiency e(m)")
    ax2.grid(True, alpha=0.3)
    art.png = _png(fig)
    return art


# ---- contours ----------------------------------------------------------------------------

def _contour(ax, fig, group: Group, which: str, trials: dict[int, str] | None, rows: Table) -> bool:
    ms, steps, Z = contour_grid(group, which, trials=trials)
    if len(ms) < 2 or not np.isfinite(Z).any():
        ax.text(0.5, 0.5, "too few batch sizes", ha="center", va="center", transform=ax.transAxes)
        return False
    for i, m in enumerate(ms):
        for j, s in enumerate(steps):
            if math.isfinite(Z[i, j]):
                rows.append({"group": group.label, "split": which, "batch_size": int(m), "step": float(s),
                             "loss": float(Z[i, j])})
    Zm = np.ma.masked_invalid(Z.T)
    pos = Z[np.isfinite(Z) & (Z > 0)]
    hi = float(pos.max())
    # Six decades of colour at most: losses below that share the lightest colour (a loss that decays to 1e-30
    # would otherwise leave every level that matters in one shade).
    lo = max(float(pos.min()), hi * CONTOUR_DECADES)
    if hi <= lo:
        hi = lo * 1.01
    norm = LogNorm(lo, hi)
    Zc = np.ma.masked_less_equal(Zm, 0).clip(lo, None)
    # Colour: one column per batch size over its whole run (a filled contour would drop the part of a
    # column that runs longer than its neighbour); lines: the level curves, interpolated between columns.
    mesh = ax.pcolormesh(_edges(ms), _edges(steps), Zc, norm=norm, cmap=CONTOUR_CMAP, shading="flat")
    ax.contour(ms, steps, Zc, levels=np.geomspace(lo, hi, 10)[1:-1], norm=norm, colors="white", linewidths=0.6)
    cs = mesh
    fig.colorbar(cs, ax=ax, label=f"{which} loss", format="%.2g")
    ax.set_yscale("log")
    _log2_axis(ax, ms)
    ax.set_xlabel("batch size m")
    ax.set_ylabel("iterations")
    return True


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around log-spaced centres: geometric midpoints, extended by half a step at both ends."""
    c = np.asarray(centres, dtype=float)
    mid = np.sqrt(c[1:] * c[:-1])
    return np.concatenate([[c[0] ** 2 / mid[0]], mid, [c[-1] ** 2 / mid[-1]]])


CONTOUR_COLUMNS = ["group", "split", "batch_size", "step", "loss"]


def problem_groups(groups: list[Group]) -> list[Group]:
    """One group per problem (everything but the strategy): its BLR group where present."""
    by_rest: dict[str, list[Group]] = {}
    for g in groups:
        rest = {k: v for k, v in g.fields.items() if k != "strategy"}
        by_rest.setdefault(repr(sorted(rest.items(), key=lambda kv: kv[0])), []).append(g)
    out = []
    for members in by_rest.values():
        blr = [g for g in members if g.fields["strategy"] == "blr"]
        out.append((blr or members)[0])
    return sorted(out, key=lambda g: g.label)


def train_contour_figure(groups: list[Group], trials: dict[str, dict[int, str]]) -> Artifact:
    art = Artifact("fig1_train_loss_contours", "Fig. 1: training loss over batch size and iterations",
                   "Training loss (colour, log scale; lighter is lower) against batch size and iterations, one "
                   "panel per problem (its BLR group where present): one column per batch size, its curve "
                   "interpolated onto a shared log-spaced step grid (geometric mean over seeds), blank past its last "
                   "step (for a cell that stopped at its loss threshold, the step it stopped at); white lines: level "
                   "curves interpolated between batch sizes.",
                   columns=CONTOUR_COLUMNS)
    probs = [g for g in problem_groups(groups) if len(g.batch_sizes) >= 2][:MAX_PANELS]
    if not probs:
        art.missing = "no group with two or more batch sizes"
        return art
    fig, axes = _panels(len(probs), width=5.0)
    for ax, g in zip(axes, probs):
        _contour(ax, fig, g, "train", trials.get(g.label), art.rows)
        ax.set_title(g.label, fontsize=9)
    art.png = _png(fig)
    return art


def test_contour_figure(groups: list[Group], trials: dict[str, dict[int, str]]) -> Artifact:
    art = Artifact("fig5_test_loss_contours", "Fig. 5: test loss, BLR beside LSR",
                   "Test loss (colour, log scale; lighter is lower) over batch size and iterations, drawn as in "
                   "Fig. 1; BLR on the left, LSR on the right, one row per problem.", columns=CONTOUR_COLUMNS)
    pairs = []
    for fam in families(groups, "strategy"):
        by = {g.fields["strategy"]: g for g in fam}
        if "blr" in by and "lsr" in by and any(c.test_eval is not None for c in by["blr"].cells + by["lsr"].cells):
            pairs.append((by["blr"], by["lsr"]))
    if not pairs:
        art.missing = "no problem with both BLR and LSR groups that logged test evaluations"
        return art
    pairs = pairs[: MAX_PANELS // 2]
    fig = Figure(figsize=(10, 3.8 * len(pairs)), layout="constrained")
    axes = fig.subplots(len(pairs), 2, squeeze=False)
    for row, (blr, lsr) in zip(axes, pairs):
        for ax, g in zip(row, (blr, lsr)):
            _contour(ax, fig, g, "test", trials.get(g.label), art.rows)
            ax.set_title(g.label, fontsize=9)
    art.png = _png(fig)
    return art


# ---- final metrics ---------------------------------------------------------------------------

FINAL_COLUMNS = ["group", "strategy", "batch_size", "metric", "cells", "diverged", "reached", "test_metric",
                 "test_metric_sd", "test_loss", "lin_approx_error", "lin_approx_error_sd"]


def accuracy_linapprox_figure(groups: list[Group], final: Table) -> Artifact:
    art = Artifact("fig2_accuracy_linapprox", "Fig. 2 right: final test metric and linear-approximation error",
                   "Final test metric (left axis; mean over finished seeds) and the linear-approximation error "
                   "|L(w) - L(w*) - <g_m(w*), w - w*>| at w = w* - eta (m/m0) g_m(w*) (right axis, log scale) "
                   "against batch size; LSR groups where present (as in the paper), else every group.",
                   columns=FINAL_COLUMNS)
    has = [g for g in groups if any(math.isfinite(r["test_metric"]) or math.isfinite(r["lin_approx_error"])
                                    for r in final if r["group"] == g.label)]
    chosen = [g for g in has if g.fields["strategy"] == "lsr"] or has
    chosen = chosen[:MAX_PANELS]
    if not chosen:
        art.missing = "no finished cell reported a test metric or a linear-approximation error"
        return art
    fig, axes = _panels(len(chosen))
    for ax, g in zip(axes, chosen):
        rows = [r for r in final if r["group"] == g.label]
        art.rows += rows
        ms = np.array([r["batch_size"] for r in rows], dtype=float)
        metric = rows[0]["metric"]
        acc = np.array([r["test_metric"] for r in rows], dtype=float)
        if metric == "accuracy":
            acc = 100 * acc
        if np.isfinite(acc).any():
            ax.plot(ms, acc, "o-", color="C0", ms=4)
            ax.set_ylabel(f"test {metric}" + (" (%)" if metric == "accuracy" else ""), color="C0")
        lin = np.array([r["lin_approx_error"] for r in rows], dtype=float)
        if np.isfinite(lin).any() and (lin[np.isfinite(lin)] > 0).any():
            ax2 = ax.twinx()
            ax2.plot(ms, lin, "s--", color="C3", ms=4)
            ax2.set_yscale("log")
            ax2.set_ylabel("linear approx. error", color="C3")
        _log2_axis(ax, ms)
        ax.set_xlabel("batch size m")
        ax.set_title(g.label, fontsize=9)
    art.png = _png(fig)
    return art


def table2(groups: list[Group], final: Table) -> Artifact:
    """Table 2: final test metric by batch size (rows) and group (columns)."""
    art = Artifact("table2_test_accuracy", "Table 2: final test metric by batch size and strategy",
                   "Final test metric (accuracy in %, perplexity, mIoU; test loss for regression), mean over "
                   "finished seeds; 'diverged' where every seed diverged; 'stopped at eps' where the cells stopped "
                   "at their loss threshold (a batch-size search's), which is not a whole run.", columns=FINAL_COLUMNS)
    rows = [r for r in final if r["cells"]]
    if not rows:
        art.missing = "no finished cell"
        return art
    art.rows = rows
    labels = [g.label for g in groups if any(r["group"] == g.label for r in rows)]
    ms = sorted({r["batch_size"] for r in rows})
    header = "| batch size | " + " | ".join(labels) + " |"
    lines = [header, "|" + "---|" * (len(labels) + 1)]
    for m in ms:
        cells = []
        for label in labels:
            r = next((x for x in rows if x["group"] == label and x["batch_size"] == m), None)
            cells.append(_final_cell(r))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    art.markdown = "\n".join(lines) + "\n"
    return art


def _final_cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    if r["diverged"] and r["diverged"] == r["cells"]:
        return "diverged"
    if r["reached"] and r["reached"] + r["diverged"] == r["cells"]:
        return "stopped at eps"
    if r["metric"] == "none":
        v, text = r["test_loss"], fmt(r["test_loss"])
    elif r["metric"] == "accuracy":
        v = r["test_metric"]
        text = f"{100 * v:.2f}" if math.isfinite(v) else "–"
    else:
        v, text = r["test_metric"], fmt(r["test_metric"])
    if r["diverged"]:
        text += f" ({r['diverged']}/{r['cells']} diverged)"
    if r["reached"]:
        text += f" ({r['reached']}/{r['cells']} stopped at eps)"
    return text


# ---- beyond the paper --------------------------------------------------------------------------

CRIT_COLUMNS = ["group", "threshold", "eps", "source", "m0", "batch_sizes", "seeds", "level",
                "b_crit", "b_crit_lo", "b_crit_hi", "s_min", "s_min_lo", "s_min_hi", "e_min", "fit_sigma",
                "fit_observations", "fit_censored", "fit_method", "fit_problem",
                "m_eff", "m_eff_interp", "m_eff_implied_b", "m_level_fit", "m_level_fit_lo", "m_level_fit_hi",
                "m_zhang", "m_zhang_lo", "m_zhang_hi",
                "b_simple", "b_simple_lo", "b_simple_hi", "b_simple_bound", "b_simple_cells",
                "linear_until", "stagnation_from", "censored", "seeds_censored", "bootstrap",
                "tokens_per_example", "E_min_tokens"]


def b_crit_text(r: dict[str, Any]) -> str:
    """B_crit with its interval, or in words why there is none."""
    if r.get("fit_problem"):
        return r["fit_problem"]
    return f"{fmt(r['b_crit'])} [{fmt(r['b_crit_lo'])}, {fmt(r['b_crit_hi'])}]"


def critical_table(results: list[CurveResult]) -> Artifact:
    art = Artifact("critical_batch_size", "Critical batch size",
                   "Per group and threshold: B_crit, McCandlish et al.'s k(m) = S_min (1 + B_crit/m) fitted in log "
                   "space over every seed (seeds that never reached eps as censored bounds) [95 % profile-likelihood "
                   "interval]; S_min and E_min = S_min B_crit samples; 'm at e = level, from m0', the efficiency "
                   "figure measured (interpolated in log m) and the B_crit it implies, (level m_l - m0)/(1 - level); "
                   "Zhang et al.'s batch size with 20 % more steps than perfect scaling from m0, from the fit; "
                   "B_simple(eps), the gradient noise scale measured where the cells cross eps. The plot shows every "
                   "seed's k(m), the censored bounds and the fit.", columns=CRIT_COLUMNS)
    if not results:
        art.missing = "no group reached any threshold"
        return art
    art.rows = [r.summary for r in results]
    cols = [("group", "group"), ("threshold", "threshold"), ("eps", "eps"), ("_b", "B_crit [95 %]"),
            ("_smin", "S_min"), ("e_min", "E_min"), ("m0", "m0"), ("_eff", "m at e = level, from m0 (implied B)"),
            ("_zhang", "m at 1.2x steps, from m0"), ("b_simple_text", "B_simple(eps)"),
            ("linear_until", "linear until"), ("stagnation_from", "stagnation from"), ("censored", "censored m"),
            ("seeds", "seeds")]
    shown = []
    for r in art.rows:
        shown.append({**r, "_b": b_crit_text(r), "_smin": _with_ci(r, "s_min"),
                      "_eff": f"{fmt(r['m_eff_interp'])} ({fmt(r['m_eff_implied_b'])})",
                      "_zhang": _with_ci(r, "m_zhang"), "censored": r["censored"] or "none"})
    art.markdown = markdown_table(shown, cols)
    primary = [r for r in results if r.threshold == results[0].threshold] or results
    fig, axes = _panels(min(len(primary), MAX_PANELS))
    for ax, r in zip(axes, primary[:MAX_PANELS]):
        _fit_panel(ax, r)
    art.png = _png(fig)
    return art


def _fit_panel(ax, r: CurveResult) -> None:
    rows = r.per_m
    ms = np.array([x["batch_size"] for x in rows], dtype=float)
    ax.scatter(ms, [x["k_mean"] for x in rows], s=18, zorder=3, label="k(m), geometric mean over seeds")
    cens = [x for x in rows if x["censored"] and math.isfinite(x["k_lower_bound"])]
    if cens:
        ax.scatter([x["batch_size"] for x in cens], [x["k_lower_bound"] for x in cens], marker="^",
                   facecolors="none", edgecolors="C0", label="not reached (k > bound)")
    s, f = r.summary, r.fit
    if f.ok and len(ms):
        mm = np.geomspace(ms.min(), ms.max(), 100)
        ax.plot(mm, f.k(mm), "C1-", label=f"fit: B_crit = {b_crit_text(s)}")
        ax.axvline(f.b_crit, color="C1", ls=":", lw=1)
    else:
        ax.text(0.02, 0.02, s["fit_problem"], transform=ax.transAxes, fontsize=6, wrap=True)
    ax.set_yscale("log")
    _log2_axis(ax, ms)
    ax.set_xlabel("batch size m")
    ax.set_ylabel("steps to threshold k(m)")
    ax.set_title(f"{r.group.label}, {r.threshold} (eps={fmt(r.eps)})", fontsize=8)
    ax.legend(fontsize=6)


def noise_scale_figure(results: list[CurveResult]) -> Artifact:
    """B_crit(eps) beside B_simple(eps) over the thresholds along the run (McCandlish et al.'s comparison)."""
    art = Artifact("b_crit_vs_b_simple", "B_crit(eps) beside the gradient noise scale B_simple(eps)",
                   "Per group, over the thresholds along the run (the default rule at the 75th, 50th, 25th and "
                   "10th percentile of the largest batch size's losses, and any explicit one): the fitted B_crit "
                   "with its 95 % interval, and B_simple measured over a window ending where each cell crosses "
                   "eps (the last half of its steps to eps, at least 20 measurements; finite-population "
                   "corrected; open triangles: lower bounds where |G|^2 was not resolved).",
                   columns=["group", "threshold", "eps", "b_crit", "b_crit_lo", "b_crit_hi", "fit_problem",
                            "b_simple", "b_simple_lo", "b_simple_hi", "b_simple_bound", "b_simple_cells"])
    by_group: dict[str, list[CurveResult]] = {}
    for r in results:
        by_group.setdefault(r.group.label, []).append(r)
    art.rows = [r.summary for r in results]
    if not any(r.summary["b_simple_cells"] for r in results):
        art.missing = "no cell measured the gradient noise"
        return art
    groups = [g for g, rs in by_group.items() if any(r.summary["b_simple_cells"] for r in rs)][:MAX_PANELS]
    fig, axes = _panels(len(groups))
    for ax, label in zip(axes, groups):
        rs = sorted(by_group[label], key=lambda r: -r.eps)
        eps = np.array([r.eps for r in rs])
        b = np.array([r.summary["b_crit"] for r in rs])
        lo = np.array([r.summary["b_crit_lo"] for r in rs])
        hi = np.array([min(r.summary["b_crit_hi"], 1e12) for r in rs])
        ok = np.isfinite(b)
        ax.errorbar(eps[ok], b[ok], yerr=[b[ok] - lo[ok], hi[ok] - b[ok]], fmt="o-", ms=4, label="B_crit(eps), fit")
        bs = np.array([r.summary["b_simple"] for r in rs])
        bound = np.array([r.summary["b_simple_bound"] for r in rs], dtype=bool)
        fin = np.isfinite(bs)
        ax.plot(eps[fin & ~bound], bs[fin & ~bound], "s--", color="C3", ms=4, label="B_simple(eps)")
        if (fin & bound).any():
            ax.scatter(eps[fin & bound], bs[fin & bound], marker="^", facecolors="none", edgecolors="C3",
                       label="B_simple > bound")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("threshold eps (training loss; training runs left to right)")
        ax.set_ylabel("batch size")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(True, alpha=0.3)
    art.png = _png(fig)
    return art


def tradeoff_figure(results: list[CurveResult]) -> Artifact:
    """McCandlish et al.'s Fig. 3: steps against examples, with (S/S_min - 1)(E/E_min - 1) = 1."""
    art = Artifact("steps_examples_tradeoff", "Steps against examples (McCandlish et al.)",
                   "Per group: steps k(m) against examples m k(m) to the threshold, one point per batch size "
                   "(geometric mean over seeds), both relative to the fit's S_min and E_min = S_min B_crit; the "
                   "curve is the fitted hyperbola (S/S_min - 1)(E/E_min - 1) = 1, which k = S_min (1 + B_crit/m) "
                   "implies. Small batches sit at the left (few examples, many steps), large ones at the bottom.",
                   columns=["group", "threshold", "batch_size", "steps", "examples", "s_min", "e_min"])
    fitted = [r for r in results if r.fit.ok]
    if not fitted:
        art.missing = "no group has a McCandlish fit"
        return art
    fig = Figure(figsize=(6, 4.6), layout="constrained")
    ax = fig.subplots()
    for r in fitted[:MAX_PANELS]:
        s_min, e_min = r.fit.s_min, r.fit.e_min()
        pts = [(x["batch_size"], x["k_mean"]) for x in r.per_m if math.isfinite(x["k_mean"])]
        art.rows += [{"group": r.group.label, "threshold": r.threshold, "batch_size": m, "steps": k,
                      "examples": m * k, "s_min": s_min, "e_min": e_min} for m, k in pts]
        ax.scatter([m * k / e_min for m, k in pts], [k / s_min for _, k in pts], s=18, zorder=3,
                   label=f"{r.group.label} (B_crit {fmt(r.fit.b_crit)})")
    top = max(row["examples"] / row["e_min"] for row in art.rows) if art.rows else 10.0
    x = np.geomspace(1.01, 3 * max(top, 2.0), 300)
    ax.plot(x, 1 + 1 / (x - 1), "k-", lw=1, label="(S/S_min - 1)(E/E_min - 1) = 1")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("examples to threshold / E_min")
    ax.set_ylabel("steps to threshold / S_min")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)
    art.png = _png(fig)
    return art


def _with_ci(r: dict[str, Any], name: str) -> str:
    v, lo, hi = r[name], r.get(f"{name}_lo"), r.get(f"{name}_hi")
    if lo is not None and hi is not None and math.isfinite(lo) and not math.isnan(hi):
        return f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]"
    return fmt(v)


def time_figure(results: list[CurveResult]) -> Artifact:
    art = Artifact("time_to_threshold", "Wall-clock time and samples to threshold",
                   "Seconds of training (excluding evaluations) and samples processed until the training loss "
                   "first reaches the threshold, mean over the seeds of the winning trial, against batch size.",
                   columns=["group", "threshold", "eps", "batch_size", "k_mean", "wall_s", "samples", "tokens",
                            "censored"])
    rows = [x for r in results for x in r.per_m]
    if not any(math.isfinite(x["wall_s"]) for x in rows):
        art.missing = "no step log with wall-clock times reached a threshold"
        return art
    art.rows = rows
    # Language models: the tokens to the threshold beside the steps (Zhang et al. 2024 plot both).
    tokens = any(math.isfinite(x.get("tokens", math.nan)) for x in rows)
    fig = Figure(figsize=(16 if tokens else 11, 4), layout="constrained")
    axes = fig.subplots(1, 3 if tokens else 2)
    panels = [("wall_s", "wall-clock seconds to threshold"), ("samples", "samples to threshold")]
    if tokens:
        panels = [("k_mean", "steps to threshold"), ("tokens", "tokens to threshold"), panels[0]]
    all_ms: set[float] = set()
    for r in results:
        ms = np.array([x["batch_size"] for x in r.per_m], dtype=float)
        all_ms.update(ms.tolist())
        for ax, (column, _) in zip(axes, panels):
            ax.plot(ms, [x.get(column, math.nan) for x in r.per_m], "o-", ms=4, label=r.group.label)
    for ax, (_, ylabel) in zip(axes, panels):
        ax.set_yscale("log")
        _log2_axis(ax, sorted(all_ms))
        ax.set_xlabel("batch size m")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    art.png = _png(fig)
    return art


# ---- the critical batch size over training (branch cells) ------------------------------------------------

BRANCH_COLUMNS = ["sweep", "base", "problem", "at", "fraction", "start_step", "start_examples", "start_tokens",
                  "base_batch", "rule", "length_examples", "multipliers", "seeds", "source", "target_loss",
                  "b_crit", "b_crit_lo", "b_crit_hi", "s_min", "one_seed", "censored", "fit_problem", "tolerance",
                  "cbs_tolerance", "cbs_tolerance_lo", "cbs_tolerance_hi", "b_simple", "b_simple_bound",
                  "b_crit_analytic", "b_crit_global"]


def branches_figure(points: list) -> Artifact:
    """Local B_crit(t) and the tolerance CBS(t) against the branch point, with B_simple(t) and any known or
    global critical batch size (analysis.branches)."""
    tol = points[0].tolerance if points else 0.01
    art = Artifact(
        "cbs_over_training", "The critical batch size over training (branches)",
        "Per base run, against the branch point t (examples the base had trained on): the local B_crit(t) "
        "(McCandlish's, the grid's headline quantity: steps of each branch to the loss its smallest multiplier "
        "reaches at half the branch length, fitted with k(m) = S_min (1 + B_crit/m) over m = k B, 95 % "
        "profile-likelihood interval over seeds and multipliers); Merrill et al.'s tolerance CBS(t), the largest "
        f"k B whose loss after the branch length is within {100 * tol:g} % of the best smaller one's (geometric "
        "mean over seeds, which may lie outside the seeds' own range; bars: the range over seeds; its resolution is the multiplier grid, and it depends on "
        "the tolerance and the branch length); the base's gradient noise scale B_simple(t) over the window "
        "ending at t; the analytic critical batch size where the problem has one (linreg, oracle step: "
        "beta/lambda_1 - 1) and a grid's B_crit on the same problem when the analysis has one.",
        columns=BRANCH_COLUMNS)
    if not points:
        art.missing = "no branch cells"
        return art
    art.rows = [p.summary() for p in points]
    art.markdown = markdown_table(
        [{**r, "_t": f"{fmt(r['at'] if r['at'] is not None else r['fraction'])} (step {r['start_step']})",
          "_b": f"{fmt(r['b_crit'])} [{fmt(r['b_crit_lo'])}, {fmt(r['b_crit_hi'])}]" if math.isfinite(r["b_crit"])
          else r["fit_problem"] or "–",
          "_cbs": f"{fmt(r['cbs_tolerance'])} [{fmt(r['cbs_tolerance_lo'])}, {fmt(r['cbs_tolerance_hi'])}]",
          "_bs": ("> " if r["b_simple_bound"] else "") + fmt(r["b_simple"])} for r in art.rows],
        [("problem", "problem"), ("_t", "t (fraction of the base's steps)"), ("start_examples", "t (examples)"),
         ("multipliers", "k"), ("seeds", "seeds"), ("target_loss", "target loss"), ("_b", "local B_crit(t) [95 %]"),
         ("_cbs", f"tolerance CBS(t) [seeds], eps {tol:g}"), ("_bs", "B_simple(t)"),
         ("b_crit_analytic", "analytic"), ("b_crit_global", "grid's B_crit")])
    bases: dict[tuple, list] = {}
    for p in points:
        bases.setdefault((p.sweep, p.base), []).append(p)
    fig, axes = _panels(min(len(bases), MAX_PANELS))
    for ax, pts in zip(axes, list(bases.values())[:MAX_PANELS]):
        pts = sorted(pts, key=lambda p: p.start_step)
        t = np.array([p.start_examples for p in pts], dtype=float)
        b = np.array([p.fit.b_crit if p.fit.ok else math.nan for p in pts])
        ok = np.isfinite(b)
        if ok.any():
            lo = np.array([p.fit.b_lo for p in pts])[ok]
            hi = np.minimum(np.array([p.fit.b_hi for p in pts])[ok], 1e12)
            ax.errorbar(t[ok], b[ok], yerr=np.clip([b[ok] - lo, hi - b[ok]], 0, None), fmt="o-", ms=4, capsize=2,
                        label="local B_crit(t), fit")
        c = np.array([p.cbs for p in pts])
        rng = np.array([p.cbs_range for p in pts])
        fin = np.isfinite(c)
        if fin.any():
            # The value is the pooled seeds' (their geometric mean loss), which may fall outside the seeds' range.
            ax.errorbar(t[fin] * 1.03, c[fin], yerr=np.clip([c[fin] - rng[fin, 0], rng[fin, 1] - c[fin]], 0, None),
                        fmt="D--", ms=4,
                        capsize=2, color="C2", label=f"tolerance CBS(t), eps {pts[0].tolerance:g}")
        bs = np.array([p.b_simple.value if p.b_simple and p.b_simple.cells else math.nan for p in pts])
        if np.isfinite(bs).any():
            ax.plot(t, bs, "s:", color="C3", ms=4, label="B_simple(t) of the base")
        for value, color, ls, label in ((pts[0].analytic, "k", "--", "analytic B_crit"),
                                        (pts[0].global_b, "C1", "-.", "the grid's B_crit")):
            if value is not None and math.isfinite(value):
                ax.axhline(value, color=color, ls=ls, lw=1, label=f"{label} = {fmt(value)}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("branch point t (examples the base trained on)")
        ax.set_ylabel("batch size")
        ax.set_title(f"{pts[0].label}\nbase {pts[0].base}, rule {pts[0].rule}", fontsize=8)
        ax.legend(fontsize=6)
        ax.grid(True, alpha=0.3)
    art.png = _png(fig)
    return art
