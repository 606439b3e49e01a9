"""Cost of logging one training step, and the writer's memory, over 10^6 steps into a local store.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_logging.py          # 10^6 steps, a part every 500 rows
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_logging.py --steps 100000 --rate 20000

Each loop builds a step's row dict (what the train loop pays anyway) and logs it.
Runs, in this one process, each into a fresh local store, each read back whole
at the end (a benchmark that loses rows is void):

1. baseline: build the rows and drop them;
2. paced at ``--rate`` steps per second (a fast real trainer; the writer keeps
   up): each ``log_step`` call timed (median, 99.9th percentile, worst), the
   CPU time of the cutter and uploader threads per row, and the RSS growth;
3. paced at ``--trace-rate`` under tracemalloc: the peak of Python allocations the
   stream holds at a steady state;
4. flat out: build and ``log_step`` as fast as Python goes, then ``close()``. A
   worst case: no trainer makes 500,000 steps a second, so the writer falls
   behind and rows pile up in the buffer. Training-thread cost = (4) - (1) per
   step in wall time, GIL contention with the writer threads included; logging
   CPU = extra process CPU time per row, every thread, until every part is in
   the store; the buffer's largest backlog and the RSS it costs.

It also times the two ways of turning a part's rows into an Arrow table.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa

from critbatch.jobs.cell.logschema import STEPS_SCHEMA, ipc_to_table
from critbatch.jobs.store.logstream import LogStream
from critbatch.jobs.store import LocalStore

PREFIX = "bench/cells/0123456789ab"
CELL = "0123456789ab"
PAGE = os.sysconf("SC_PAGE_SIZE")


def make_row(step: int) -> dict:
    row = {"step": step, "epoch": step / 781.0, "samples_seen": 64 * step, "lr": 0.1, "train_loss": 2.3 / step,
           "wall_time_s": step * 0.01}
    if step % 10 == 0:  # noise statistics on a tenth of the steps
        row.update(noise_b_small=8, noise_b_big=64, noise_g_small_sq=1.5, noise_g_big_sq=0.25)
    return row


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


def thread_cpu(thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def new_stream(workdir: Path, name: str, flush_steps: int) -> tuple[LocalStore, LogStream]:
    store = LocalStore(workdir / f"store-{name}")
    log = LogStream(store, PREFIX, spool_dir=workdir / f"spool-{name}", flush_steps=flush_steps,
                    flush_seconds=15.0, cell_id=CELL)
    log.resume(None)
    return store, log


def read_back(store: LocalStore, steps: int) -> int:
    keys = store.list(f"{PREFIX}/steps/")
    rows = sum(ipc_to_table(store.get_bytes(k)).num_rows for k in keys)
    assert rows == steps, f"{rows} rows read back, {steps} logged"
    return len(keys)


def baseline(steps: int) -> float:
    started = time.perf_counter()
    sink = None
    for step in range(1, steps + 1):
        sink = make_row(step)
    del sink
    return time.perf_counter() - started


def flat_out(steps: int, flush_steps: int, workdir: Path) -> dict:
    store, log = new_stream(workdir, "flat", flush_steps)
    rss0, rss_peak, backlog = rss_mb(), 0.0, 0
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(1, steps + 1):
        log.log_step(make_row(step))
        if step % 4096 == 0:
            backlog = max(backlog, len(log._steps))
            rss_peak = max(rss_peak, rss_mb())
    loop = time.perf_counter() - wall
    log.close()
    return {"loop": loop, "total": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
            "parts": read_back(store, steps), "backlog": backlog, "rss_growth": rss_peak - rss0}


def paced(steps: int, flush_steps: int, rate: float, workdir: Path, name: str, trace: bool = False) -> dict:
    """Log at ``rate`` steps/s: bursts of 100 steps, then sleep until the schedule catches up."""
    store, log = new_stream(workdir, name, flush_steps)
    lat = np.empty(steps, dtype=np.int64)
    now = time.perf_counter_ns
    rss0, rss_peak, backlog = rss_mb(), 0.0, 0
    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        row = make_row(step)
        t0 = now()
        log.log_step(row)
        lat[step - 1] = now() - t0
        if step % 100 == 0:
            ahead = started + step / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
            backlog = max(backlog, len(log._steps))
            if step % 10_000 == 0:
                rss_peak = max(rss_peak, rss_mb())
    log.sync()
    cutter, uploader = thread_cpu(log._cutter), thread_cpu(log._uploader)
    log.close()
    out = {"lat": lat, "cutter": cutter, "uploader": uploader, "wall": time.perf_counter() - started,
           "rss_growth": rss_peak - rss0, "backlog": backlog}
    if trace:
        out["py_peak"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    read_back(store, steps)
    return out


def conversions(flush_steps: int, workdir: Path, repeat: int = 200) -> dict[str, float]:
    """ns per row of the two ways to build one part's table."""
    rows = [make_row(s) for s in range(1, flush_steps + 1)]
    _, log = new_stream(workdir, "conversion", flush_steps)

    def column_wise() -> pa.Table:
        columns = [pa.array([CELL] * len(rows), pa.string())]
        columns += [pa.array([r.get(f.name) for r in rows], type=f.type) for f in list(STEPS_SCHEMA)[1:]]
        return pa.Table.from_arrays(columns, schema=STEPS_SCHEMA)

    def from_pylist() -> pa.Table:  # what LogStream does
        return log._to_table("steps", rows)

    assert column_wise().equals(from_pylist())
    out = {}
    for fn in (column_wise, from_pylist):
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        out[fn.__name__] = (time.perf_counter() - started) / repeat / len(rows) * 1e9
    log.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--flush-steps", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50_000, help="steps per second of the paced run")
    parser.add_argument("--trace-rate", type=float, default=12_500,
                        help="steps per second under tracemalloc, which slows the writer")
    args = parser.parse_args()
    n, ns = args.steps, 1e9 / args.steps
    workdir = Path(tempfile.mkdtemp(prefix="bench-logging-"))
    try:
        conv = conversions(args.flush_steps, workdir)
        gc.collect()
        base = baseline(n)
        pace = paced(n, args.flush_steps, args.rate, workdir, "paced")
        gc.collect()
        traced = paced(n, args.flush_steps, args.trace_rate, workdir, "traced", trace=True)
        gc.collect()
        flat = flat_out(n, args.flush_steps, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    lat = pace["lat"]
    print(f"{n:,} steps, a part every {args.flush_steps} rows ({flat['parts']} parts), local store")
    print(f"rows -> Arrow table: column by column {conv['column_wise']:.0f} ns/row, "
          f"pa.Table.from_pylist {conv['from_pylist']:.0f} ns/row (used)")
    print(f"flat out: build a row {base * ns:.0f} ns, build + log_step {flat['loop'] * ns:.0f} ns "
          f"-> log_step {(flat['loop'] - base) * ns:.0f} ns/step on the training thread (GIL contention included); "
          f"logging CPU, every thread, {flat['cpu'] * ns - base * ns:.0f} ns/row; loop {flat['loop']:.2f} s, "
          f"every part stored after {flat['total']:.2f} s; largest backlog {flat['backlog']:,} rows, "
          f"RSS +{flat['rss_growth']:.0f} MiB")
    print(f"paced at {args.rate:,.0f} steps/s ({pace['wall']:.1f} s): log_step median {np.median(lat):.0f} ns, "
          f"p99.9 {np.percentile(lat, 99.9) / 1e3:.1f} us, worst {lat.max() / 1e6:.2f} ms; writer threads "
          f"CPU cutter {pace['cutter'] * ns:.0f} ns/row + uploader {pace['uploader'] * ns:.0f} ns/row; "
          f"largest backlog {pace['backlog']:,} rows; RSS +{pace['rss_growth']:.1f} MiB; Python allocations peak "
          f"{traced['py_peak']:.2f} MiB (tracemalloc, at {args.trace_rate:,.0f} steps/s, "
          f"backlog {traced['backlog']:,} rows)")


if __name__ == "__main__":
    main()
