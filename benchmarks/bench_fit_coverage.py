"""How often the critical batch size's 95 % interval holds the truth, and how far the estimate is from it.

    .venv/bin/python benchmarks/bench_fit_coverage.py [--instances 1000] [--seeds 1 2 3 5]

Synthetic speedup curves (analysis.synthetic.censored_sweep: 13 batch sizes
4..16384, B_crit log-uniform in [64, 512], 15 % lognormal seed noise, an
example budget that censors the largest batch sizes) go through the same
compute step as a sweep's logs (analysis.compute.speedup_curve). Prints, per
seed count, the coverage of the interval and the median, 95th percentile and
largest relative error of B_crit. analysis.fit.MEASURED_COVERAGE holds the
coverage it printed (1000 instances per seed count, about a minute).
"""

from __future__ import annotations

import argparse

import numpy as np

from critbatch.analysis.compute import Group, speedup_curve
from critbatch.analysis.synthetic import censored_sweep


def measure(seeds: int, instances: int, seed: int = 2024) -> dict[str, float]:
    rng = np.random.default_rng([seed, seeds])
    group = Group("synthetic", {}, [], label="synthetic")
    errors, covered, failed = [], [], 0
    for _ in range(instances):
        sweep = censored_sweep(rng, seeds=seeds)
        fit = speedup_curve(group, "q25", 0.1, sweep.rows, bootstrap=0).fit
        if not fit.ok:
            failed += 1
            covered.append(False)
            continue
        errors.append(abs(fit.b_crit / sweep.b_crit - 1))
        covered.append(fit.b_lo <= sweep.b_crit <= fit.b_hi)
    e = np.array(errors)
    return {"coverage": float(np.mean(covered)), "median": float(np.median(e)), "p95": float(np.percentile(e, 95)),
            "max": float(e.max()), "no_fit": failed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 5])
    args = p.parse_args()
    for seeds in args.seeds:
        r = measure(seeds, args.instances)
        print(f"{seeds} seed(s): coverage {r['coverage']:.3f}; |B_crit error| median {r['median']:.3f}, "
              f"95th percentile {r['p95']:.3f}, largest {r['max']:.3f}; no fit {r['no_fit']}")


if __name__ == "__main__":
    main()
