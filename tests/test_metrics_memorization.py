"""Copy-detection metrics find exact duplicates planted among generated images, and only those.

The training set is the data area's phantom cohort read through the real DICOM path (it holds duplicate records of
some patients, as real archives do); the background of non-copies is real output of the tiny random pipeline.
"""

import numpy as np
import pytest
import torch

from memcontrol.metrics import build_embedder, copy_detection, distance_ratio, extraction, tiled_l2
from memcontrol.metrics.memorization import greedy_clique
from memcontrol.sampling import generate_samples

PLANTED = [0, 3, 11]  # training rows copied into the generated set


@pytest.fixture(scope="module")
def cohort(phantom_cohort):
    from memcontrol.data import ImageCaptionDataset

    ds = ImageCaptionDataset(phantom_cohort.manifest, resolution=64)
    images = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
    return images, list(ds.keys)


@pytest.fixture(scope="module")
def generated_with_copies(tiny_pipe, cohort):
    images, keys = cohort
    # A training row whose patient has a duplicate record: its copy must still pass the distance-ratio test.
    dup_row = next(i for i, k in enumerate(keys) if keys.count(k) > 1 and i not in PLANTED)
    planted_rows = PLANTED + [dup_row]
    background = generate_samples(tiny_pipe, ["pa chest radiograph", "small nodule left upper zone"],
                                  n_per_prompt=3, steps=3, seed=0)
    generated = torch.cat([background[:3], images[planted_rows], background[3:]])
    planted_positions = list(range(3, 3 + len(planted_rows)))
    return generated, planted_positions, [keys[r] for r in planted_rows]


def _flagged(flags):
    return [i for i, f in enumerate(flags) if f]


@pytest.mark.parametrize("spec", [{"type": "pixels"}, {"type": "pixels", "size": 16}, {"type": "vae"}])
def test_copy_detection_finds_planted_duplicates(spec, tiny_pipe, cohort, generated_with_copies):
    images, keys = cohort
    generated, positions, planted_keys = generated_with_copies
    embedder = build_embedder(spec, pipe=tiny_pipe)
    result = copy_detection(embedder.embed(generated), embedder.embed(images), keys, tau=0.98)
    assert _flagged(result["samples"]["is_copy"]) == positions
    assert [result["samples"]["nn_key"][p] for p in positions] == planted_keys
    assert sorted(a["key"] for a in result["attribution"]) == sorted(planted_keys)
    assert result["fraction"] == pytest.approx(len(positions) / len(generated))
    assert result["max"] == pytest.approx(1.0, abs=1e-5)


def test_distance_ratio_finds_planted_duplicates_despite_duplicate_records(cohort, generated_with_copies):
    images, keys = cohort
    generated, positions, planted_keys = generated_with_copies
    result = distance_ratio(generated, images, keys)
    assert result["training_duplicates_removed"] == len(keys) - len(set(keys))  # the cohort's duplicate records
    assert _flagged(result["samples"]["is_memorized"]) == positions
    assert [result["samples"]["nn_key"][p] for p in positions] == planted_keys
    assert all(result["samples"]["ratio"][p] == 0.0 for p in positions)
    # Grouping by key instead of pixels gives the same answer here (one image per patient).
    by_key = distance_ratio(generated, images, keys, distinct_by="key")
    assert _flagged(by_key["samples"]["is_memorized"]) == positions
    # The mean ratio carries its bootstrap interval, which brackets it and has width (copies at 0, others near 1).
    ratios = [r for r in result["samples"]["ratio"] if r is not None]
    assert result["mean_ratio"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-9)
    assert result["mean_ratio_ci_low"] < result["mean_ratio"] < result["mean_ratio_ci_high"]


def test_tiled_l2_finds_planted_duplicates(cohort, generated_with_copies):
    images, keys = cohort
    generated, positions, planted_keys = generated_with_copies
    result = tiled_l2(generated, images, keys, delta=0.1, grid=4)
    assert _flagged(result["samples"]["is_copy"]) == positions
    assert [result["samples"]["nn_key"][p] for p in positions] == planted_keys
    assert all(result["samples"]["distance"][p] < 1e-6 for p in positions)


def test_tiled_l2_catches_a_local_difference_that_global_l2_hides(cohort):
    images, keys = cohort
    edited = images[5:6].clone()
    edited[:, :, 4:12, 4:12] = (edited[:, :, 4:12, 4:12] + 0.8).clamp(max=1.0)  # a small bright patch
    # Global RMS difference (in [0, 1] units) to the original is under delta: a global test would call it a copy.
    global_rms = ((edited - images[5:6]) / 2).square().mean().sqrt().item()
    assert global_rms < 0.1
    result = tiled_l2(edited, images, keys, delta=0.1, grid=4)
    assert result["copies"] == 0 and result["samples"]["distance"][0] > 0.1


def test_extraction_finds_a_planted_clique(tiny_pipe, cohort):
    images, keys = cohort
    random_samples = generate_samples(tiny_pipe, ["pa chest radiograph"], n_per_prompt=6, steps=3, seed=1)
    clique = images[7:8].repeat(6, 1, 1, 1)
    clique[4:] = random_samples[:2]  # 4 identical copies and 2 others
    samples = torch.stack([clique, random_samples])
    result = extraction(samples, images, keys, delta=0.1, min_clique=3, prompts=["copied", "random"])
    first, second = result["per_prompt"]
    assert first["extracted"] and first["clique_size"] == 4 and first["nearest_key"] == keys[7]
    assert not second["extracted"]
    assert result["extracted"] == 1 and result["extracted_keys"] == [keys[7]]


def test_greedy_clique_finds_the_clique():
    adj = np.zeros((7, 7), bool)
    for a, b in [(0, 1), (0, 2), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (4, 6), (3, 5), (3, 6)]:
        adj[a, b] = adj[b, a] = True
    assert sorted(greedy_clique(adj)) == [3, 4, 5, 6]
    assert len(greedy_clique(np.zeros((3, 3), bool))) == 1


def test_keys_must_match_features():
    with pytest.raises(ValueError, match="keys"):
        copy_detection(torch.eye(2), torch.eye(3), ["a", "b"])
