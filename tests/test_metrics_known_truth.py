"""Known truth: a tiny model over-trained on six images (see fixtures_metrics.memorized_world) is flagged by the
audit, with the right training items; the same audit run against held-out images flags nothing; and the noise norm,
which needs no training data, separates the memorized prompts from prompts the model never saw."""

import csv

import numpy as np
import pytest

from memcontrol.audit import run_audit
from memcontrol.metrics import noise_norm


def audit_config(pixel_tau: float, features_extra=()):
    return {"audit": {
        "device": "cpu", "seed": 0,
        # The model was trained to predict clean samples without guidance in mind: sample as it was trained.
        "generation": {"n_per_prompt": 2, "steps": 10, "guidance_scale": 1.0, "sampler": "ddim", "batch_size": 12},
        "features": [{"type": "pixels", "tau": pixel_tau}, *features_extra],
        # 32 px images in a 4 x 4 grid: 8 px tiles, coarser than the default's; delta set for that.
        "tiled_l2": {"delta": 0.25},
        "extraction": {"enabled": True, "n_per_prompt": 5, "max_prompts": 4, "min_clique": 4, "delta": 0.25},
        "quality": {"kid_subsets": 10, "kid_subset_size": 6},
        "report": {"pairs": 8},
    }}


# Pixel cosine similarity of distinct images in this world is at most ~0.7; of a reproduction, over ~0.93.
PIXEL_TAU = 0.85


def _rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def train_audit(memorized_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit-train")
    config = audit_config(PIXEL_TAU, [{"type": "vae", "tau": "heldout"}])
    metrics = run_audit(memorized_world.pipe_dir, out, manifest=memorized_world.train_manifest,
                        heldout=memorized_world.heldout_manifest, config=config)
    return metrics, out


def test_overtrained_model_is_flagged_with_the_right_training_items(train_audit, memorized_world):
    metrics, out = train_audit
    checks = metrics["checks"]
    copies = checks["copy_detection"]["pixels"]
    assert copies["fraction"] >= 0.75, copies
    # Prompt i is training caption i, whose image is training key i: every sample's nearest item is its own.
    samples = _rows(out / "samples.csv")
    assert len(samples) == 2 * len(memorized_world.train_keys)
    expected = [memorized_world.train_keys[int(r["prompt_index"])] for r in samples]
    assert [r["nearest_key[pixels]"] for r in samples] == expected
    flagged = {a["key"] for a in copies["attribution"]}
    assert flagged <= set(memorized_world.train_keys) and len(flagged) >= 5
    # The held-out baseline: real unseen images are not near any training image.
    assert copies["heldout_baseline"]["fraction_above_tau"] == 0.0
    assert checks["distance_ratio"]["fraction"] >= 0.5 and checks["distance_ratio"]["heldout_baseline"]["fraction"] == 0
    assert checks["tiled_l2"]["fraction"] >= 0.75 and checks["tiled_l2"]["heldout_baseline"]["fraction"] == 0
    assert checks["extraction"]["fraction"] >= 0.5
    assert set(checks["extraction"]["extracted_keys"]) <= set(memorized_world.train_keys)
    # A threshold calibrated on held-out images works in the VAE's feature space as well.
    vae = checks["copy_detection"]["vae"]
    assert vae["tau_source"].startswith("held-out") and vae["fraction"] >= 0.75


def test_the_same_audit_against_heldout_images_flags_none(memorized_world, tmp_path):
    metrics = run_audit(memorized_world.pipe_dir, tmp_path, manifest=memorized_world.heldout_manifest,
                        config=audit_config(PIXEL_TAU))
    checks = metrics["checks"]
    assert metrics["counts"]["samples"] == 2 * len(memorized_world.heldout_captions)
    assert checks["copy_detection"]["pixels"]["copies"] == 0
    assert checks["distance_ratio"]["memorized"] == 0
    assert checks["tiled_l2"]["copies"] == 0
    assert checks["extraction"]["extracted"] == 0


def test_noise_norm_separates_memorized_from_unseen_prompts(memorized_pipe, memorized_world):
    memorized = noise_norm(memorized_pipe, memorized_world.train_captions, steps=1).numpy()
    unseen = noise_norm(memorized_pipe, memorized_world.unseen_prompts, steps=1).numpy()
    pairs = memorized[:, None] - unseen[None, :]
    auc = float((pairs > 0).mean() + 0.5 * (pairs == 0).mean())
    assert len(unseen) >= 3 * len(memorized)
    assert auc >= 0.9, (auc, memorized, unseen)


def test_audit_records_the_noise_norm_gap(train_audit):
    metrics, out = train_audit
    nn = metrics["checks"]["noise_norm"]
    assert nn["auc_audited_vs_heldout"] >= 0.9
    prompts = _rows(out / "prompts.csv")
    assert len(prompts) == nn["n"] and np.isclose(np.mean([float(r["noise_norm"]) for r in prompts]), nn["mean"],
                                                  rtol=1e-4)
