"""``critbatch search`` end to end on a tiny linreg grid: local directory and loopback S3, resume, attach, the
controller's manifests."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest

from critbatch.analysis.report import analyze, render_files
from critbatch.jobs import cli
from critbatch.jobs.cell.layout import cell_prefix, success_key
from critbatch.jobs.search.backends import LocalBackend
from critbatch.jobs.search.command import search_lease
from critbatch.jobs.search.loop import Search, wait_for_attached
from critbatch.jobs.search.state import SearchState, read_state, state_key, write_state
from critbatch.jobs.store import open_store
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.backends import k8s
from critbatch.jobs.sweep import render
from critbatch.jobs.sweep.grid import load_grid
from critbatch.jobs.train.main import train_cell
from critbatch.jobs.train.trainer import Paused

KUBE_VERSION = "1.31"  # as tests/test_render.py validates

TINY = {
    "sweep": "tiny", "dataset": {"name": "linreg", "options": {"n": 64, "d": 128, "spikes": 4, "spike_var": 20.0}},
    "model": "linear", "strategy": "blr", "base_lr": [0.01, 0.02], "base_batch": 2, "epochs": 8,
    "batch_size": [2, 4, 8, 16, 32], "seed": [0, 1], "optimizer": {"name": "sgd", "momentum": 0.0, "weight_decay": 0.0},
    "eval": {"points": 24, "train_subset": None}, "noise": {"every": 0},
    "resources": {"gpus": 0, "nodes": 1, "cpu": 1, "memory": "1Gi", "shm": "1Gi"},
    "search": {"budget": 0.6, "target": 0.6, "ladder": 4},
}


class InProcess:
    """The search's backend in this process (no subprocess start-up): the executor's contract, a cell whose
    ``_SUCCESS`` exists is skipped; which cells really trained is kept."""

    parallel = 2

    def __init__(self, store, interrupt_at_call=None):
        self.store, self.trained, self.calls, self.interrupt_at_call = store, [], 0, interrupt_at_call

    def run(self, runs):
        self.calls += 1
        if self.calls == self.interrupt_at_call:
            raise KeyboardInterrupt  # Ctrl-C while the executor runs a wave's cells
        for cell, pause in runs:
            if self.store.exists(success_key(cell.sweep, cell.id)):
                continue
            self.trained.append(cell.id)
            try:
                train_cell(cell, self.store, data_root="unused", progress="none", pause_at=pause)
            except Paused:
                pass
        return []


def search(store, **kwargs):
    grid = load_grid(TINY)
    backend = InProcess(store, **kwargs)
    return Search(grid, store, backend, grid.search, log=lambda line: None), backend


@pytest.mark.slow
def test_search_end_to_end(cpu_env, any_store_url):
    store = open_store(any_store_url)
    store.check()
    s, backend = search(store)
    state = s.run()
    assert state.status in ("decided", "budget spent", "exhausted") and read_state(store, "tiny").status == state.status
    # threshold first: the largest batch size whole, every seed and trial; eps fixed from it
    assert [w["phase"] for w in state.waves[:2]] == ["threshold", "ladder"]
    first = [state.cells[c] for c in state.waves[0]["cells"]]
    assert {(c["batch_size"], c["role"]) for c in first} == {(32, "threshold")} and len(first) == 4
    assert all(c["state"] == "done" and "stop" not in c["cell"] for c in first)
    assert set(state.threshold["from_batch_size"].values()) == {32} and state.threshold["eps"] is None
    # every later cell stopped at eps (or was put out of its race, or ran out of budget)
    later = [c for c in state.cells.values() if c["role"] != "threshold"]
    assert later and all(c["cell"]["stop"]["threshold"] == state.threshold["by_group"][c["group"]] for c in later)
    reached = [c for c in later if c["state"] == "reached"]
    assert reached and all(isinstance(c["k"], float) for c in reached)
    assert all(json.loads(store.get_text(success_key("tiny", cid)))["status"] == "reached"
               for cid, c in state.cells.items() if c["state"] == "reached")
    # the races: a winner per batch size, the others out with a reason
    assert state.races and all(r["winner"] for r in state.races.values())
    assert all(c.get("out") for c in later if c["state"] == "incomplete")
    # decisions carry the interval before and after; the compute is counted against the full grid's
    assert all(d["interval_after"] is not None for d in state.decisions)
    refine = [d for d in state.decisions if d["action"].startswith("add")]
    assert all(d["interval_before"][1] is not None and "interval_predicted" in d for d in refine)
    assert 0 < state.spent["samples"] <= 0.6 * state.full_grid["samples"] + max(
        c["samples"] for c in state.cells.values())
    group = next(iter(state.groups.values()))
    assert group["interval"][0] <= group["interval"][1] <= group["interval"][2]
    # the report: the same headline as the search's last fit (same cells, same eps), and what the search did
    a = analyze(store, ["tiny"], bootstrap=0)
    (result,) = a.primary_results()
    assert result.summary["b_crit"] == pytest.approx(group["interval"][1], rel=1e-6)
    summary_md = render_files(a, store_url=store.url)["summary.md"].decode()
    assert f"## The search (tiny: {state.status})" in summary_md and "| 3 | linreg/linear/blr | add " in summary_md
    assert f"{state.spent['samples']:,} samples" in summary_md and "learning-rate races" in summary_md
    # a cell trains again only to go on from its pause (a race's next rung), never once it has finished
    again = [cid for cid in set(backend.trained) if backend.trained.count(cid) > 1]
    assert all(state.cells[cid]["role"] != "threshold" and any(cid in r["alive"] + list(r["out"]) + [r["winner"]]
                                                               for r in state.races.values()) for cid in again)


@pytest.mark.slow
def test_an_interrupted_search_resumes_without_rerunning_a_finished_cell(cpu_env, tmp_path):
    straight_store = open_store(str(tmp_path / "straight"))
    straight = search(straight_store)[0].run()

    store = open_store(str(tmp_path / "store"))
    first, _ = search(store, interrupt_at_call=2)  # the threshold's wave is the first call; the ladder's is cut
    with pytest.raises(KeyboardInterrupt):
        first.run()
    after_one = read_state(store, "tiny")
    assert [(w["phase"], w["finished"] is None) for w in after_one.waves] == [("threshold", False), ("ladder", True)]
    assert after_one.status == "running"
    finished = {cid for cid in after_one.cells if store.exists(success_key("tiny", cid))}
    assert len(finished) == 4 and finished == set(after_one.waves[0]["cells"])

    again, backend = search(store)
    state = again.run()
    assert not finished & set(backend.trained)
    assert state.status == straight.status and set(state.cells) == set(straight.cells)
    assert [d["action"] for d in state.decisions] == [d["action"] for d in straight.decisions]
    assert state.groups == straight.groups
    # and once it is over a re-run runs nothing
    idle, backend = search(store)
    assert idle.run().status == state.status and backend.trained == []


@pytest.mark.slow
def test_local_backend_runs_and_pauses_cells_through_the_executor(cpu_env, tmp_path):
    store = open_store(str(tmp_path / "store"))
    grid = load_grid(TINY)
    cells = [c.model_copy(update={"stop": {"threshold": 0.5}}) for c in grid.cells()[:2]]
    failed = LocalBackend(store, parallel=2, log_dir=str(tmp_path / "logs")).run([(c, 3) for c in cells])
    assert failed == []
    for cell in cells:  # each a `critbatch train --pause-at 3` subprocess: checkpointed at step 3, no _SUCCESS
        assert not store.exists(success_key("tiny", cell.id))
        assert store.list(cell_prefix("tiny", cell.id) + "/checkpoint/")
        assert "paused at step 3" in (tmp_path / "logs" / f"tiny-{cell.id}.log").read_text()


def test_a_second_search_follows_the_running_one(cpu_env, tmp_path, capsys):
    store_url = str(tmp_path / "store")
    store = open_store(store_url)
    grid = tmp_path / "tiny.json"
    grid.write_text(json.dumps(TINY))
    state = SearchState("tiny", {}, status="decided", full_grid={"cells": 20, "samples": 1000},
                        spent={"samples": 200, "cells": 5},
                        groups={"c1": {"label": "linreg/linear/blr", "eps": 0.1, "interval": [3.0, 4.0, 5.5],
                                       "state": "decided", "why": "narrow enough"}})
    write_state(store, state)  # what the other search wrote when it ended
    holder = search_lease(store, "tiny").acquire()  # another search holds the sweep
    try:
        assert cli.main(["search", str(grid), "--store", store_url, "--poll-seconds", "0.05"]) == 0
    finally:
        holder.release()
    out = capsys.readouterr()
    assert "another search of tiny is running" in out.err and f"tiny: {state.status}" in out.out
    assert "B_crit = 4 [3, 5.5] at eps = 0.1" in out.out and "200 samples of the full grid's 1,000 (20.0%)" in out.out
    assert cli.main(["search", str(grid), "--store", store_url]) == 0  # over: the answer, nothing run
    assert "nothing to run" in capsys.readouterr().err


def test_a_follower_stops_following_when_the_holders_lease_lapses(tmp_path):
    store = open_store(str(tmp_path / "store"))
    write_state(store, SearchState("tiny", {}, status="running"))
    looks = []

    def gone() -> bool:  # the holder's lease: live at the first look, lapsed at the second
        looks.append(1)
        return len(looks) == 2

    state = wait_for_attached(store, "tiny", poll_s=0.0, log=lambda line: None, holder_gone=gone)
    assert state.status == "running" and len(looks) == 2  # the caller then takes the lease over


def test_search_block_is_validated():
    with pytest.raises(Exception, match=r"search\.budget: 1\.5 is outside \(0, 1\]"):
        load_grid({**TINY, "search": {"budget": 1.5}})
    with pytest.raises(Exception, match=r"search\.ladder: unknown field|search\.steps: unknown field"):
        load_grid({**TINY, "search": {"steps": 3}})


def test_controller_manifests_validate(tmp_path):
    grid = load_grid({**TINY, "image": "registry.example/critbatch:1", "store": "s3://bucket/runs"})
    docs = render.render_search_documents(grid)
    kinds = [d.obj["kind"] for d in docs]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "Job"]
    for d in docs:
        assert kubernetes_validate.validate(d.obj, KUBE_VERSION, strict=True) == KUBE_VERSION
    job = docs[-1].obj
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "critbatch-tiny-search" and pod["automountServiceAccountToken"] is True
    args = pod["containers"][0]["args"]
    assert args[0] == "search" and args[2:4] == ["--cluster", "--poll-seconds"]
    assert load_grid(json.loads(args[1])).cell_ids() == grid.cell_ids()  # the grid travels whole
    role = docs[1].obj
    assert {"create", "delete", "watch"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["jobs"]
    assert docs == render.render_search_documents(grid)  # a pure function of the grid
    assert cli.main(["search", str(_write(tmp_path, grid.raw)), "--controller"]) == 0


def _write(tmp_path, raw):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(raw))
    return path


def test_state_key():
    assert state_key("tiny") == "tiny/search.json"


class FakeCluster:
    """The calls the submit path makes (list, create, set_suspended, delete) on objects kept in memory; a
    'kubelet' trains a created cell's pod in this process when the test polls."""

    def __init__(self, store):
        self.store, self.objects, self.created, self.deleted = store, {}, [], []

    def list(self, kind, selector):
        return [] if kind == "Pod" else [o for o in self.objects.values() if o["kind"] == kind]

    def create(self, obj):
        name = obj["metadata"]["name"]
        if name in self.objects:
            return False
        self.objects[name] = obj
        self.created.append(name)
        return True

    def set_suspended(self, kind, name, suspend):
        self.objects[name]["spec"]["suspend"] = suspend
        return True

    def delete(self, kind, name):
        self.deleted.append(name)
        return self.objects.pop(name, None) is not None

    def kubelet(self, seconds):
        """Each running object's pod trains its cell to the end, and the object completes."""
        for obj in list(self.objects.values()):
            if obj["spec"].get("suspend") or obj.get("status"):
                continue
            args = obj["spec"]["template"]["spec"]["containers"][0]["args"]
            cell = Cell.from_json(args[args.index("--cell") + 1])
            train_cell(cell, self.store, data_root="unused", progress="none")
            obj["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}


def test_cluster_backend_creates_watches_and_pauses_through_the_submit_path(cpu_env, tmp_path):
    from critbatch.jobs.search.cluster import ClusterBackend, one_cell_grid

    store = open_store(str(tmp_path / "store"))
    grid = load_grid({**TINY, "image": "registry.example/critbatch:1"})
    done, paused = (c.model_copy(update={"stop": {"threshold": 0.5}}) for c in grid.cells()[:2])
    assert one_cell_grid(grid, done).cell_ids() == [done.id]
    # a trial asked to pause at step 3 whose logs already reached it: its object goes, nothing waits for it
    with pytest.raises(Paused):
        train_cell(paused, store, data_root="unused", progress="none", pause_at=3)
    cluster = FakeCluster(store)
    backend = ClusterBackend(grid, cluster, store, poll_seconds=0.0, log=lambda line: None, sleep=cluster.kubelet)
    assert backend.run([(done, None), (paused, 3)]) == []
    assert cluster.created == [f"critbatch-tiny-{done.id}"]  # the paused one was already at its step
    assert store.exists(success_key("tiny", done.id)) and not store.exists(success_key("tiny", paused.id))
    assert cluster.deleted == [f"critbatch-tiny-{paused.id}"]
    job = cluster.objects[f"critbatch-tiny-{done.id}"]
    assert job["metadata"]["labels"][k8s.LABEL_CELL] == done.id
