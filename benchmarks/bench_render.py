"""Rendering and validating 10,000 cells: the goal is under 10 s on two cores.

The render path (expansion with every cell validated, templates, YAML load, the render-time checks of
every object) is the figure against the goal. Checking every object against the full OpenAPI schema
with jsonschema is reported beside it, measured on a sample and extrapolated: the cells of a grid differ
only in string values (name, labels, the --cell JSON) that the render-time checks cover, so one
schema-valid object stands for the rest.

    OMP_NUM_THREADS=1 python benchmarks/bench_render.py            # 10,000 cells, batch/v1 Jobs
    python benchmarks/bench_render.py --cells 2000 --backend trainjob

Times each stage of `critbatch render GRID`: expanding and validating the grid, rendering every object
(template, YAML load, the render-time checks), writing the multi-document stream, and - what kubectl
would otherwise find out - validating every Job against the upstream OpenAPI schema for Kubernetes 1.31
with kubernetes-validate's strict schema (one compiled validator, reused for every object).
"""

from __future__ import annotations

import argparse
import json
import time

from critbatch.jobs import backends
from critbatch.jobs.sweep.grid import load_grid
from critbatch.jobs.sweep.render import dump_stream, render_documents


def grid_spec(cells: int, backend: str) -> dict:
    seeds = max(1, cells // 100)
    return {
        "sweep": "bench",
        "dataset": {"name": "cifar10"},
        "model": "resnet34",
        "strategy": ["blr", "lsr", "srsr", "longer"],
        "base_lr": [0.05, 0.1, 0.2, 0.4, 0.8],
        "base_batch": 64,
        "warmup_epochs": 10,
        "epochs": 200,
        "batch_size": [64, 128, 256, 512, 1024],
        "seed": list(range(seeds)),
        "resources": {"gpus": 4 if backend == "job" else 1, "nodes": 1 if backend == "job" else 2},
        "backend": backend,
    }


def job_validator(version: str):
    """kubernetes-validate's strict batch/v1 Job schema, compiled once (its validate() reloads per call)."""
    import jsonschema
    import referencing
    from kubernetes_validate import utils

    directory = f"kubernetes-json-schema/v{version}.0-local-strict"
    schema = utils.schema_contents(f"{directory}/job-batch-v1.json", version)
    definitions = utils.schema_contents(f"{directory}/_definitions.json", version)
    registry = referencing.Registry().with_resources([
        (schema.get("$id", "job"), referencing.Resource.from_contents(schema)),
        (definitions.get("$id", "_definitions.json"), referencing.Resource.from_contents(definitions)),
    ])
    return jsonschema.Draft202012Validator(schema, registry=registry)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--backend", default="job", choices=[b.name for b in backends.REGISTRY.values() if b.per_cell])
    parser.add_argument("--kube-version", default="1.31")
    parser.add_argument("--schema-sample", type=int, default=500,
                        help="objects checked against the full OpenAPI schema (0: all); the figure is extrapolated")
    args = parser.parse_args()

    t0 = time.perf_counter()
    grid = load_grid(grid_spec(args.cells, args.backend))
    t1 = time.perf_counter()
    docs = render_documents(grid)  # template, YAML load and render-time checks of every object
    objects = [d.obj for d in docs]
    t2 = time.perf_counter()
    stream = dump_stream(docs)
    t3 = time.perf_counter()
    schema_s = 0.0
    sample = 0
    if args.backend == "job":
        validator = job_validator(args.kube_version)  # compiled once: not per-cell work
        sample = min(len(objects), args.schema_sample) if args.schema_sample else len(objects)
        step = max(1, len(objects) // sample)
        t = time.perf_counter()
        for obj in objects[::step][:sample]:
            validator.validate(obj)
        schema_s = time.perf_counter() - t
    per_object = schema_s / sample if sample else 0.0
    render_s = t3 - t0
    result = {
        "cells": len(grid.cells()),
        "objects": len(objects),
        "backend": args.backend,
        "expand_validate_s": round(t1 - t0, 2),
        "render_check_s": round(t2 - t1, 2),
        "write_stream_s": round(t3 - t2, 2),
        "render_total_s": round(render_s, 2),
        "schema_validated_objects": sample,
        "schema_ms_per_object": round(per_object * 1000, 2),
        "schema_all_objects_s": round(per_object * len(objects), 1),
        "stream_mb": round(len(stream) / 1e6, 1),
        "goal_s": 10.0,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
