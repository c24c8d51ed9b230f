"""What every trial of a worker shares, built once per worker process: the loaded pipeline, the cached training
latents and text embeddings, the prompts, and the reference features the metrics compare samples against."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .settings import SearchSettings

log = logging.getLogger(__name__)

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
    progress: object = None       # memcontrol.search.progress.Progress of the worker, or None
    heldout_set: object = None    # the held-out ImageCaptionDataset
    screen_data: object = None    # {"heldout", "train"}: fidelity.ScreenData, made by the first screened candidate
    deduplicated: object = None   # the cached training set less its near-duplicates, made when first asked for

    def training_data(self, deduplicated: bool = False):
        """The cached training set, or (the de-duplication baseline) its records less near-duplicates and held-out
        leaks, found with ``data_audit``'s features and threshold."""
        if not deduplicated:
            return self.cached
        if self.deduplicated is None:
            from ..data.duplicates import audit_datasets, deduplicate
            from ..training.cache import subset_cached

            audit, data = self.settings.data_audit, self.settings.data
            found = audit_datasets(self.train_set, self.heldout_set, audit["features"], audit["threshold"],
                                   audit["shared_patients"], data["cache_dir"], progress=False)
            keep = deduplicate(found)
            log.info("de-duplicated training set: %d of %d records kept", len(keep), len(self.cached))
            self.deduplicated = subset_cached(self.cached, keep)
        return self.deduplicated

    def adaptable_sites(self, family: str, granularity: str) -> set[str]:
        """The sites where ``family`` has something to train (LoRA has nothing in a norms site, for example)."""
        key = (family, granularity)
        if key not in self.adaptable:
            from ..masks import adaptable_sites

            self.adaptable[key] = {s.name for s in adaptable_sites(self.pipe.unet, family, granularity)}
        return self.adaptable[key]


def spread(items: list, n: int) -> list:
    """``n`` items evenly spaced over the list (all of them when there are fewer), in order."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def preload() -> None:
    """Import what a worker needs (several seconds of CPU), e.g. while it waits for the first worker's cache."""
    import diffusers.pipelines.stable_diffusion  # noqa: F401

    from .. import data, metrics, training  # noqa: F401


def search_data(settings: SearchSettings, salt: str):
    """The training and held-out sets of a search: the training set de-duplicated when
    ``data_audit.deduplicate`` asks (the same records in every worker and in the report: the audit is
    deterministic)."""
    from ..data import load_source
    from ..data.dataset import subset
    from ..data.duplicates import audit_datasets, deduplicate

    data, audit = settings.data, settings.data_audit
    train_set = load_source(data["train"], data["resolution"], data["max_train"], salt=salt)
    heldout = load_source(data["heldout"], data["resolution"], salt=salt)
    if audit["deduplicate"]:
        found = audit_datasets(train_set, heldout, audit["features"], audit["threshold"], audit["shared_patients"],
                               data["cache_dir"], progress=False)
        train_set = subset(train_set, deduplicate(found))
    return train_set, heldout


def build_context(settings: SearchSettings, device: str, progress: bool = True) -> SearchContext:
    from ..config.devices import torch_dtype
    from ..data import run_salt
    from ..models import load_pipeline
    from ..training import cache_training_data
    from .objectives import build_references, probe_embeddings, probe_signal

    pipe = load_pipeline(settings.model["path"], device=device, dtype=torch_dtype(settings.model["dtype"]),
                         option="model.path")
    data = settings.data
    salt = run_salt(settings.out_dir)  # keys that come from file names are pseudonymised with the run's salt
    train_set, heldout = search_data(settings, salt)
    cached = cache_training_data(pipe, train_set, Path(data["cache_dir"]), progress=progress)
    # Each distinct training report counts once: spread over the records instead, a patient repeated k times would
    # be sampled k times as often, and the copy rate would measure the repeated patients, not the training set.
    captions = list(dict.fromkeys(train_set.captions))
    sample_prompts = spread(captions, settings.sampling["prompts"])
    quality_prompts = spread(list(heldout.captions), settings.sampling["quality_prompts"])
    references = build_references(settings, pipe, train_set, heldout)
    probe, base = None, None
    # The probe noise norm is the early-stopping signal and the multi-fidelity memorization proxy.
    if settings.early_stop["enabled"] or settings.search["fidelity"]["enabled"]:
        probe = probe_embeddings(pipe, spread(captions, settings.early_stop["probe_prompts"]))
        base = probe_signal(settings, pipe.unet, pipe.scheduler, probe)
    log.info("worker ready on %s: %d training items, %d held-out, %d training and %d held-out prompts per trial",
             device, len(train_set), len(heldout), len(sample_prompts), len(quality_prompts))
    return SearchContext(settings, pipe, cached, train_set, sample_prompts, quality_prompts, probe, references, base,
                         heldout_set=heldout)
