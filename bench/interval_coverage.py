"""Do the Fréchet distance's 95% intervals cover the true distance? A simulation, and the bias on a finished study.

    python bench/interval_coverage.py                    # simulation at the headline's sizes
    python bench/interval_coverage.py --run runs/paper   # a finished study instead: each run, and its claim

Every FD interval memcontrol prints is the *percentile* interval of a bootstrap over generated samples
(``memcontrol.metrics.intervals``). A resample repeats rows, so its covariance is narrower and its distance larger
than the estimate's, by about the estimate's own small-sample bias: the percentile interval sits above the point
value, both biases added. The *basic* interval [2v - q_hi, 2v - q_lo] of the same resamples subtracts that bias
instead.

Simulation: generated features N(mu, s^2 I) against a reference N(0, I) known exactly, so the true distance is
|mu|^2 + d (s - 1)^2. For each true distance, ``--reps`` seeded replications of ``--samples`` generated rows; each
interval from ``--resamples`` resamples. Printed: the mean estimate, and how often each interval covers the truth
(nominal 0.95; the binomial standard error of a coverage over 200 replications is 0.015). Then the same for the
paired difference of two runs with different spreads (their biases differ, so they do not cancel).

``--run DIR`` (no simulation then): for each run of a finished search that kept its quality features, the point FD
against the held-out reference, the bootstrap's bias (mean of the resamples minus the point) and both intervals, as
the claim computes them (1,000 resamples from ``--seed``, the study's sampling seed); then each quality comparison
of ``DIR/claim.json`` (the chosen candidate minus another row, paired) under both intervals, with its verdict.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from memcontrol.metrics.intervals import (Interval, bootstrap_indices, percentile_interval,  # noqa: E402
                                          resampled_frechet)


def both(value: float, resampled: np.ndarray) -> dict:
    """The percentile interval of ``resampled`` and the basic interval of the same quantiles."""
    p = percentile_interval(value, resampled)
    return {"percentile": p, "basic": Interval(p.value, 2 * value - p.high, 2 * value - p.low)}


def gaussian_run(rng, n: int, d: int, mean: float, spread: float) -> np.ndarray:
    shift = np.zeros(d)
    shift[0] = mean
    return rng.normal(size=(n, d)) * spread + shift


def coverage(statistic_of, truth: float, n: int, reps: int, resamples: int, seed: int) -> dict:
    """How often each interval covers ``truth``; ``statistic_of(rng)`` draws one replication's data and returns its
    resampled statistic (index matrix -> values)."""
    rng = np.random.default_rng(seed)
    hits, estimates = {"percentile": 0, "basic": 0}, []
    for r in range(reps):
        statistic = statistic_of(rng)
        value = float(statistic(np.arange(n)[None])[0])
        estimates.append(value)
        for kind, ci in both(value, statistic(bootstrap_indices(n, resamples, seed=r))).items():
            hits[kind] += ci.low <= truth <= ci.high
    return {"truth": truth, "mean estimate": float(np.mean(estimates)), **{k: v / reps for k, v in hits.items()}}


def single(d: int, n: int, truth: float, reps: int, resamples: int) -> dict:
    ref = (np.zeros(d), np.eye(d))
    return coverage(lambda rng: resampled_frechet(gaussian_run(rng, n, d, np.sqrt(truth), 1.0), ref), truth, n,
                    reps, resamples, seed=0)


def difference(d: int, n: int, a: tuple, b: tuple, reps: int, resamples: int) -> dict:
    """Runs N(a0 e1, a1^2 I) and N(b0 e1, b1^2 I); the paired difference of their distances."""
    ref = (np.zeros(d), np.eye(d))
    truth = (a[0] ** 2 + d * (a[1] - 1) ** 2) - (b[0] ** 2 + d * (b[1] - 1) ** 2)

    def statistic_of(rng):
        fa = resampled_frechet(gaussian_run(rng, n, d, *a), ref)
        fb = resampled_frechet(gaussian_run(rng, n, d, *b), ref)
        return lambda idx: fa(idx) - fb(idx)

    return coverage(statistic_of, truth, n, reps, resamples, seed=1)


def _features(folder: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    from memcontrol.search.trial import QUALITY_FEATURES

    return load_file(str(folder / QUALITY_FEATURES))["features"].astype(np.float64)


def study_bias(run: Path, resamples: int, seed: int) -> None:
    from memcontrol.metrics.quality import gaussian_stats
    from memcontrol.search.claim import load_reference
    from memcontrol.search.trial import QUALITY_FEATURES

    reference = load_reference(run)
    stats = gaussian_stats(reference)
    print(f"\n{run}: each run's FD against its {len(reference)} held-out reference features")
    print(f"{'run':34s} {'FD':>7s} {'bias':>6s} {'percentile interval':>22s} {'basic interval':>22s}")
    for path in sorted(run.glob(f"*/*/{QUALITY_FEATURES}")):
        features = _features(path.parent)
        statistic = resampled_frechet(features, stats)
        value = float(statistic(np.arange(len(features))[None])[0])
        resampled = statistic(bootstrap_indices(len(features), resamples, seed))
        text = {k: f"[{ci.low:7.1f}, {ci.high:7.1f}]" for k, ci in both(value, resampled).items()}
        print(f"{str(path.parent.relative_to(run)):34s} {value:7.1f} {resampled.mean() - value:6.1f} "
              f"{text['percentile']:>22s} {text['basic']:>22s}")


def claim_comparisons(run: Path, resamples: int, seed: int) -> list[dict]:
    """The claim's paired quality comparisons (the chosen candidate minus each row), recomputed from the runs' kept
    features: per row, the interval ``claim.json`` recorded and the percentile and basic intervals, each as
    (value, low, high, verdict)."""
    import json

    from memcontrol.metrics.quality import gaussian_stats
    from memcontrol.search.claim import Comparison, load_reference
    from memcontrol.search.trial import QUALITY_FEATURES

    claim = json.loads((run / "claim.json").read_text())
    stats = gaussian_stats(load_reference(run))
    features = {r["label"]: _features(Path(r["folder"]))
                for r in claim["runs"] if (Path(r["folder"]) / QUALITY_FEATURES).is_file()}
    chosen = resampled_frechet(features[claim["chosen"]], stats)
    n = len(features[claim["chosen"]])
    idx, every = bootstrap_indices(n, resamples, seed), np.arange(n)[None]
    rows = []
    for c in claim["comparisons"]:
        other = resampled_frechet(features[c["label"]], stats)
        value = float(chosen(every)[0] - other(every)[0])
        recorded = c["quality_difference"]
        row = {"label": c["label"], "claim.json": (recorded["value"], recorded["low"], recorded["high"], c["quality"])}
        for kind, ci in both(value, chosen(idx) - other(idx)).items():
            row[kind] = (ci.value, ci.low, ci.high, Comparison.verdict(ci))
        rows.append(row)
    print(f"\n{claim['chosen']} minus each row, FD (negative: the chosen candidate is better)")
    print(f"{'row':44s} {'claim.json':>30s} {'percentile, here':>30s} {'basic':>30s}")
    for row in rows:
        cells = [f"{v:.1f} [{low:.1f}, {high:.1f}] {word}" for v, low, high, word in
                 (row["claim.json"], row["percentile"], row["basic"])]
        print(f"{row['label']:44s} " + " ".join(f"{cell:>30s}" for cell in cells))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, default=64, help="feature dimensions (the domain network's: 64)")
    parser.add_argument("--samples", type=int, default=96, help="generated samples a run (the headline's: 96)")
    parser.add_argument("--truths", type=float, nargs="+", default=[0.0, 10.0, 100.0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--resamples", type=int, default=300)
    parser.add_argument("--run", type=Path, help="a finished search's --out folder (no simulation then)")
    parser.add_argument("--seed", type=int, default=0, help="the study's sampling seed (its resample matrix)")
    args = parser.parse_args(argv)

    if args.run is not None:
        study_bias(args.run, 1000, args.seed)
        claim_comparisons(args.run, 1000, args.seed)
        return 0
    d, n = args.dims, args.samples
    print(f"{n} samples in {d} dimensions, {args.reps} replications, {args.resamples} resamples; coverage of the "
          f"true value (nominal 0.95)")
    for truth in args.truths:
        r = single(d, n, truth, args.reps, args.resamples)
        print(f"FD, true {truth:g}: mean estimate {r['mean estimate']:.2f}; percentile {r['percentile']:.2f}, "
              f"basic {r['basic']:.2f}", flush=True)
    for a, b in [((2.0, 1.0), (2.0, 0.7)), ((3.0, 1.2), (1.0, 1.0))]:
        r = difference(d, n, a, b, args.reps, args.resamples)
        print(f"FD difference, true {r['truth']:.2f}: mean estimate {r['mean estimate']:.2f}; percentile "
              f"{r['percentile']:.2f}, basic {r['basic']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
