"""The two objectives of a trial, and the in-loop signal, computed with ``memcontrol.metrics`` on its samples.

Memorization: nearest-neighbour copy detection of the samples against the training set, in the configured feature
space (the mean or 95th percentile of each sample's similarity to its nearest training image, or the fraction of
copies above tau), or the pixel-space distance-ratio test. Quality: the Fréchet distance (or KID) between the
samples and the held-out images. The references (training and held-out features) are computed once per worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .settings import SearchSettings


@dataclass
class References:
    memorization_embedder: object
    quality_embedder: object
    train_features: torch.Tensor
    train_keys: list[str]
    heldout_features: torch.Tensor
    heldout_stats: tuple                # gaussian_stats of the held-out features: fitted once, not every trial
    train_pixels: torch.Tensor | None   # only for the distance-ratio metric, which works in pixel space


def dataset_pixels(dataset, batch_size: int = 64):
    """The dataset's images in batches (N x C x H x W in [-1, 1]), so that large sets never sit in memory."""
    for start in range(0, len(dataset), batch_size):
        yield torch.stack([dataset[i]["pixel_values"] for i in range(start, min(start + batch_size, len(dataset)))])


def quality_name(settings: SearchSettings) -> str:
    from ..metrics import distance_name

    q = settings.objectives["quality"]
    return distance_name(q["features"], q["metric"])


def build_references(settings: SearchSettings, pipe, train_set, heldout) -> References:
    from ..metrics import build_embedder, cached_embed
    from ..metrics.quality import gaussian_stats

    mem, qual = settings.objectives["memorization"], settings.objectives["quality"]
    device = pipe.unet.device
    mem_embedder = build_embedder(mem["features"], pipe=pipe, device=device)
    qual_embedder = (mem_embedder if qual["features"] == mem["features"]
                     else build_embedder(qual["features"], pipe=pipe, device=device))
    pixels = (torch.cat(list(dataset_pixels(train_set)))
              if settings.memorization_metric == "distance_ratio_fraction" else None)
    cache = Path(settings.data["cache_dir"])
    heldout_features = cached_embed(qual_embedder, heldout, cache)
    save_reference(heldout_features, qual_embedder.name, Path(settings.out_dir))
    stats = gaussian_stats(heldout_features) if len(heldout_features) >= 2 else None
    return References(mem_embedder, qual_embedder, cached_embed(mem_embedder, train_set, cache),
                      list(train_set.keys), heldout_features, stats, pixels)


QUALITY_REFERENCE = "quality_reference.safetensors"


def save_reference(features: torch.Tensor, embedder: str, out_dir: Path) -> None:
    """The held-out images' quality features as ``OUT/quality_reference.safetensors``, what the runs' kept quality
    features are compared with after the search (``memcontrol.search.claim``). Every worker writes the same
    content; each writes a file of its own and renames it, so a reader never sees half a file."""
    import os

    from safetensors.torch import save_file

    tmp = out_dir / f".{QUALITY_REFERENCE}.{os.getpid()}"
    save_file({"features": features.float().contiguous()}, str(tmp), metadata={"embedder": embedder})
    os.replace(tmp, out_dir / QUALITY_REFERENCE)


def sample(settings: SearchSettings, pipe, prompts: list[str], inference: dict | None = None,
           stats: dict | None = None) -> torch.Tensor:
    """The samples of ``prompts``; with ``inference`` ``{"wen": {...}}``, from text embeddings adjusted by Wen et
    al.'s mitigation (``memcontrol.mitigations.wen``), whose mean noise norm before and after goes to ``stats``."""
    from ..sampling import generate_samples

    s = settings.sampling
    embeds = None
    if inference and "wen" in inference:
        from ..mitigations.wen import WenConfig, adjust_prompt_embeds

        embeds, report = adjust_prompt_embeds(pipe, prompts, WenConfig(**inference["wen"]), s["steps"],
                                              s["sampler"], s["seed"])
        if stats is not None:
            stats.update({"wen_norm_start": float(report["start"].mean()),
                          "wen_norm_end": float(report["end"].mean()),
                          "wen_iterations": float(report["iterations"].float().mean())})
    return generate_samples(pipe, prompts, n_per_prompt=s["per_prompt"], steps=s["steps"], seed=s["seed"],
                            guidance_scale=s["guidance_scale"], sampler=s["sampler"], prompt_embeds=embeds)


def with_interval(result: dict, key: str, name: str | None = None) -> dict:
    """``result[key]`` with its 95% interval (``key_ci_low``, ``key_ci_high``), under ``name``."""
    return {(name or key) + suffix: result[key + suffix] for suffix in ("", "_ci_low", "_ci_high")}


def measure(settings: SearchSettings, refs: References, samples: torch.Tensor,
            quality_samples: torch.Tensor) -> tuple[dict, list, torch.Tensor]:
    """Scalar metrics (``memorization`` and ``quality`` are the objectives), each with its 95% interval
    (``<name>_ci_low``, ``<name>_ci_high``); per memorization sample, its nearest training item (index, key,
    similarity) for the copy pairs of the report; and the quality samples' features, kept so that figures comparing
    runs (``memcontrol.search.claim``) can be resampled pairwise later.

    Memorization is measured on ``samples`` (from training captions), quality on ``quality_samples`` (from held-out
    captions). Rates get Wilson intervals; the other figures a bootstrap over the generated samples, the held-out
    side fixed. The resamples are drawn from the sampling seed, so every run of a study resamples the same positions
    of the same prompts: intervals of differences between runs can be formed pairwise from them. A metric that needs
    two samples a side fails the trial (with its reason) when there are fewer."""
    from ..metrics import copy_detection, distance_ratio, quality_report
    from ..metrics.intervals import bootstrap_indices

    mem, qual = settings.objectives["memorization"], settings.objectives["quality"]
    resamples, seed = int(settings.objectives["bootstrap_resamples"]), int(settings.sampling["seed"])
    gen = refs.memorization_embedder.embed(samples).float().cpu()
    copies = copy_detection(gen, refs.train_features, refs.train_keys, tau=float(mem["tau"]),
                            indices=bootstrap_indices(len(gen), resamples, seed))
    metrics = {**with_interval(copies, "mean", "mean_similarity"), **with_interval(copies, "p95", "p95_similarity"),
               "max_similarity": copies["max"], **with_interval(copies, "fraction", "copy_fraction"),
               "copied_items": len(copies["attribution"])}
    if settings.memorization_metric == "distance_ratio_fraction":
        ratio = distance_ratio(samples, refs.train_pixels, refs.train_keys)
        metrics.update(with_interval(ratio, "fraction", "distance_ratio_fraction"))
    gen_q = refs.quality_embedder.embed(quality_samples).float().cpu()
    # FD and KID are both recorded whichever is the objective (FD is biased at small sample counts, KID is not).
    quality = quality_report(refs.heldout_features, gen_q, refs.quality_embedder.name, int(qual["kid_subsets"]),
                             int(qual["kid_subset_size"]), seed, bootstrap_indices(len(gen_q), resamples, seed),
                             refs.heldout_stats)
    metrics.update({**with_interval(quality, "fd"), **with_interval(quality, "kid")})
    metrics.update({**with_interval(metrics, settings.memorization_metric, "memorization"),
                    **with_interval(metrics, qual["metric"], "quality")})
    per_sample = copies["samples"]
    neighbours = [{"index": i, "key": k, "similarity": sim}
                  for i, k, sim in zip(per_sample["nn_index"], per_sample["nn_key"], per_sample["similarity"])]
    return metrics, neighbours, gen_q


def probe_embeddings(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings of the probe prompts and of the empty prompt, computed once per worker."""
    from ..training import encode_prompts

    return encode_prompts(pipe, prompts), encode_prompts(pipe, [""])


def probe_signal(settings: SearchSettings, unet, scheduler, probe: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Mean text-conditional noise norm of the probe prompts (Wen et al., ICLR 2024), on a bare UNet: the form a
    training callback has at hand, with the embeddings computed once."""
    from ..metrics import noise_norm

    cond, empty = probe
    return float(noise_norm(unet, cond, steps=int(settings.early_stop["noise_steps"]), seed=0, uncond_embeds=empty,
                            scheduler=scheduler, progress=False).mean())
