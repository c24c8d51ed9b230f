"""What every trial of a worker shares, built once per worker process: the loaded pipeline, the cached training
latents and text embeddings, the prompts, and the reference features the metrics compare samples against."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .settings import SearchSettings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # settings.DTYPES


@dataclass
class SearchContext:
    settings: SearchSettings
    pipe: object
    cached: object                # memcontrol.training.CachedData of the training set
    train_set: object             # memcontrol.data.ImageCaptionDataset (or a subset of it)
    sample_prompts: list[str]     # the training captions each trial samples: memorization
    quality_prompts: list[str]    # the held-out captions each trial samples: quality (the reference protocol)
    probe: tuple                  # text embeddings of the probe captions and of the empty prompt
    references: object            # memcontrol.search.objectives.References
    base_noise_norm: float | None  # the probe signal of the untrained model
    adaptable: dict = field(default_factory=dict)  # (family, granularity) -> names of sites it can train

    def adaptable_sites(self, family: str, granularity: str) -> set[str]:
        """The sites where ``family`` has something to train (LoRA has nothing in a norms site, for example)."""
        key = (family, granularity)
        if key not in self.adaptable:
            from ..masks import adaptable_sites

            self.adaptable[key] = {s.name for s in adaptable_sites(self.pipe.unet, family, granularity)}
        return self.adaptable[key]


def pick_device(spec: str, worker_index: int) -> str:
    """``auto``: the worker's share of the visible GPUs (round robin), else the CPU."""
    if spec != "auto":
        return spec
    if torch.cuda.is_available():
        return f"cuda:{worker_index % torch.cuda.device_count()}"
    return "cpu"


def spread(items: list, n: int) -> list:
    """``n`` items evenly spaced over the list (all of them when there are fewer), in order."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def load_dataset(spec: dict, resolution: int, run_dir: Path, limit: int | None = None):
    """A dataset of the search; keys that come from file names are pseudonymised with the run folder's salt."""
    from torch.utils.data import Subset

    from ..data import ImageCaptionDataset, run_salt

    kwargs = {k: v for k, v in spec.items() if k != "source"}
    dataset = ImageCaptionDataset(spec["source"], resolution=resolution, salt=run_salt(run_dir), **kwargs)
    if limit is not None and limit < len(dataset):
        subset = Subset(dataset, range(limit))
        subset.captions, subset.keys = dataset.captions[:limit], dataset.keys[:limit]
        return subset
    return dataset


def preload() -> None:
    """Import what a worker needs (several seconds of CPU), e.g. while it waits for the first worker's cache."""
    import diffusers.pipelines.stable_diffusion  # noqa: F401

    from .. import data, metrics, training  # noqa: F401


def build_context(settings: SearchSettings, device: str, progress: bool = True) -> SearchContext:
    from ..models import load_pipeline
    from ..training import cache_training_data
    from .objectives import build_references, probe_embeddings, probe_signal

    pipe = load_pipeline(settings.model["path"], device=device, dtype=DTYPES[settings.model["dtype"]],
                         option="model.path")
    data = settings.data
    train_set = load_dataset(data["train"], data["resolution"], settings.out_dir, data["max_train"])
    heldout = load_dataset(data["heldout"], data["resolution"], settings.out_dir)
    cached = cache_training_data(pipe, train_set, Path(data["cache_dir"]), progress=progress)
    captions = list(train_set.captions)
    sample_prompts = spread(captions, settings.sampling["prompts"])
    quality_prompts = spread(list(heldout.captions), settings.sampling["quality_prompts"])
    references = build_references(settings, pipe, train_set, heldout, cached.digest)
    probe, base = None, None
    if settings.early_stop["enabled"]:
        probe = probe_embeddings(pipe, spread(captions, settings.early_stop["probe_prompts"]))
        base = probe_signal(settings, pipe.unet, pipe.scheduler, probe)
    log.info("worker ready on %s: %d training items, %d held-out, %d training and %d held-out prompts per trial",
             device, len(train_set), len(heldout), len(sample_prompts), len(quality_prompts))
    return SearchContext(settings, pipe, cached, train_set, sample_prompts, quality_prompts, probe, references, base)
