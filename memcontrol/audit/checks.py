"""The measures of an audit, one function per check, and the table that says what each needs.

``run_checks`` is the one loop: a check that is disabled in the config, or needs training or held-out images that
were not given, is recorded as skipped with the reason; the others run in order and leave their numbers, columns,
tables and figures in the ``AuditRun``'s state, for ``outputs`` to write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config.schema import AuditSection
from ..metrics import (build_embedder, cached_embed, copy_detection, distance_ratio, extraction, noise_norm,
                       quality_report, tiled_l2)
from ..metrics.intervals import bootstrap_indices, interval, resampled_mean
from ..metrics.memorization import calibrate_tau
from ..report import histogram_figure, pairs_figure, save_figure
from ..sampling import generate_samples
from .loading import ImageSet, choose_prompts, resized


@dataclass
class AuditState:
    """What the checks produce, gathered for the files and the report."""

    metrics: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    sample_columns: dict = field(default_factory=dict)
    prompt_columns: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)  # (section, caption, path)
    tables: dict = field(default_factory=dict)

    def skip(self, check: str, reason: str) -> None:
        self.skipped.append({"check": check, "reason": reason})


@dataclass
class AuditRun:
    """One audit: its settings and inputs, the generated samples, and what the checks found."""

    s: AuditSection
    out: Path
    pipe: object
    prompts: list[str]
    train: ImageSet | None
    heldout: ImageSet | None
    inputs: dict
    size: int                  # the analysis resolution: every image set is compared at this size
    cache: Path                # the feature cache, shared with the search (same keys)
    generated: torch.Tensor | None = None
    resamples: np.ndarray | None = None  # the bootstrap's resamples of the generated samples, shared by all figures
    features: dict = field(default_factory=dict)  # feature space -> embedder and features, reused by quality
    state: AuditState = field(default_factory=AuditState)

    @property
    def prompt_of_sample(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.prompts)), self.s.generation.n_per_prompt)


def generate(run: AuditRun) -> None:
    gen = run.s.generation
    images = generate_samples(run.pipe, run.prompts, n_per_prompt=gen.n_per_prompt, steps=gen.steps,
                              seed=run.s.seed, guidance_scale=gen.guidance_scale, batch_size=gen.batch_size,
                              sampler=gen.sampler)
    run.generated = resized(images, run.size)
    run.state.sample_columns["prompt_index"] = run.prompt_of_sample.tolist()
    seeds = [run.s.seed + j for _ in run.prompts for j in range(gen.n_per_prompt)]
    run.state.sample_columns["seed"] = seeds
    # One resample matrix for every figure of the generated samples: sampling seeds first, then samples within
    # each drawn seed, so that the intervals carry the seed-to-seed variation too.
    run.resamples = bootstrap_indices(len(seeds), seed=run.s.seed, groups=seeds)


def noise_norm_check(run: AuditRun) -> None:
    cfg = run.s.noise_norm
    kw = dict(steps=cfg.steps, seed=run.s.seed, num_inference_steps=cfg.num_inference_steps,
              guidance_scale=cfg.guidance_scale, samples_per_prompt=cfg.samples_per_prompt)
    values = noise_norm(run.pipe, run.prompts, **kw).numpy().astype(float)
    by_prompt = bootstrap_indices(len(values), seed=run.s.seed)
    result = {"steps": kw["steps"], "num_inference_steps": kw["num_inference_steps"],
              "samples_per_prompt": kw["samples_per_prompt"], "n": len(values),
              **interval(resampled_mean(values), by_prompt).fields("mean"), "p95": float(np.percentile(values, 95)), "max": float(values.max())}
    series = {"audited prompts": values}
    if run.heldout is not None:
        held_prompts = choose_prompts(run.heldout.captions, run.s.max_prompts, run.s.seed)
        held_prompts = [p for p in held_prompts if p not in set(run.prompts)]
        if held_prompts:
            held = noise_norm(run.pipe, held_prompts, **kw).numpy().astype(float)
            series["held-out captions"] = held
            result["heldout_baseline"] = {"n": len(held), "mean": float(held.mean()),
                                          "p95": float(np.percentile(held, 95))}
            # Training prompts scoring above unseen ones is what memorization of the prompts looks like.
            result["auc_audited_vs_heldout"] = _auc(values, held)
    run.state.metrics["noise_norm"] = result
    run.state.prompt_columns["noise_norm"] = values.tolist()
    fig = histogram_figure(series, xlabel=f"noise norm (mean of first {kw['steps']} step(s))",
                           title="Text-conditional noise norm per prompt")
    _figure(run, "noise_norm", "noise_norm.png", fig, "Noise norm per prompt (higher = more likely memorized)")


def copy_detection_check(run: AuditRun) -> None:
    for feature in run.s.features:
        spec = feature.model_dump()
        tau = spec.pop("tau")
        embedder = build_embedder(spec, pipe=run.pipe, device=run.pipe.unet.device)
        name = embedder.name
        train_feats = cached_embed(embedder, run.train.images, run.cache, desc=f"training features [{name}]")
        gen_feats = embedder.embed(run.generated, desc=f"generated features [{name}]")
        run.features[name] = {"embedder": embedder, "generated": gen_feats}
        held_sims, calibrated = None, None
        rate = run.s.heldout_false_positive_rate
        if run.heldout is not None:
            held_feats = cached_embed(embedder, run.heldout.images, run.cache, desc=f"held-out features [{name}]")
            run.features[name]["heldout"] = held_feats
            calibrated, held_sims = calibrate_tau(held_feats, train_feats, rate)
        source = "config"
        if tau == "heldout":
            source = f"held-out false-positive rate {rate:g}"
            tau = calibrated
            if tau is None:
                run.state.skip(f"copy_detection[{name}] copy decision",
                                "tau: heldout needs held-out images (--heldout); similarities are reported")
        result = copy_detection(gen_feats, train_feats, run.train.keys, tau=float("inf") if tau is None
                                else float(tau), indices=run.resamples)
        if tau is None:
            result.update(tau=None, copies=None, fraction=None, fraction_ci_low=None, fraction_ci_high=None,
                          attribution=[])
        result["tau_source"] = source
        _record_copies(run, name, result, held_sims)


def _record_copies(run: AuditRun, name: str, result: dict, held_sims) -> None:
    tau = result["tau"]
    if held_sims is not None:
        result["heldout_baseline"] = {
            "n": len(held_sims), "mean": float(held_sims.mean()), "p95": float(np.percentile(held_sims, 95)),
            "max": float(held_sims.max()),
            "fraction_above_tau": None if tau is None else float((held_sims > tau).mean())}
        if tau is not None and (held_sims > tau).mean() > 0.05:
            run.state.warnings.append(
                f"copy_detection[{name}]: {100 * (held_sims > tau).mean():.0f}% of held-out real images exceed "
                f"tau={tau:.3g}; the threshold is not calibrated for this feature space")
    samples = result["samples"]
    run.state.metrics.setdefault("copy_detection", {})[name] = _strip_samples(result)
    cols = run.state.sample_columns
    cols[f"similarity[{name}]"] = samples["similarity"]
    cols[f"nearest_key[{name}]"] = samples["nn_key"]
    if tau is not None:
        cols[f"copy[{name}]"] = samples["is_copy"]
    sims = np.asarray(samples["similarity"])
    run.state.prompt_columns[f"max_similarity[{name}]"] = _per_prompt(run, sims, np.max)
    if tau is not None:
        run.state.prompt_columns[f"copies[{name}]"] = _per_prompt(run, np.asarray(samples["is_copy"]), np.sum)
    series = {"generated vs training": sims}
    if held_sims is not None:
        series["held-out real vs training"] = held_sims
    fig = histogram_figure(series, xlabel=f"cosine similarity to nearest training image [{name}]", threshold=tau,
                           threshold_label="tau", title=f"Nearest-neighbour similarity [{name}]")
    _figure(run, "copy_detection", f"similarity_{_slug(name)}.png", fig,
            f"Nearest-training-image similarity [{name}]: generated samples against the held-out baseline")
    order = np.argsort(-sims)[: run.s.report.pairs]
    nn_index = samples["nn_index"]
    labels = [f"{sims[i]:.3f} · {samples['nn_key'][i]}" for i in order]
    fig = pairs_figure(run.generated[order], run.train.images[[nn_index[i] for i in order]], labels)
    _figure(run, "copy_detection", f"pairs_{_slug(name)}.png", fig,
            f"Most similar generated samples beside their nearest training image [{name}] "
            "(label: similarity · training key)")
    run.state.tables[f"attribution[{name}]"] = result["attribution"]


def distance_ratio_check(run: AuditRun) -> None:
    cfg = run.s.distance_ratio
    size = cfg.size
    train = resized(run.train.images, size)
    kw = dict(threshold=cfg.threshold, distinct_by=cfg.distinct_by)
    result = distance_ratio(resized(run.generated, size), train, run.train.keys, indices=run.resamples, **kw)
    series = {"generated": result["samples"]["ratio"]}
    if run.heldout is not None:
        held = distance_ratio(resized(run.heldout.images, size), train, run.train.keys, **kw)
        result["heldout_baseline"] = {"n": held["n"], "fraction": held["fraction"],
                                      "mean_ratio": held["mean_ratio"]}
        series["held-out real"] = held["samples"]["ratio"]
    run.state.metrics["distance_ratio"] = _strip_samples(result)
    cols = run.state.sample_columns
    cols["distance_ratio"] = result["samples"]["ratio"]
    cols["distance_ratio_nearest_key"] = result["samples"]["nn_key"]
    cols["distance_ratio_memorized"] = result["samples"]["is_memorized"]
    ratios = np.asarray([np.inf if r is None else r for r in result["samples"]["ratio"]])
    run.state.prompt_columns["min_distance_ratio"] = _per_prompt(run, ratios, np.min)
    run.state.tables["attribution[distance_ratio]"] = result["attribution"]
    fig = histogram_figure(series, xlabel="d(x, NN1) / d(x, NN2), pixel L2", threshold=kw["threshold"],
                           threshold_label="memorized below", title="Distance-ratio test")
    _figure(run, "distance_ratio", "distance_ratio.png", fig, "Distance ratio of generated samples and of "
            "held-out real images (below the line: memorized)")


def tiled_l2_check(run: AuditRun) -> None:
    cfg = run.s.tiled_l2
    size = cfg.size
    train = resized(run.train.images, size)
    kw = dict(delta=cfg.delta, grid=cfg.grid)
    result = tiled_l2(resized(run.generated, size), train, run.train.keys, indices=run.resamples, **kw)
    series = {"generated": result["samples"]["distance"]}
    if run.heldout is not None:
        held = tiled_l2(resized(run.heldout.images, size), train, run.train.keys, **kw)
        result["heldout_baseline"] = {"n": held["n"], "fraction": held["fraction"], "mean": held["mean"]}
        series["held-out real"] = held["samples"]["distance"]
    run.state.metrics["tiled_l2"] = _strip_samples(result)
    cols = run.state.sample_columns
    cols["tiled_l2"] = result["samples"]["distance"]
    cols["tiled_l2_nearest_key"] = result["samples"]["nn_key"]
    cols["tiled_l2_copy"] = result["samples"]["is_copy"]
    run.state.prompt_columns["min_tiled_l2"] = _per_prompt(run, np.asarray(result["samples"]["distance"]), np.min)
    run.state.tables["attribution[tiled_l2]"] = result["attribution"]
    fig = histogram_figure(series, xlabel=f"tiled L2 ({kw['grid']}x{kw['grid']} tiles, max tile RMS in [0, 1])",
                           threshold=kw["delta"], threshold_label="copy below", title="Tiled L2")
    _figure(run, "tiled_l2", "tiled_l2.png", fig, "Tiled L2 to the nearest training image (below the line: copy)")


def extraction_check(run: AuditRun) -> None:
    cfg, gen = run.s.extraction, run.s.generation
    prompts = run.prompts[: cfg.max_prompts]
    n = cfg.n_per_prompt
    images = generate_samples(run.pipe, prompts, n_per_prompt=n, steps=gen.steps, seed=run.s.seed + 10_000,
                              guidance_scale=gen.guidance_scale, batch_size=gen.batch_size, sampler=gen.sampler)
    size = cfg.size
    images = resized(images, size)
    result = extraction(images.view(len(prompts), n, *images.shape[1:]), resized(run.train.images, size),
                        run.train.keys, delta=cfg.delta, min_clique=cfg.min_clique,
                        grid=cfg.grid, prompts=prompts)
    result["n_per_prompt"] = n
    run.state.metrics["extraction"] = _strip_samples(result)
    run.state.tables["extraction"] = result["per_prompt"]
    by_prompt = {r["prompt"]: r for r in result["per_prompt"]}
    run.state.prompt_columns["extraction_clique"] = [by_prompt[p]["clique_size"] if p in by_prompt else None
                                                      for p in run.prompts]
    run.state.prompt_columns["extracted"] = [by_prompt[p]["extracted"] if p in by_prompt else None
                                              for p in run.prompts]


def quality_check(run: AuditRun) -> None:
    cfg = run.s.quality
    features = run.features
    # A feature space named (or by default the first one) of copy detection: its features are at hand.
    wanted = next(iter(features), None) if cfg.features is None else cfg.features
    if isinstance(wanted, str) and wanted in features:
        embedder = features[wanted]["embedder"]
        real, fake = features[wanted]["heldout"], features[wanted]["generated"]
    else:
        spec = {"type": wanted or "vae"} if wanted is None or isinstance(wanted, str) else wanted.model_dump()
        embedder = build_embedder(spec, pipe=run.pipe, device=run.pipe.unet.device)
        real = cached_embed(embedder, run.heldout.images, run.cache, desc=f"held-out features [{embedder.name}]")
        fake = embedder.embed(run.generated)
    if min(len(real), len(fake)) < 2:
        run.state.skip("quality", "fewer than 2 held-out or generated images")
        return
    result = quality_report(real, fake, embedder.name, cfg.kid_subsets, cfg.kid_subset_size, run.s.seed,
                            run.resamples)
    run.state.warnings.extend(result["warnings"])
    run.state.metrics["quality"] = result


def _auc(positive, negative) -> float | None:
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def _strip_samples(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("samples", "per_prompt")}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _per_prompt(run: AuditRun, values: np.ndarray, reduce) -> list:
    return [float(reduce(values[run.prompt_of_sample == p])) for p in range(len(run.prompts))]


def _figure(run: AuditRun, section_name: str, filename: str, fig, caption: str) -> None:
    path = save_figure(fig, run.out / "figures" / filename)
    run.state.figures.append((section_name, caption, path))


NO_TRAIN = "no training manifest (--manifest)"
NO_HELDOUT = "no held-out images (--heldout) to compare generated images with"

# (name, function, needs training images, needs held-out images), in the order they run; the quality check reuses
# the features of copy detection.
CHECKS = (
    ("noise_norm", noise_norm_check, False, False),
    ("copy_detection", copy_detection_check, True, False),
    ("distance_ratio", distance_ratio_check, True, False),
    ("tiled_l2", tiled_l2_check, True, False),
    ("extraction", extraction_check, True, False),
    ("quality", quality_check, False, True),
)


def run_checks(run: AuditRun) -> None:
    for name, check, needs_train, needs_heldout in CHECKS:
        switch = getattr(run.s, name, None)
        if switch is not None and not switch.enabled:
            run.state.skip(name, f"disabled in the config ({name}.enabled: true to run it)")
        elif needs_train and run.train is None:
            run.state.skip(name, NO_TRAIN)
        elif needs_heldout and run.heldout is None:
            run.state.skip(name, NO_HELDOUT)
        else:
            check(run)
