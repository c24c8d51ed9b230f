"""What the 95% intervals add to a run: the bootstrap of every figure a trial records, against the point figures.

    python bench/interval_cost.py                         # the quickstart's sizes and two larger ones
    python bench/interval_cost.py --sizes 48x256 500x64 --resamples 1000 --repeats 5

For each size (generated samples x feature dimensions; the held-out reference as large as the generated set, the
training set 32 rows), seeded Gaussian features stand in for embedder outputs (the cost depends only on the shapes).
Two ways of measuring one run are timed, interleaved ``--repeats`` times:

* ``point``: what a trial computed before intervals: copy detection (mean, p95, copy fraction), FD, KID;
* ``with intervals``: the same figures with their 95% intervals, as ``memcontrol.search.objectives.measure`` records
  them (``copy_detection`` and ``quality_report`` with a shared resample matrix of ``--resamples`` rows).

Prints the median seconds of each, the spread (min to max), the ratio and the machine. Generating the quality
samples themselves costs far more than either (about 2.5 s a sample at 64 px on one core, quickstart model).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def point_figures(gen, train, keys, held):
    from memcontrol.metrics.memorization import copy_detection
    from memcontrol.metrics.quality import frechet_distance, kid

    sims = copy_detection(gen, train, keys, tau=0.9, indices=np.arange(len(gen))[None])
    return sims["mean"], frechet_distance(held, gen), kid(held, gen, subsets=10, subset_size=1000)


def with_intervals(gen, train, keys, held, held_stats, resamples):
    from memcontrol.metrics.intervals import bootstrap_indices
    from memcontrol.metrics.memorization import copy_detection
    from memcontrol.metrics.quality import quality_report

    idx = bootstrap_indices(len(gen), resamples, seed=0)
    copies = copy_detection(gen, train, keys, tau=0.9, indices=idx)
    quality = quality_report(held, gen, "bench", 10, 1000, 0, idx, held_stats)
    return copies["mean_ci_low"], quality["fd_ci_low"], quality["kid_ci_low"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["48x256", "256x64", "500x64"],
                    help="generated samples x feature dimensions")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from memcontrol.metrics.quality import gaussian_stats

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"{args.threads} thread(s); numpy {np.__version__}, torch {torch.__version__}")
    print(f"{args.resamples} bootstrap resamples; median of {args.repeats} interleaved repeats [min, max]")
    print("| samples x dims | point figures (s) | with 95% intervals (s) | ratio |")
    print("|---|---|---|---|")
    for size in args.sizes:
        n, d = (int(x) for x in size.split("x"))
        rng = np.random.default_rng(0)
        gen = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32))
        held = torch.from_numpy(rng.normal(0.2, 1.0, size=(n, d)).astype(np.float32))
        train = torch.from_numpy(rng.normal(size=(32, d)).astype(np.float32))
        keys = [f"p{i}" for i in range(32)]
        held_stats = gaussian_stats(held)    # fitted once per worker in the search, not per run
        times = {"point": [], "intervals": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            point_figures(gen, train, keys, held)
            times["point"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with_intervals(gen, train, keys, held, held_stats, args.resamples)
            times["intervals"].append(time.perf_counter() - t0)
        a, b = statistics.median(times["point"]), statistics.median(times["intervals"])
        print(f"| {n} x {d} | {a:.3f} [{min(times['point']):.3f}, {max(times['point']):.3f}] | "
              f"{b:.3f} [{min(times['intervals']):.3f}, {max(times['intervals']):.3f}] | {b / a:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
