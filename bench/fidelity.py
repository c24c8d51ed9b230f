"""Multi-fidelity search: does the cheap screen rank candidates as the full evaluation does, and what does a search
that screens buy over random search at the same compute. On the bundled base model and hospital data.

(a) Ranking. ``--candidates`` candidates drawn from the bench space by a seeded random sampler
    (``--candidate-seed``; nothing in the screen was tuned on them), each screened (``--min-steps`` steps, probe
    noise norm and held-out denoising loss) and evaluated in full (``--steps`` steps, sampling, metrics, no early
    stopping), the two interleaved (screen first for even candidates, full first for odd ones). Printed: Spearman
    between each proxy and its full-fidelity objective with a bootstrap 95% interval over candidates, how many
    candidate pairs the full evaluation separates (their 95% intervals do not overlap), a largest set of candidates
    it tells apart pairwise with the Spearman over that set alone (the target's form: at least 8 candidates whose
    differences lie outside the noise), and the cost ratio (full seconds / screen seconds per candidate: median and
    range).
    With ``--run DIR --config FILE`` (a) takes its candidates and their full-fidelity values from a finished study
    instead (``memcontrol search --config FILE --out DIR``): every trained run of the search space in it (trials,
    controls, the full fine-tuning / LoRA-attention / bias+norm baselines; not the base model nor the mitigations,
    whose captions, data or sampling differ from a candidate's), screened at ``--min-steps``; the cost ratio is the
    study's total seconds of each run over its screen's (state how the study ran: ``--threads`` should match its
    workers'). Three screen measures are compared: the training images' denoising loss, negated (train fit: a
    candidate that fits its own training images more memorizes more) and the probe noise norm, each against the
    memorization objective (``--memorization-proxy`` says which one the promotion rule reads), and the held-out
    denoising loss against the quality objective (with ``--quality-proxy sample_fd`` also the FD of
    ``--quality-samples`` screen samples drawn with ``--screen-sample-steps`` steps). From a study the same test is
    also read the way a difference is judged everywhere else in memcontrol: candidates are sampled on the same
    prompts and noise seeds, so each pair's difference has a paired bootstrap 95% interval (one resample matrix over
    sample positions for both runs); a pair is *separated* when that interval excludes 0 (far less strict than
    disjoint intervals, about p < 0.006). Printed: the largest sets of candidates every pair of which is separated
    (exhaustive search), with the Spearman over each (the lowest decides), and the same at a Bonferroni level over
    all pairs. ``--screens FILE`` reuses the screens of an earlier ``--run`` output (its ``fidelity.json``) on the
    same study instead of screening again.
(b) Search. For each of ``--seeds``: a TPE search with multi-fidelity and a random search at full fidelity, at the
    same compute: the random search gets ``--random-trials`` candidates, the multi-fidelity one
    ``N = random_trials / (c + 1/eta)`` with ``c`` the screen / full cost measured in (a), so that screens plus
    promotions cost what the random trials cost (both searches stop memorizing trials early, as configured; the
    seconds each spent are printed to check). The hypervolume of each search's front is measured against a
    reference point fixed from (a)'s full-fidelity values before (b) starts (the worst value of each objective plus
    10% of its range; ``--ref`` sets it); printed per seed with the ratio, then the mean ratio and its range.

Results go to ``--out``/fidelity.json. The printed command line of the README's figures is at the end of the output.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import optuna
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memcontrol.config import load_config  # noqa: E402
from memcontrol.metrics.intervals import (bootstrap_indices, largest_separated_sets,  # noqa: E402
                                          percentile_interval, resampled_frechet, resampled_mean)
from memcontrol.metrics.quality import gaussian_stats  # noqa: E402
from memcontrol.search.claim import load_reference  # noqa: E402
from memcontrol.search.context import build_context  # noqa: E402
from memcontrol.search.hypervolume import hypervolume_2d  # noqa: E402
from memcontrol.search.run import run_search  # noqa: E402
from memcontrol.search.settings import load_settings, read_config  # noqa: E402
from memcontrol.search.trial import QUALITY_FEATURES, evaluate_candidate  # noqa: E402
from memcontrol.search.worker import bind_space  # noqa: E402

BASE_MODEL = ROOT / "data" / "base_model"
HOSPITAL = ROOT / "data" / "hospital"
# Each screen measure against the full-fidelity objective it stands for; --memorization-proxy says which of the two
# memorization measures the promotion rule reads (both are recorded on every screen).
# ``screen_quality`` is the held-out denoising loss whichever quality proxy the screens used (the name fidelity.json
# files had before the sampled proxy existed); ``screen_sample_fd`` is there when screens ran with --quality-proxy
# sample_fd, and analysed only then.
MEASURES = (("screen_train_fit", "memorization"), ("screen_noise_norm", "memorization"), ("screen_quality", "quality"),
            ("screen_sample_fd", "quality"))


def screen_measures(metrics: dict) -> dict:
    return {"screen_train_fit": -metrics.get("screen_train_loss", math.nan),
            "screen_noise_norm": metrics.get("screen_noise_norm", math.nan),
            "screen_quality": metrics.get("screen_heldout_loss", math.nan),
            "screen_sample_fd": metrics.get("screen_sample_fd", math.nan)}


def measured(rows: list[dict]) -> list[tuple[str, str]]:
    """The (screen measure, objective) pairs the screens of ``rows`` recorded."""
    return [(cheap, full) for cheap, full in MEASURES if any(math.isfinite(r.get(cheap, math.nan)) for r in rows)]


def fidelity_settings(args) -> dict:
    """The screen's settings from the command line (the promotion rule's ``eta`` is not one of them)."""
    return {"min_steps": args.min_steps, "schedule": args.schedule,
            "memorization_proxy": args.memorization_proxy, "quality_proxy": args.quality_proxy,
            "quality_samples": args.quality_samples, "sample_steps": args.screen_sample_steps}


def config(args, fidelity: bool, sampler: str, n_trials: int, seed: int, cache: Path) -> dict:
    return {
        "model": {"path": str(BASE_MODEL), "device": args.device},
        "data": {"train": {"source": str(HOSPITAL / "private" / "manifest.csv")},
                 "heldout": {"source": str(HOSPITAL / "heldout" / "manifest.csv")}, "resolution": 64,
                 "cache_dir": str(cache)},
        "train": {"steps": args.steps, "batch_size": 8, "lr": 1e-4, "caption_dropout": 0.1, "seed": 0},
        # The reference space (one switch per attention block, LoRA) with a learning-rate range wide enough that
        # the tiny model's candidates differ within a short fine-tune.
        "space": {"granularity": "block", "kinds": ["attention"], "family": "lora",
                  "family_params": {"lora": {"rank": 4, "alpha": 4}},
                  "train": {"lr": {"low": 1e-4, "high": 3e-3, "log": True}}},
        "objectives": {"memorization": {"metric": "mean_similarity", "features": {"type": "pixels", "size": 32}},
                       "quality": {"metric": "fd", "features": {"type": "vae"}}},
        "sampling": {"prompts": args.prompts, "quality_prompts": args.prompts, "per_prompt": 1,
                     "steps": args.sample_steps, "sampler": "dpm", "guidance_scale": 3.0},
        "early_stop": {"enabled": True, "every": max(1, args.steps // 6), "probe_prompts": 4,
                       "max_ratio": args.max_ratio},
        "search": {"n_trials": n_trials, "sampler": sampler, "seed": seed,
                   "fidelity": {"enabled": fidelity, "eta": args.eta, **fidelity_settings(args)}},
        "baselines": {"enabled": False},
    }


def draw_candidates(space, n: int, seed: int) -> list:
    """``n`` candidates of the space from a seeded random sampler (a candidate with no switch on is drawn again)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    while len(out) < n:
        candidate = space.sample(study.ask())
        if candidate.sites:
            out.append(candidate)
    return out


def rank_agreement(cheap: list[float], full: list[float], seed: int) -> dict:
    """Spearman's rho with the percentile interval of its bootstrap over candidates."""
    cheap, full = np.asarray(cheap), np.asarray(full)
    value = float(spearmanr(cheap, full).statistic)
    with np.errstate(invalid="ignore", divide="ignore"):
        resampled = [spearmanr(cheap[i], full[i]).statistic if len(set(i)) > 2 else math.nan
                     for i in bootstrap_indices(len(cheap), 1000, seed)]
    ci = percentile_interval(value, np.asarray(resampled, dtype=float))
    return {"rho": ci.value, "ci_low": ci.low, "ci_high": ci.high, "n": len(cheap)}


def separated_pairs(rows: list[dict], name: str, cheap: str) -> tuple[int, int, int]:
    """Candidate pairs whose full-fidelity 95% intervals of ``name`` do not overlap, all pairs, and how many of the
    separated pairs ``cheap`` puts in the same order."""
    n, apart, agree = len(rows), 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            lo, hi = sorted((rows[i], rows[j]), key=lambda r: r[name])
            if lo[f"{name}_ci_high"] < hi[f"{name}_ci_low"]:
                apart += 1
                agree += lo[cheap] < hi[cheap]
    return apart, n * (n - 1) // 2, agree


def apart_set(rows: list[dict], name: str) -> list[dict]:
    """A largest set of candidates whose full-fidelity 95% intervals of ``name`` are pairwise disjoint: the issue's
    "candidates whose differences lie outside the noise". Taking the lowest upper bound first, then the next interval
    that starts above it, finds a largest such set (interval scheduling); the screen's values play no part in it."""
    chosen: list[dict] = []
    for row in sorted(rows, key=lambda r: (r[f"{name}_ci_high"], r["candidate"])):
        if not chosen or chosen[-1][f"{name}_ci_high"] < row[f"{name}_ci_low"]:
            chosen.append(row)
    return chosen


def run_statistics(run: Path, rows: list[dict]) -> tuple[dict, dict]:
    """Per objective, each row's resampleable statistic (``idx -> values``) from the files its run kept: the mean NN
    similarity of its memorization samples (``neighbours.json``) and the FD of its quality features to the study's
    held-out reference; the statistic on all samples equals the study's own figure. Also the number of samples each
    objective's runs drew (the same for every run, or they could not be paired)."""
    from safetensors.numpy import load_file

    reference = load_reference(run)
    if reference is None:
        raise SystemExit(f"{run}: no quality_reference.safetensors: a study made before the reference was kept")
    stats = gaussian_stats(reference)
    out, sizes = {"memorization": [], "quality": []}, {"memorization": set(), "quality": set()}
    for r in rows:
        folder = run / r["folder"]
        sims = [n["similarity"] for n in json.loads((folder / "neighbours.json").read_text())]
        out["memorization"].append(resampled_mean(sims))
        features = load_file(str(folder / QUALITY_FEATURES))["features"].astype(np.float64)
        out["quality"].append(resampled_frechet(features, stats))
        sizes["memorization"].add(len(sims))
        sizes["quality"].add(len(features))
    for name, found in sizes.items():
        if len(found) != 1:
            raise SystemExit(f"{run}: the runs drew different numbers of {name} samples ({sorted(found)}): "
                             "they cannot be paired")
    return out, {name: found.pop() for name, found in sizes.items()}


def paired_separation(statistics_: list, n_samples: int, seed: int, resamples: int, level: float) -> np.ndarray:
    """n x n: True where the paired bootstrap interval of statistic_i - statistic_j excludes 0. Both runs were
    sampled on the same prompts and seeds, so both see the same resampled positions (as ``intervals.paired``; each
    run's resampled values are computed once here and differenced for every pair)."""
    indices = bootstrap_indices(n_samples, resamples, seed)
    everything = np.arange(n_samples)[None]
    points = [float(np.asarray(f(everything))[0]) for f in statistics_]
    resampled = [np.asarray(f(indices), dtype=np.float64) for f in statistics_]
    n = len(statistics_)
    separated = np.zeros((n, n), dtype=bool)
    for i, j in itertools.combinations(range(n), 2):
        diff = percentile_interval(points[i] - points[j], resampled[i] - resampled[j], level)
        separated[i, j] = separated[j, i] = diff.excludes(0.0)
    return separated


def paired_analysis(run: Path, rows: list[dict], seed: int, resamples: int) -> dict:
    """For each screen measure and its objective: the pairs the full evaluation separates by paired intervals, how
    many the screen orders alike, and the Spearman over each largest set of candidates all pairwise separated, at
    95% and at the Bonferroni level over all pairs."""
    stats, n_samples = run_statistics(run, rows)
    result = {}
    pairs = len(rows) * (len(rows) - 1) // 2
    for cheap, full in measured(rows):
        entry = {}
        for label, level in (("paired95", 0.95), ("bonferroni", 1 - 0.05 / max(pairs, 1))):
            separated = paired_separation(stats[full], n_samples[full], seed, resamples, level)
            sets = largest_separated_sets(separated)
            agree = sum(bool(separated[i, j])
                        and (rows[i][cheap] - rows[j][cheap]) * (rows[i][full] - rows[j][full]) > 0
                        for i, j in itertools.combinations(range(len(rows)), 2))
            rhos = [rank_agreement([rows[i][cheap] for i in c], [rows[i][full] for i in c], seed) if len(c) >= 3
                    else None for c in sets]
            entry[label] = {"level": level, "separated_pairs": int(separated[np.triu_indices(len(rows), 1)].sum()),
                            "pairs": pairs, "separated_pairs_same_order": int(agree),
                            "separated": [[rows[i]["label"], rows[j]["label"]]
                                          for i, j in zip(*np.nonzero(np.triu(separated, 1)))],
                            "largest_sets": [[rows[i]["candidate"] for i in c] for c in sets],
                            "spearman": rhos}
        result[f"{cheap}~{full}"] = entry
    return result


def ranking(args, out: Path) -> dict:
    settings = load_settings(config(args, True, "tpe", args.candidates, 0, out / "cache"), out / "ranking")
    ctx = build_context(settings, settings.model["device"], progress=False)
    candidates = draw_candidates(bind_space(settings, ctx.pipe.unet), args.candidates, args.candidate_seed)
    rows = []
    for i, candidate in enumerate(candidates):
        folder = out / "ranking" / str(i)
        runs = {}
        for kind in (("screen", "full") if i % 2 == 0 else ("full", "screen")):
            runs[kind] = evaluate_candidate(ctx, candidate, folder / kind, early_stop=False, keep_adapter=False,
                                            screen=kind == "screen")
        screen, full = runs["screen"], runs["full"]
        row = {"candidate": i, "lr": candidate.train["lr"], "sites": len(candidate.sites),
               "screen_status": screen.status, "full_status": full.status,
               "screen_seconds": screen.compute["total_seconds"], "full_seconds": full.compute["total_seconds"],
               **screen_measures(screen.metrics),
               **{k: v for k, v in full.metrics.items() if k.startswith(("memorization", "quality"))}}
        rows.append(row)
        print(f"candidate {i}: lr {row['lr']:.2e}, {row['sites']} sites | screen {screen.status} "
              f"{row['screen_seconds']:.1f} s: train fit {row['screen_train_fit']:.5g}, noise norm "
              f"{row['screen_noise_norm']:.4g}, held-out loss {row['screen_quality']:.5g}"
              + (f", sample FD {row['screen_sample_fd']:.4g}" if math.isfinite(row["screen_sample_fd"]) else "")
              + " | full "
              f"{full.status} {row['full_seconds']:.1f} s: {row.get('memorization')}, {row.get('quality')}",
              flush=True)
    return summarize(rows, args.candidate_seed)


def study_candidates(run: Path) -> list[tuple[dict, object]]:
    """(full-fidelity row, Candidate) for each trained run of the search space in a finished study's tables."""
    from bench.quickstart import load_rows
    from memcontrol.search.space import Candidate

    out = []
    for row in load_rows(run):
        if row["state"] != "complete" or row["kind"] not in ("trial", "baseline", "control"):
            continue
        candidate = Candidate(**json.loads((run / row["folder"] / "candidate.json").read_text()))
        if (not candidate.sites or candidate.inference or candidate.deduplicated
                or candidate.train.get("caption_mitigation")):
            continue
        values = {k: float(row[k]) for k in ("memorization", "memorization_ci_low", "memorization_ci_high",
                                             "quality", "quality_ci_low", "quality_ci_high", "total_seconds")}
        out.append(({"label": row["label"], "folder": row["folder"], **values}, candidate))
    return out


_CTX = None  # one search context per screening process


def _init_screen_process(cfg: dict, out: str, device: str, threads: int | None) -> None:
    global _CTX
    import torch

    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    _CTX = build_context(load_settings(cfg, Path(out)), device, progress=False)


def _screen(job: tuple) -> dict:
    candidate, folder = job
    screen = evaluate_candidate(_CTX, candidate, Path(folder), early_stop=False, keep_adapter=False, screen=True)
    return {"status": screen.status, "seconds": screen.compute["total_seconds"], "metrics": screen.metrics}


def ranking_from_run(args, out: Path) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cfg = load_config(args.config)
    search = cfg.setdefault("search", {})
    search.update(sampler="tpe", fidelity={**search.get("fidelity", {}), "enabled": True, **fidelity_settings(args)})
    found = study_candidates(Path(args.run))
    if args.screens:
        screens = earlier_screens(Path(args.screens), [full["folder"] for full, _ in found])
    else:
        jobs = [(candidate, str(out / "ranking" / str(i))) for i, (_, candidate) in enumerate(found)]
        # Screens run as the study's trials did: ``--workers`` processes side by side, ``--threads`` threads each.
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_screen_process,
                                 initargs=(cfg, str(out / "ranking"), args.device, args.threads)) as pool:
            screens = list(pool.map(_screen, jobs))
    rows = []
    for i, ((full, candidate), screen) in enumerate(zip(found, screens)):
        m = screen["metrics"]
        row = {"candidate": i, **full, "lr": candidate.train.get("lr"), "sites": len(candidate.sites),
               "family": candidate.family, "screen_status": screen["status"], "full_status": "ok",
               "screen_seconds": screen["seconds"], "full_seconds": full["total_seconds"],
               **screen_measures(m)}
        rows.append(row)
        print(f"{row['label']}: {row['family']} {row['sites']} sites lr {row['lr']:.2e} | screen "
              f"{row['screen_seconds']:.1f} s: train fit {row['screen_train_fit']:.5g}, noise norm "
              f"{row['screen_noise_norm']:.4g}, held-out loss {row['screen_quality']:.5g}"
              + (f", sample FD {row['screen_sample_fd']:.4g}" if math.isfinite(row["screen_sample_fd"]) else "")
              + " | full "
              f"{row['full_seconds']:.0f} s: {row['memorization']:.3f}, {row['quality']:.1f}", flush=True)
    result = summarize(rows, args.candidate_seed)
    job = read_config(cfg)
    both = [r for r in rows if r["screen_status"] == "screened"]
    result["paired"] = paired_analysis(Path(args.run), both, job.sampling.seed, job.objectives.bootstrap_resamples)
    return result


def earlier_screens(path: Path, folders: list[str]) -> list[dict]:
    """The screens of an earlier ``--run`` output (``fidelity.json``) for the study runs in ``folders``, in order;
    refused unless it screened exactly those runs."""
    rows = json.loads(path.read_text()).get("ranking", {}).get("rows", [])
    by_folder = {r.get("folder"): r for r in rows}
    if sorted(by_folder) != sorted(folders):
        raise SystemExit(f"--screens {path}: it screened {sorted(map(str, by_folder))}, the study has "
                         f"{sorted(folders)}: not the same runs")
    return [{"status": by_folder[f]["screen_status"], "seconds": by_folder[f]["screen_seconds"],
             "metrics": {"screen_train_loss": -by_folder[f]["screen_train_fit"],
                         "screen_noise_norm": by_folder[f]["screen_noise_norm"],
                         "screen_heldout_loss": by_folder[f]["screen_quality"],
                         "screen_sample_fd": by_folder[f].get("screen_sample_fd", math.nan)}} for f in folders]


def summarize(rows: list[dict], seed: int) -> dict:
    both = [r for r in rows if r["screen_status"] == "screened" and r["full_status"] == "ok"]
    ratios = [r["full_seconds"] / r["screen_seconds"] for r in rows]
    result = {"rows": rows, "compared": len(both),
              "cost_ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
              "screen_over_full": statistics.median(r["screen_seconds"] for r in rows)
              / statistics.median(r["full_seconds"] for r in rows)}
    for cheap, full in measured(both):
        agreement = rank_agreement([r[cheap] for r in both], [r[full] for r in both], seed)
        apart, pairs, agree = separated_pairs(both, full, cheap)
        distinct = apart_set(both, full)
        result[f"{cheap}~{full}"] = {**agreement, "separated_pairs": apart, "pairs": pairs,
                                     "separated_pairs_same_order": agree,
                                     "apart_set": [r["candidate"] for r in distinct],
                                     "apart_set_spearman": rank_agreement([r[cheap] for r in distinct],
                                                                          [r[full] for r in distinct], seed)
                                     if len(distinct) >= 3 else None}
    return result


def reference_point(rows: list[dict]) -> tuple[float, float]:
    done = [r for r in rows if r["full_status"] == "ok"]
    point = []
    for name in ("memorization", "quality"):
        values = [r[name] for r in done]
        point.append(max(values) + 0.1 * (max(values) - min(values)))
    return tuple(point)


def one_search(args, out: Path, fidelity: bool, n_trials: int, seed: int, ref) -> dict:
    settings = load_settings(config(args, fidelity, "tpe" if fidelity else "random", n_trials, seed, out / "cache"),
                             out / f"{'fidelity' if fidelity else 'random'}_seed{seed}")
    start = time.perf_counter()
    outputs = run_search(settings, progress=False)
    wall = time.perf_counter() - start
    rows = outputs.results.trials
    front = [(r.memorization, r.quality) for r in outputs.results.front]
    return {"method": "fidelity+tpe" if fidelity else "random", "seed": seed, "n_trials": n_trials,
            "counts": outputs.results.counts(), "trial_seconds": sum(r.get("total_seconds", 0.0) for r in rows),
            "wall_seconds": wall, "front": front, "hypervolume": hypervolume_2d(front, ref)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=8, help="(a) candidates screened and evaluated in full")
    parser.add_argument("--candidate-seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60, help="full training budget")
    parser.add_argument("--min-steps", type=int, default=12, help="screening budget")
    parser.add_argument("--schedule", choices=("truncated", "compressed"), default="truncated",
                        help="a screen's learning-rate schedule (search.fidelity.schedule)")
    parser.add_argument("--memorization-proxy", choices=("train_fit", "noise_norm"), default="train_fit",
                        help="the screen's memorization proxy (search.fidelity.memorization_proxy)")
    parser.add_argument("--quality-proxy", choices=("heldout_loss", "sample_fd"), default="heldout_loss",
                        help="the screen's quality proxy (search.fidelity.quality_proxy); the held-out loss is "
                             "recorded with either")
    parser.add_argument("--quality-samples", type=int, default=64, help="sample_fd: samples a screen draws")
    parser.add_argument("--screen-sample-steps", type=int, default=10, help="sample_fd: their sampler steps")
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16, help="memorization and quality samples of a full trial")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--max-ratio", type=float, default=1.5, help="early stop: probe noise norm / base model's")
    parser.add_argument("--random-trials", type=int, default=6, help="(b) random search trials per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ref", type=float, nargs=2, default=None, help="(b) hypervolume reference point")
    parser.add_argument("--skip-search", action="store_true", help="run (a) only")
    parser.add_argument("--run", default=None, help="(a) from this finished study's runs (implies --skip-search)")
    parser.add_argument("--config", default=None, help="the config the --run study was made with")
    parser.add_argument("--screens", default=None,
                        help="--run: reuse the screens of an earlier --run output on this study (its fidelity.json)")
    parser.add_argument("--workers", type=int, default=2, help="--run: screening processes side by side")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's; 1 on a loaded machine, where two threads each wait "
                             "for the other: 14x slower here at load 9 on 2 cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_fidelity"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not (BASE_MODEL / "model_index.json").is_file():
        sys.exit(f"the bundled base model is missing: {BASE_MODEL / 'model_index.json'}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty: give a new --out")
    out.mkdir(parents=True, exist_ok=True)
    import os

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "load_average_start": os.getloadavg()}
    report = {"args": vars(args), "machine": machine}

    if args.run and not args.config:
        sys.exit("--run needs --config, the config the study was made with")
    if args.screens and not args.run:
        sys.exit("--screens needs --run: it reuses screens of that study")
    if args.screens:
        if not Path(args.screens).is_file():
            sys.exit(f"--screens {args.screens}: no such file")
        # The reused screens' own settings, so that what is printed and recorded describes them.
        earlier = json.loads(Path(args.screens).read_text()).get("args", {})
        for key in ("min_steps", "schedule", "memorization_proxy", "quality_proxy", "quality_samples",
                    "screen_sample_steps", "threads", "workers"):
            if key in earlier:
                setattr(args, key, earlier[key])
    rank = ranking_from_run(args, out) if args.run else ranking(args, out)
    report["ranking"] = rank
    full_steps = f"the study's {args.run}" if args.run else f"{args.steps} steps"
    print(f"\n(a) ranking over {rank['compared']} candidates both evaluated (screen {args.min_steps} steps vs full "
          f"evaluation: {full_steps}; the promotion rule's memorization proxy: screen_{args.memorization_proxy}):")
    for key, r in rank.items():
        if "~" in key:
            print(f"  {key}: Spearman {r['rho']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]; the full evaluation "
                  f"separates {r['separated_pairs']} of {r['pairs']} pairs, the screen orders "
                  f"{r['separated_pairs_same_order']} of them the same way")
            a = r["apart_set_spearman"]
            print(f"    {len(r['apart_set'])} candidates pairwise apart (intervals disjoint): "
                  + (f"Spearman over them {a['rho']:.2f} [{a['ci_low']:.2f}, {a['ci_high']:.2f}]" if a else "too few"))
    for key, entry in rank.get("paired", {}).items():
        for label, r in entry.items():
            rhos = sorted((x for x in r["spearman"] if x is not None), key=lambda x: x["rho"])
            size = len(r["largest_sets"][0]) if r["largest_sets"] else 0
            print(f"  {key}, paired intervals at {r['level'] * 100:.4g}% ({label}): {r['separated_pairs']} of "
                  f"{r['pairs']} pairs separated, the screen orders {r['separated_pairs_same_order']} alike; "
                  f"{len(r['largest_sets'])} largest set(s) of {size} candidates all pairwise separated"
                  + (f": Spearman over them {rhos[0]['rho']:.2f} to {rhos[-1]['rho']:.2f} (the lowest: interval "
                     f"[{rhos[0]['ci_low']:.2f}, {rhos[0]['ci_high']:.2f}])" if rhos else ""))
    c = rank["cost_ratio"]
    print(f"  cost: a full trial costs x{c['median']:.1f} a screen (median; range {c['min']:.1f}-{c['max']:.1f})")
    (out / "fidelity.json").write_text(json.dumps(report, indent=2, default=float) + "\n")

    if not (args.skip_search or args.run):
        ref = tuple(args.ref) if args.ref else reference_point(rank["rows"])
        n_fidelity = max(1, math.floor(args.random_trials / (rank["screen_over_full"] + 1 / args.eta)))
        print(f"\n(b) reference point (memorization, quality) = ({ref[0]:.4g}, {ref[1]:.4g}); per seed: random "
              f"{args.random_trials} full trials vs multi-fidelity {n_fidelity} candidates", flush=True)
        runs = []
        for seed in args.seeds:  # interleaved: both methods of a seed run back to back
            for fidelity in (True, False):
                run = one_search(args, out, fidelity, n_fidelity if fidelity else args.random_trials, seed, ref)
                runs.append(run)
                print(f"  seed {seed} {run['method']:<12}: hypervolume {run['hypervolume']:.4g}, front "
                      f"{len(run['front'])}, trials {run['counts']}, trial seconds {run['trial_seconds']:.0f}, "
                      f"wall {run['wall_seconds']:.0f} s", flush=True)
        ratios = []
        for seed in args.seeds:
            fid, rnd = (next(r for r in runs if r["seed"] == seed and r["method"] == m)
                        for m in ("fidelity+tpe", "random"))
            ratios.append(fid["hypervolume"] / rnd["hypervolume"] if rnd["hypervolume"] > 0 else math.inf)
        finite = [r for r in ratios if math.isfinite(r)]
        report["search"] = {"reference_point": ref, "n_fidelity": n_fidelity, "runs": runs, "ratios": ratios}
        print(f"  hypervolume ratio (multi-fidelity / random) per seed: {', '.join(f'{r:.2f}' for r in ratios)}"
              + (f"; mean {statistics.mean(finite):.2f} (range {min(finite):.2f}-{max(finite):.2f})" if finite else ""))
    machine["load_average_end"] = os.getloadavg()
    (out / "fidelity.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"load average start {machine['load_average_start']}, end {machine['load_average_end']}; "
          f"written: {out / 'fidelity.json'}")
    print("command: python bench/fidelity.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
