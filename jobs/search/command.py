"""``critbatch search``: the critical batch size from a fraction of a grid's compute.

    critbatch search digits --store ./out --parallel 2            # here: the cells as subprocesses
    critbatch search GRID --cluster --image REG/critbatch:TAG     # the cells as Jobs; this process decides
    critbatch search GRID --controller --image REG/critbatch:TAG | kubectl apply -f -
                                                                  # the deciding loop as a Job of its own

The grid's ``search:`` block says the budget, the target width of B_crit's
interval and the ladder (jobs/sweep/searchspec.py); the loop is in loop.py,
its state in ``<sweep>/search.json``. A second search of a sweep whose search
is running (its lease in the store is live) follows that one's progress and
prints its answer instead of running anything, and takes over if that one's
lease lapses first (its process died). Exit 0 once the search has
ended (decided, or its budget or the grid spent), 1 if cells failed (the
state is kept: a re-run resumes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..cell.errors import ConfigError, LeaseHeld
from ..cell.layout import DEFAULT_STORE
from ..local.executor import write_sweep_spec
from ..store import Store, open_store
from ..store.lease import Lease, live_holder
from ..sweep.grid import Grid, grid_from_dict, load_grid
from ..sweep.searchspec import SearchSpec
from .backends import LocalBackend
from .loop import Search, SearchFailed, wait_for_attached
from .state import SearchState

#: Seconds a search's lease lives without renewal (renewed every third of it).
LEASE_SECONDS = 120.0


def search_lease(store: Store, sweep: str) -> Lease:
    """The lease that makes one search per sweep: ``<sweep>/search/lease/``."""
    return Lease(store, f"{sweep}/search", ttl_s=LEASE_SECONDS)


def grid_of(text: str) -> Grid:
    """A grid from a path, a preset name, or inline JSON (how the controller Job passes it)."""
    if text.lstrip().startswith("{"):
        try:
            return grid_from_dict(json.loads(text), source="--grid JSON")
        except json.JSONDecodeError as err:
            raise ConfigError(f"grid: not valid JSON ({err})") from None
    return load_grid(text)


def cli_search(args: argparse.Namespace) -> int:
    grid = grid_of(args.grid)
    if args.parallel < 1:
        raise ConfigError(f"--parallel: must be at least 1, got {args.parallel}")
    if args.controller:
        from ..sweep.render import dump_stream, render_search_documents

        sys.stdout.write(dump_stream(render_search_documents(_cluster_grid(grid, args))))
        return 0
    if args.cluster:
        grid = _cluster_grid(grid, args)
        store = open_store(grid.store)
    else:
        log_dir = Path(args.log_dir) if args.log_dir else None
        if log_dir is not None and any(p.exists() and not p.is_dir() for p in (log_dir, *log_dir.parents)):
            raise ConfigError(f"--log-dir: {args.log_dir} is at or under a file; give a directory")
        store = open_store(args.store or (grid.store if not grid.store.startswith("s3://") else DEFAULT_STORE))
    store.check()
    spec = grid.search or SearchSpec()

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    lease = search_lease(store, grid.sweep)
    while True:
        try:
            lease.acquire()
            break
        except LeaseHeld as held:
            log(f"critbatch search: another search of {grid.sweep} is running ({held}); following it")
            state = wait_for_attached(store, grid.sweep, poll_s=args.poll_seconds, log=log,
                                      holder_gone=lambda: live_holder(store, f"{grid.sweep}/search") is None)
            if state is not None and state.done:
                print(summary(state))
                return 0
            log("critbatch search: its lease lapsed before it ended; taking over")
    try:
        lease.start_renewing()
        write_sweep_spec(store, grid.sweep, grid.sweep_yaml())
        if args.cluster:
            from .cluster import ClusterBackend

            backend = ClusterBackend.connect(grid, store, poll_seconds=args.poll_seconds, log=log)
        else:
            backend = LocalBackend(store, parallel=args.parallel, data_root=args.data_root, log_dir=args.log_dir,
                                   nproc=grid.world_size, checkpoint_seconds=grid.checkpoint_seconds,
                                   label=grid.sweep)
        search = Search(grid, store, backend, spec, log=log)
        try:
            state = search.run()
        except SearchFailed as err:
            log(f"critbatch search: {err}")
            return 1
    finally:
        lease.release()
    print(summary(state))
    return 0


def _cluster_grid(grid: Grid, args: argparse.Namespace) -> Grid:
    return grid.with_overrides(store=args.store, image=args.image, namespace=args.namespace)


def summary(state: SearchState) -> str:
    """The answer in a few lines: per curve B_crit with its interval, and the compute against the full grid's."""
    full = state.full_grid.get("samples") or 0
    spent = state.spent.get("samples", 0)
    ratio = f"{spent / full:.1%}" if full else "n/a"
    lines = [f"critbatch search: {state.sweep}: {state.status}; spent {spent:,} samples of the full grid's "
             f"{full:,} ({ratio}), {state.spent.get('cells', 0)} cells run of {state.full_grid.get('cells', 0)}"]
    for entry in state.groups.values():
        lo, b, hi = entry.get("interval") or [None, None, None]
        text = (f"B_crit = {_num(b)} [{_num(lo)}, {_num(hi)}]" if b is not None else
                f"no fit ({entry.get('fit_problem') or 'nothing measured'})")
        lines.append(f"  {entry.get('label', '?')}: {text} at eps = {entry.get('eps', math.nan):.4g}; "
                     f"{entry.get('state')}{': ' + entry['why'] if entry.get('why') else ''}")
    return "\n".join(lines)


def _num(v) -> str:
    if v is None:
        return "-"
    if v == "inf":
        return "inf"
    return f"{float(v):.3g}"
