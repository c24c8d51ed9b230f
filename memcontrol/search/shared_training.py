"""Trained models shared between trials that differ only in how they sample.

Full fine-tuning and full fine-tuning with Wen et al.'s inference-time mitigation train the very same model; the
second row must not pay for that training again, and must measure the same weights, so that the two rows differ
only by the mitigation. Whichever of the two trials runs first saves its trained UNet as
``OUT/baselines/_trained/<key>.safetensors`` (with a ``.json`` of its training record); the other loads it instead of
training. The key hashes everything the weights depend on (the mask, the training settings, the training data's
cache digest, the model), so that a changed setting never loads stale weights. The file is written under a
temporary name and renamed: an interrupted run never leaves a file a later one would trust, and a trial interrupted
after the save finds it when it is run again. Two workers that take both trials at once both train (the result is
the same). Disk: one UNet (3.4 GB for Stable Diffusion 1.5 in float32), kept with the run's other outputs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

FOLDER = Path("baselines") / "_trained"


def training_key(ctx, candidate, cfg) -> str | None:
    """The content key of a candidate's training; None when the training data has no digest (no cache)."""
    digest = getattr(ctx.cached, "digest", None)
    if digest is None:
        return None
    what = {"version": 1, "model": ctx.settings.model["path"], "data": digest, "sites": list(candidate.sites),
            "granularity": candidate.granularity, "family": candidate.family,
            "family_params": candidate.family_params, "train": cfg.to_dict()}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _paths(ctx, key: str) -> tuple[Path, Path]:
    folder = Path(ctx.settings.out_dir) / FOLDER
    return folder / f"{key}.safetensors", folder / f"{key}.json"


def load_shared(ctx, candidate, cfg):
    """The saved training of this candidate as a ``TrainResult`` (``seconds`` 0: this trial trained nothing), or
    None when there is none yet."""
    from safetensors.torch import load_file

    from ..masks import AppliedMask
    from ..training import TrainResult

    key = training_key(ctx, candidate, cfg)
    if key is None:
        return None
    weights, record = _paths(ctx, key)
    if not (weights.is_file() and record.is_file()):
        return None
    info = json.loads(record.read_text())
    unet = copy.deepcopy(ctx.pipe.unet)
    unet.load_state_dict(load_file(str(weights), device=str(next(unet.parameters()).device)))
    unet.requires_grad_(False).eval()
    log.info("reusing the trained model %s (%d steps)", weights, info["steps"])
    applied = AppliedMask(unet, info["trainable"], info["total"], info["percent"])
    return TrainResult("ok", None, info["steps"], 0.0, info["losses"], applied)


def save_shared(ctx, candidate, cfg, result) -> Path | None:
    """Save a finished training for the trials that share it."""
    from safetensors.torch import save_file

    key = training_key(ctx, candidate, cfg)
    if key is None:
        log.warning("the trained model cannot be shared: the training data has no cache digest")
        return None
    weights, record = _paths(ctx, key)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in result.merged_unet().state_dict().items()}
    applied = result.applied
    tmp = weights.with_suffix(f".tmp{os.getpid()}")
    save_file(state, str(tmp))
    os.replace(tmp, weights)
    tmp = record.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"steps": result.steps, "seconds": result.seconds, "losses": result.losses,
                               "trainable": applied.trainable, "total": applied.total, "percent": applied.percent}))
    os.replace(tmp, record)  # the record last: a weights file without its record is never loaded
    return weights
