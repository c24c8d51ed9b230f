"""The private site is something to learn: on the bundled world, the shipped base model is measurably poor there and
a short full fine-tune on the private cohort is measurably better (bench/hospital_gap.py at small sizes)."""

import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def test_full_finetuning_closes_a_significant_quality_gap():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import hospital_gap as gap
    finally:
        sys.path.remove(str(REPO / "bench"))
    from memcontrol.config import read_config
    from memcontrol.data.cohorts import private_site_heldout
    from memcontrol.metrics.quality import gaussian_stats
    from memcontrol.models import load_pipeline
    from memcontrol.sampling import generate_samples
    from memcontrol.training import pipeline_with_unet

    torch.manual_seed(0)
    job = read_config(REPO / "configs" / "quickstart.yaml")
    pipe = load_pipeline(REPO / "data" / "base_model")
    unet, _ = gap.full_finetune(pipe, job, steps=30)  # the quickstart's settings, 30 of its 500 steps
    held, reports = private_site_heldout(48 + 96)
    reference = gap.vae_pooled(pipe.vae, gap.as_model_images(held[48:]))
    fd = {}
    for name, model in (("base", pipe), ("tuned", pipeline_with_unet(pipe, unet))):
        samples = generate_samples(model, reports[:48], 1, steps=8, sampler="dpm", guidance_scale=7.5)
        fd[name] = gap.fd_statistic(gap.vae_pooled(pipe.vae, samples), gaussian_stats(reference))
    indices = gap.bootstrap_indices(48, 200, seed=0)
    base, tuned = gap.interval(fd["base"], indices), gap.interval(fd["tuned"], indices)
    gain = gap.paired(fd["base"], fd["tuned"], indices)
    # The gap lies far outside the noise: the intervals do not overlap, and the paired gain excludes zero.
    assert base.low > tuned.high, (base, tuned)
    assert gain.low > 0 and np.isfinite(gain.high), gain
