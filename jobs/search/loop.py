"""The search: threshold first, a coarse ladder, then the cells that narrow B_crit's interval, in waves.

    critbatch search digits --store ./out --parallel 2          # cells as local subprocesses
    critbatch search my-grid.yaml --cluster --image REG/critbatch:TAG   # cells as the cluster's Jobs

1. Threshold. With an explicit eps (``search.threshold``, else the grid's
   ``analysis.args --threshold``, the report's headline) nothing runs for it.
   Otherwise every cell of the largest batch size runs whole (every seed and
   trial: the paper's rule pools them; they are the fewest steps, so on a
   cluster they run at once), and eps is the analysis's default threshold of
   those cells, fixed and recorded.
2. Ladder. For each speedup curve (the analysis's groups: strategy, model,
   data, ...), the grid's batch sizes every ``search.ladder`` x from the
   smallest (and the largest), its first seed, each cell stopping at eps
   (jobs/train/stop.py). Several trials at one batch size race (race.py).
3. Refine. Fit every curve (the analysis's fit, on what the store holds),
   and while a curve's interval is wider than ``search.target`` and samples
   are left in the budget, add the batch sizes and seeds that narrow it most
   per sample (decide.py), ``wave`` cells at a time. Each choice is logged
   with the interval before, the one predicted, and the one measured after.

Everything lives in ``<sweep>/search.json`` (state.py). A re-run resumes: it
runs the last wave it had started again (finished cells are skipped by the
executor, paused ones resume from their checkpoints) and goes on. A second
search of the same sweep finds the first one's lease (``<sweep>/search/lease``)
and follows its progress instead of racing it.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from critbatch.analysis import compute
from critbatch.analysis.compute import TRIAL_FIELDS, curve_key, flatten
from critbatch.analysis.load import INCOMPLETE, CellSummary, load_cell
from ..cell.analysis_args import parse_analyze_args
from ..cell.errors import ConfigError
from ..cell.layout import cell_prefix
from ..cell.logschema import STATUS_REACHED
from ..cell.science import crossing
from ..cell.spec import Cell, total_steps
from ..store import Store
from ..sweep.grid import Grid
from ..sweep.searchspec import SearchSpec
from . import decide, race
from .state import SearchState, now, read_state, write_state

#: Cells a wave adds when neither the spec nor the backend says.
DEFAULT_WAVE = 4


class Backend(Protocol):
    """Runs cells to their end, to a pause step, or to their threshold; returns once every one has stopped."""

    parallel: int

    def run(self, runs: list[tuple[Cell, int | None]]) -> list[str]:
        """Train each (cell, pause step or None); the ids of the cells that failed."""


class SearchFailed(RuntimeError):
    """Cells failed; the state is saved, and a re-run resumes once the cause is fixed."""


@dataclass
class Slot:
    """The grid's cells of one curve at one batch size and seed: one per trial."""

    key: str
    batch_size: int
    seed: int
    trials: list[Cell]


@dataclass
class CurveView:
    """One curve as the store shows it now, at its eps."""

    key: str
    label: str
    eps: float
    result: compute.CurveResult | None
    observations: list[decide.Observation]
    observed: set[tuple[int, int]]  # (batch size, seed) with an observation
    winners: dict[int, str]  # batch size -> the winning trial's cell id

    @property
    def interval(self) -> decide.Interval:
        return decide.interval(self.result.fit) if self.result is not None else decide.Interval(
            math.nan, math.nan, math.nan)


@dataclass
class Search:
    grid: Grid
    store: Store
    backend: Backend
    spec: SearchSpec = field(default_factory=SearchSpec)
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)

    def __post_init__(self) -> None:
        self.slots: dict[tuple[str, int, int], Slot] = {}
        for cell in self.grid.cells():
            key = curve_id(cell)
            slot = self.slots.setdefault((key, cell.batch_size, cell.seed), Slot(key, cell.batch_size, cell.seed, []))
            slot.trials.append(cell)
        self.keys = sorted({s.key for s in self.slots.values()})
        self._finished: dict[str, CellSummary] = {}

    # ---- the whole search ------------------------------------------------------------------

    def run(self) -> SearchState:
        state = self.state = read_state(self.store, self.grid.sweep) or self._new_state()
        if state.done:
            self.log(f"critbatch search: {self.grid.sweep}: already {state.status}; nothing to run")
            return state
        if state.open_wave is not None:
            self.log(f"critbatch search: resuming wave {state.open_wave['index']} ({state.open_wave['phase']})")
            self._finish_wave(state)
        if not state.threshold.get("by_group"):
            self._threshold(state)
        while not state.done:
            views = self._observe(state)
            tasks, decisions = self._next_wave(state, views)
            if not tasks:
                break
            self._start_wave(state, "ladder" if any(t.role == "ladder" for t in tasks) else "refine", tasks, decisions)
            self._finish_wave(state)
        return state

    def _new_state(self) -> SearchState:
        full_samples = full_steps = 0
        for cell in self.grid.cells():
            steps = _budget_steps(cell)
            full_steps += steps
            full_samples += steps * cell.batch_size
        state = SearchState(sweep=self.grid.sweep, spec=self.spec.model_dump(),
                            full_grid={"cells": len(self.grid.cells()), "samples": full_samples, "steps": full_steps})
        write_state(self.store, state)
        return state

    # ---- 1. the threshold ------------------------------------------------------------------

    @property
    def _seed_noise(self) -> float:
        """The seed scatter the report's fit assumes with one seed per batch size (analysis.args --seed-noise)."""
        return parse_analyze_args(self.grid.analysis.args).seed_noise

    def _explicit_eps(self) -> tuple[float, str] | None:
        if self.spec.threshold is not None:
            return self.spec.threshold, "search.threshold"
        given = parse_analyze_args(self.grid.analysis.args).threshold
        if given:
            return float(given[0]), "the grid's analysis.args --threshold (the report's headline)"
        return None

    def _threshold(self, state: SearchState) -> None:
        explicit = self._explicit_eps()
        if explicit is not None:
            eps, source = explicit
            state.threshold = {"eps": eps, "source": source, "by_group": {k: eps for k in self.keys}, "fixed": now()}
            self.log(f"critbatch search: eps = {eps:g} ({source})")
            write_state(self.store, state)
            return
        if not any(w["phase"] == "threshold" for w in state.waves):
            tasks = []
            for key in self.keys:
                top = max(s.batch_size for s in self.slots.values() if s.key == key)
                for slot in sorted((s for s in self.slots.values() if s.key == key and s.batch_size == top),
                                   key=lambda s: s.seed):
                    tasks.append(_Task(slot, "threshold", "the largest batch size, whole: the paper's default eps "
                                       "is the lower quartile of its losses", whole=True))
            self._start_wave(state, "threshold", tasks, [])
            self._finish_wave(state)
        groups = compute.group_cells(self._summaries(state))
        table, _ = compute.steps_to_threshold(groups)
        by_group, froms = {}, {}
        for t in table:
            if t["threshold"] == compute.DEFAULT_THRESHOLD and math.isfinite(t["eps"]):
                key = _short(next(g.key for g in groups if g.label == t["group"]))
                by_group[key], froms[key] = t["eps"], t["from_batch_size"]
        missing = [k for k in self.keys if k not in by_group]
        if missing:
            raise SearchFailed(f"no default threshold for {len(missing)} curve(s): their largest batch size left no "
                               f"training-loss curve; give search.threshold")
        state.threshold = {"eps": None, "source": f"{compute.DEFAULT_THRESHOLD}: the lower quartile of the largest "
                           "batch size's run (shared by a problem's strategies)", "by_group": by_group,
                           "from_batch_size": froms, "fixed": now()}
        self.log("critbatch search: eps fixed: " + ", ".join(f"{v:.4g}" for v in by_group.values()))
        write_state(self.store, state)

    # ---- observing the store ---------------------------------------------------------------

    def _summaries(self, state: SearchState) -> list[CellSummary]:
        """Every cell the search ran, as the analysis reads it (finished ones read once)."""
        out = []
        for cell_id in state.cells:
            summary = self._finished.get(cell_id)
            if summary is None:
                prefix = cell_prefix(self.grid.sweep, cell_id)
                summary, _ = load_cell(self.store, self.grid.sweep, cell_id, self.store.list(prefix + "/"))
                if summary is None:
                    continue
                if summary.status != INCOMPLETE:
                    self._finished[cell_id] = summary
            out.append(summary)
        return out

    def _observe(self, state: SearchState) -> dict[str, CurveView]:
        """Each curve's observations and fit at its eps, and the compute spent so far (into ``state``)."""
        summaries = self._summaries(state)
        groups = {_short(g.key): g for g in compute.group_cells(summaries)}
        views = {}
        for key in self.keys:
            eps = state.threshold.get("by_group", {}).get(key)
            g = groups.get(key)
            if eps is None or g is None:  # the threshold's wave: no eps yet
                views[key] = CurveView(key, key, eps, None, [], set(), {})
                continue
            name = f"eps={eps:g}"
            rows = [compute.cell_crossing(g, c, name, eps) for c in g.cells]
            result = compute.speedup_curve(g, name, eps, rows, bootstrap=0, seed_noise=self._seed_noise)
            best = compute.best_trials(rows)
            obs = [decide.Observation(b.batch_size, float(k), float(bound))
                   for b in best for k, bound in zip(b.k, b.bound)]
            seeds = {(r["batch_size"], r["seed"]) for r in rows if r["use"] in ("reached", "censored")}
            winners = {b.batch_size: b.cell_ids[0] for b in best if b.cell_ids}
            views[key] = CurveView(key, g.label, eps, result, obs, seeds, winners)
            iv = views[key].interval
            entry = state.groups.setdefault(key, {"state": "searching"})
            entry.update(label=g.label, eps=eps, interval=iv.as_list(), rel_width=_finite(iv.rel_width),
                         batch_sizes=sorted({m for m, _ in seeds}), observations=len(obs),
                         fit_problem=result.summary["fit_problem"])
        by_id = {s.id: s for s in summaries}
        samples = steps = 0
        for cell_id, entry in state.cells.items():
            s = by_id.get(cell_id)
            if s is None:
                continue
            entry.update(state=s.status, steps=s.last_step, samples=s.last_step * s.batch_size)
            if s.status == STATUS_REACHED:
                entry["k"] = (s.success or {}).get("k")
            samples += s.last_step * s.batch_size
            steps += s.last_step
        state.spent = {"samples": samples, "steps": steps, "cells": len(state.cells),
                       "fraction": samples / state.full_grid["samples"] if state.full_grid.get("samples") else None}
        return views

    # ---- 2 and 3: what to run next ---------------------------------------------------------

    def _next_wave(self, state: SearchState, views: dict[str, CurveView]) -> tuple[list["_Task"], list[dict]]:
        budget_left = self.spec.budget * state.full_grid["samples"] - state.spent["samples"]
        wave = self.spec.wave or self.backend.parallel or DEFAULT_WAVE
        planned = {(e["group"], e["batch_size"], e["seed"]) for e in state.cells.values()}
        tasks: list[_Task] = []
        decisions: list[dict] = []
        open_keys = [k for k in self.keys if state.groups.get(k, {}).get("state", "searching") == "searching"]
        for key in open_keys:
            view = views[key]
            entry = state.groups.setdefault(key, {"state": "searching"})
            slots = [s for s in self.slots.values() if s.key == key]
            ms = sorted({s.batch_size for s in slots})
            first_seed = min(s.seed for s in slots)
            ladder = decide.ladder(ms, self.spec.ladder)
            todo = [m for m in ladder if (key, m, first_seed) not in planned]
            if todo:  # the ladder first, whole
                for m in todo:
                    tasks.append(_Task(self.slots[(key, m, first_seed)], "ladder",
                                       f"ladder: every {self.spec.ladder:g}x from m={ms[0]}"))
                    decisions.append(self._decision(view, f"ladder m={m} seed {first_seed}", tasks[-1].why))
                continue
            iv = view.interval
            if view.result is not None and view.result.fit.ok and iv.rel_width <= self.spec.target:
                entry.update(state="decided", why=f"interval relative width {iv.rel_width:.2f} <= target "
                             f"{self.spec.target:g}")
                continue
            problem = view.result.summary["fit_problem"] if view.result is not None else "nothing measured"
            if problem and ("rise" in problem or "no finite fit" in problem):
                entry.update(state="no fit", why=problem)  # the grid holds no batch size that can change it
                continue
            if budget_left <= 0:
                entry.update(state="budget spent", why=f"{state.spent['samples']:,} samples spent of the "
                             f"{self.spec.budget:.0%} of the full grid's that the search may")
                continue
            candidates = self._candidates(key, view, planned)
            if not candidates:
                entry.update(state="exhausted", why="every batch size and seed of the grid that could narrow the "
                             "interval has run")
                continue
            share = max(1, wave // max(1, len(open_keys)))
            if view.result is None or not view.result.fit.ok:
                # Fewer than three batch sizes reached eps: the unrun ones from the smallest, cheapest to reach it.
                picked = sorted((c for c in candidates if c.kind == "batch size"), key=lambda c: c.batch_size)[:share]
                for c in picked:
                    tasks.append(_Task(self.slots[(key, c.batch_size, c.seed)], "refine",
                                       f"no fit yet ({problem}): the next batch size up"))
                    decisions.append(self._decision(view, f"add m={c.batch_size} seed {c.seed}", tasks[-1].why))
                continue
            chosen = decide.choose(view.observations, candidates, count=share, confirm=self.spec.confirm,
                                   budget=budget_left, seed_noise=self._seed_noise)
            if not chosen:
                affordable = any(decide.predict(view.result.fit, c, self.spec.confirm)[1] <= budget_left
                                 for c in candidates)
                why = (f"no batch size or seed left would narrow the interval by {decide.MIN_GAIN:.0%} or more"
                       if affordable else f"no candidate fits in the {max(0, budget_left):,.0f} samples left")
                entry.update(state="exhausted" if affordable else "budget spent", why=why)
                continue
            for choice in chosen:
                c = choice.candidate
                slot = self.slots[(key, c.batch_size, c.seed)]
                trials = self._winning_trial(view, slot) if c.kind == "seed" else None
                tasks.append(_Task(slot, "refine", choice.why(), expect=choice.predicted_k, only=trials))
                budget_left -= choice.cost
                decisions.append({**self._decision(view, f"add {c.kind} m={c.batch_size} seed {c.seed}",
                                                   choice.why()), "interval_predicted": choice.after.as_list(),
                                  "cost_predicted": choice.cost})
        finals = [state.groups.get(k, {}).get("state") for k in self.keys]
        if not tasks:
            states = [s for s in finals if s != "decided"]
            state.status = "decided" if not states else states[0]
            write_state(self.store, state)
        return tasks, decisions

    def _candidates(self, key: str, view: CurveView, planned: set) -> list[decide.Candidate]:
        out = []
        slots = [s for s in self.slots.values() if s.key == key]
        run_ms = {m for (k, m, _) in planned if k == key}
        seeds_by_m: dict[int, list[int]] = {}
        for s in slots:
            seeds_by_m.setdefault(s.batch_size, []).append(s.seed)
        for m, seeds in sorted(seeds_by_m.items()):
            seeds.sort()
            budget = _budget_steps(self.slots[(key, m, seeds[0])].trials[0])
            if m not in run_ms:
                out.append(decide.Candidate(m, seeds[0], budget, "batch size"))
                continue
            if m not in view.winners:
                continue  # ran, but not observed yet (no crossing and not finished): no second seed
            nxt = [s for s in seeds if (key, m, s) not in planned]
            if nxt:
                out.append(decide.Candidate(m, nxt[0], budget, "seed"))
        return out

    def _winning_trial(self, view: CurveView, slot: Slot) -> list[Cell] | None:
        """At another seed, only the trial that won this batch size (its metaparameters)."""
        if len(slot.trials) == 1:
            return None
        winner = self._cell_of(view.winners[slot.batch_size])
        want = {f: flatten(winner).get(f) for f in TRIAL_FIELDS}
        return [c for c in slot.trials if {f: flatten(c.to_dict()).get(f) for f in TRIAL_FIELDS} == want] or None

    def _cell_of(self, cell_id: str) -> dict[str, Any]:
        return self.state.cells[cell_id]["cell"]

    def _decision(self, view: CurveView, action: str, why: str) -> dict:
        return {"group": view.key, "label": view.label, "action": action, "why": why,
                "interval_before": view.interval.as_list(), "interval_after": None}

    # ---- running a wave --------------------------------------------------------------------

    def _start_wave(self, state: SearchState, phase: str, tasks: list["_Task"], decisions: list[dict]) -> None:
        index = len(state.waves) + 1
        ids = []
        for task in tasks:
            trials = task.only or task.slot.trials
            cells = [self._search_cell(c, task) for c in trials]
            for original, cell in zip(trials, cells):
                state.cells[cell.id] = {
                    "group": task.slot.key, "batch_size": cell.batch_size, "seed": cell.seed,
                    "trial": ", ".join(f"{f}={flatten(cell.to_dict()).get(f)}" for f in TRIAL_FIELDS
                                       if len({json.dumps(flatten(t.to_dict()).get(f)) for t in task.slot.trials}) > 1),
                    "role": task.role, "why": task.why, "wave": index, "grid_cell": original.id,
                    "cell": cell.to_dict() | {"sweep": cell.sweep}, "state": "planned"}
                ids.append(cell.id)
            if len(cells) > 1 and not task.whole:  # the threshold's trials all run whole: no race
                total = _budget_steps(cells[0])
                r = race.rungs(total, self.spec.halving)
                state.races[f"{task.slot.key}|{task.slot.batch_size}|{task.slot.seed}"] = {
                    "group": task.slot.key, "batch_size": task.slot.batch_size, "seed": task.slot.seed,
                    "wave": index, "rungs": r, "rung": 0, "alive": [c.id for c in cells], "out": {}, "winner": None}
        for d in decisions:
            d["wave"] = index
        state.decisions.extend(decisions)
        state.waves.append({"index": index, "phase": phase, "cells": ids, "started": now(), "finished": None})
        write_state(self.store, state)
        self.log(f"critbatch search: wave {index} ({phase}): {len(tasks)} batch size(s), {len(ids)} cell(s)")
        for task in tasks:
            self.log(f"  {task.role} m={task.slot.batch_size} seed {task.slot.seed}: {task.why}")

    def _search_cell(self, cell: Cell, task: "_Task") -> Cell:
        if task.whole:
            return cell
        eps = self._eps_of(task.slot.key)
        expect = round(task.expect) if task.expect is not None and math.isfinite(task.expect) else None
        return cell.model_copy(update={"stop": {"threshold": eps, "confirm": self.spec.confirm,
                                                "confirm_evals": self.spec.confirm_evals, "expect": expect}})

    def _eps_of(self, key: str) -> float:
        return self.state.threshold["by_group"][key]

    def _finish_wave(self, state: SearchState) -> None:
        """Run the open wave's cells until each has finished or is out of its race; close the wave."""
        wave = state.open_wave
        races = {k: r for k, r in state.races.items() if r["wave"] == wave["index"]}
        in_race = {cid for r in races.values() for cid in list(r["alive"]) + list(r["out"])}
        while True:
            singles = [cid for cid in wave["cells"]
                       if cid not in in_race and state.cells[cid]["state"] in ("planned", INCOMPLETE)]
            runs: list[tuple[Cell, int | None]] = [(Cell.from_dict(state.cells[cid]["cell"]), None) for cid in singles]
            for r in races.values():
                if r.get("verdict") != "done":
                    pause = None if r["rung"] >= len(r["rungs"]) - 1 else r["rungs"][r["rung"]]
                    runs.extend((Cell.from_dict(state.cells[cid]["cell"]), pause) for cid in r["alive"])
            if not runs:
                break
            failed = self.backend.run(runs)
            self._observe(state)
            failed += [cid for cid in singles
                       if state.cells[cid]["state"] in ("planned", INCOMPLETE) and cid not in failed]
            if failed:
                write_state(self.store, state)
                raise SearchFailed(f"{len(failed)} cell(s) failed or did not finish: {', '.join(failed)}; fix the "
                                   "cause and run the search again (it resumes)")
            for r in races.values():
                if r.get("verdict") != "done":
                    self._judge(state, r)
            write_state(self.store, state)
        wave["finished"] = now()
        views = self._observe(state)
        for d in state.decisions:
            if d.get("wave") == wave["index"] and d["group"] in views:
                d["interval_after"] = views[d["group"]].interval.as_list()
        write_state(self.store, state)

    def _judge(self, state: SearchState, r: dict) -> None:
        summaries = {s.id: s for s in self._summaries(state)}
        eps = self._eps_of(r["group"])
        step = None if r["rung"] >= len(r["rungs"]) - 1 else r["rungs"][r["rung"]]
        views = [_trial_view(summaries.get(cid), cid, eps, step) for cid in r["alive"]]
        verdict = race.judge(views, self.spec.halving, last_rung=step is None)
        r["out"].update(verdict.out)
        for cid, why in verdict.out.items():
            state.cells[cid]["out"] = why
        r["alive"] = verdict.go_on if not verdict.done else []
        r["winner"] = verdict.winner
        if verdict.done:
            r["verdict"] = "done"
        elif step is not None and set(verdict.go_on) <= {v.cell_id for v in views if not math.isfinite(v.k)}:
            r["rung"] += 1  # nobody crossed yet: on to the next rung
        elif step is not None:
            r["rung"] = len(r["rungs"]) - 1  # the leader crossed: it runs on alone to its confirmation


@dataclass
class _Task:
    slot: Slot
    role: str
    why: str
    expect: float | None = None
    whole: bool = False  # run to the end of the budget (the threshold's cells), no stop
    only: list[Cell] | None = None  # the trials to run (the winner's, at another seed); default all


def curve_id(cell: Cell) -> str:
    """A short name for the cell's speedup curve: a hash of the analysis's group key (its defining fields)."""
    return _short(curve_key(cell.to_dict()))


def _budget_steps(cell: Cell) -> int:
    """The cell's epoch budget in steps (what the full grid runs it for)."""
    n = cell.train_size()
    if n is None:
        raise ConfigError(f"{cell.dataset.name}: the training-set size is unknown before loading it; "
                          "the search needs it to count the full grid's samples")
    return total_steps(cell, max(1, n // cell.batch_size))


def _trial_view(s: CellSummary | None, cell_id: str, eps: float, step: int | None) -> race.TrialView:
    if s is None:
        return race.TrialView(cell_id, INCOMPLETE, math.nan, 0, math.nan)
    curve = s.train_eval if s.train_eval is not None else s.running_mean
    k = crossing(curve.steps, curve.values, eps) if curve is not None and len(curve) else math.nan
    loss = math.nan
    if curve is not None and len(curve):
        at = curve.steps <= (step if step is not None else math.inf)
        if at.any():
            loss = float(curve.values[at][-1])
    return race.TrialView(cell_id, s.status, k, s.last_step, loss)


def _short(group_key: str) -> str:
    return "c" + hashlib.sha256(group_key.encode()).hexdigest()[:8]


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def wait_for_attached(store: Store, sweep: str, *, poll_s: float, log: Callable[[str], None],
                      holder_gone: Callable[[], bool]) -> SearchState | None:
    """Follow another search of ``sweep`` (it holds the lease): print its waves as they start, until it ends or
    ``holder_gone()`` (its lease lapsed: the caller may take over). The last state read."""
    seen = 0
    while True:
        state = read_state(store, sweep)
        if state is not None:
            for wave in state.waves[seen:]:
                log(f"critbatch search: (attached) wave {wave['index']} ({wave['phase']}): "
                    f"{len(wave['cells'])} cell(s)")
            seen = len(state.waves)
            if state.done:
                return state
        if holder_gone():
            return state
        time.sleep(poll_s)
