"""The baselines every search is compared with, run by the same workers with the same data, training budget
(``train.steps``), samples and metrics: full fine-tuning, LoRA on all attention blocks, and bias/norm tuning; and,
when ``baselines.methods`` asks for them, published mitigations applied to full fine-tuning: Somepalli et al.'s
training-time caption randomisation (``full_ft_random_replace``, ``full_ft_random_insert``,
``full_ft_embedding_noise``: strengths in ``baselines.captions``), Wen et al.'s inference-time prompt-embedding
adjustment (``full_ft_wen``: ``baselines.wen``) and de-duplication of the training set (``full_ft_dedup``: one
record per near-duplicate group, found as ``data_audit`` finds them, at the same step budget). The Wen row samples from the very model the ``full_ft`` row trained
(``shared_training``, when both rows are asked for): whichever of the two runs first saves it, the other loads
it.

They live in their own study (``<study_name>.baselines``) in the same storage, so that they never enter the
sampler's population, yet are kept, resumed and shown by optuna-dashboard like the trials. Each baseline is
queued once, as a waiting trial named by the user attribute ``baseline``; a worker takes it with ``ask()``, which
hands a waiting trial to exactly one worker.

The untuned base model is queued there too, whether baselines are enabled or not: it is sampled and measured
without training, and is a candidate of the default selection rule (the answer may be "do not fine-tune").
"""

from __future__ import annotations

import optuna

from . import study as st
from .settings import SearchSettings
from .space import Candidate

BASELINE_ATTR = "baseline"
BASE_MODEL = "base_model"
LABELS = {"full_ft": "full fine-tuning", "lora_attention": "LoRA on all attention", "bitfit_norm": "bias + norm tuning",
          BASE_MODEL: "base model, not fine-tuned",
          "full_ft_random_replace": "full FT + random caption replacement",
          "full_ft_random_insert": "full FT + random token insertion",
          "full_ft_embedding_noise": "full FT + text-embedding noise",
          "full_ft_wen": "full FT + Wen et al. inference mitigation",
          "full_ft_dedup": "full FT on de-duplicated data"}
CAPTION_ROWS = {"full_ft_random_replace": "random_replace", "full_ft_random_insert": "random_insert",
                "full_ft_embedding_noise": "embedding_noise"}
# Rows that sample from another row's trained model: they share its training instead of repeating it.
SAME_TRAINING = {"full_ft_wen": "full_ft"}


def baseline_methods(settings: SearchSettings) -> list[str]:
    """What the baseline study runs: the base model, then the enabled baselines."""
    return [BASE_MODEL, *(settings.baselines["methods"] if settings.baselines["enabled"] else [])]


def queue_baselines(bstudy: optuna.Study, methods: list[str], max_attempts: int,
                    attr: str = BASELINE_ATTR) -> list[str]:
    """Queue the baselines that have no trial yet (done, running, queued, or failed on their own) and were not
    interrupted ``max_attempts`` times already; each named by the user attribute ``attr``. Returns the queued
    names."""
    present, interrupted = set(), {}
    for t in bstudy.get_trials(deepcopy=False):
        name = t.user_attrs.get(attr)
        if st.is_interrupted(t):
            interrupted[name] = interrupted.get(name, 0) + 1
        else:
            present.add(name)
    missing = [m for m in methods if m not in present and interrupted.get(m, 0) < max_attempts]
    for name in missing:
        bstudy.enqueue_trial({}, user_attrs={attr: name})
    return missing


def baseline_candidate(name: str, settings: SearchSettings, unet) -> Candidate:
    from ..masks import enumerate_sites
    from .trial import NO_TRAINING

    if name == BASE_MODEL:
        return Candidate([], "block", NO_TRAINING)
    sites = enumerate_sites(unet, "block")
    rates = settings.baselines.get("lr") or {}
    rate_of = "full_ft" if name.startswith("full_ft") else name  # a mitigation row trains like full fine-tuning
    lr = {"lr": float(rates[rate_of])} if rate_of in rates else {}
    if name.startswith("full_ft"):
        # Every block-level site: together they cover every parameter of the UNet.
        candidate = Candidate([s.name for s in sites], "block", "unfreeze", {}, lr)
        if name in CAPTION_ROWS:
            candidate.train["caption_mitigation"] = {**settings.baselines["captions"], "kind": CAPTION_ROWS[name]}
        if name == "full_ft_wen":
            candidate.inference = {"wen": dict(settings.baselines["wen"])}
        candidate.deduplicated = name == "full_ft_dedup"
        methods = settings.baselines["methods"]
        # Saved for, or loaded from, a partner row only when that row is run too.
        candidate.shared_training = SAME_TRAINING.get(name) in methods or any(
            SAME_TRAINING.get(m) == name for m in methods)
        return candidate
    if name == "lora_attention":
        rank = int(settings.baselines["lora_rank"])
        return Candidate([s.name for s in sites if s.kind == "attention"], "block", "lora",
                         {"rank": rank, "alpha": float(rank)}, lr)
    if name == "bitfit_norm":
        return Candidate([s.name for s in sites], "block", "bitfit_norm", {}, lr)
    raise ValueError(f"unknown baseline {name!r}")
