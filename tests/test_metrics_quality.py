"""Fréchet distance and KID: parity with torchmetrics on identical feature matrices, and numerical stability."""

import numpy as np
import pytest
import torch

from memcontrol.metrics import distance_name, frechet_distance, kid, quality_report
from memcontrol.metrics.quality import polynomial_mmd2


class FeaturesAsImages(torch.nn.Module):
    """Lets torchmetrics' metric classes take a feature matrix as their 'images' (the identity feature extractor)."""

    def __init__(self, dim):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


def _features(n, d, seed, shift=0.0, scale=1.0):
    """Correlated Gaussian features; the correlation depends on d only, so different seeds share a distribution."""
    mix = np.random.default_rng(d).normal(size=(d, d)) / np.sqrt(d)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(size=(n, d)) @ mix * scale + shift)


def test_frechet_distance_matches_torchmetrics_fid():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _features(300, 24, 0), _features(250, 24, 1, shift=0.3, scale=1.2)
    metric = FrechetInceptionDistance(feature=FeaturesAsImages(24))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    reference = metric.compute().item()
    ours = frechet_distance(real, fake)
    assert reference > 1.0  # a real difference, not two near-zero numbers
    assert abs(ours - reference) <= 1e-6 * abs(reference)


def test_kid_matches_torchmetrics_on_the_same_subset():
    from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd

    real, fake = _features(80, 16, 2), _features(80, 16, 3, shift=0.5)
    # One subset holding every sample makes the random subset draw irrelevant: both compute on the same sets.
    metric = KernelInceptionDistance(feature=FeaturesAsImages(16), subsets=1, subset_size=80)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    reference = metric.compute()[0].item()
    ours_mean, ours_std = kid(real, fake, subsets=1, subset_size=80)
    assert reference > 0.01
    assert abs(ours_mean - reference) <= 1e-6 * abs(reference) and ours_std == 0.0
    # And subset by subset, against torchmetrics' reference formula.
    for seed in range(3):
        rng = np.random.default_rng(seed)
        a, b = real[rng.choice(80, 30, replace=False)], fake[rng.choice(80, 30, replace=False)]
        assert polynomial_mmd2(a.numpy(), b.numpy()) == pytest.approx(poly_mmd(a, b).item(), rel=1e-9)


def test_kid_is_unbiased_near_zero_for_one_distribution():
    a, b = _features(400, 8, 4), _features(400, 8, 5)
    mean, std = kid(a, b, subsets=20, subset_size=100)
    shifted, _ = kid(a, _features(400, 8, 6, shift=1.0), subsets=20, subset_size=100)
    assert abs(mean) < 3 * std + 1e-3 and shifted > 10 * max(abs(mean), 1e-4)


def test_frechet_distance_is_stable_for_singular_covariances():
    # Fewer samples than dimensions: both covariances are rank-deficient; the result stays finite and >= 0.
    a, b = _features(10, 64, 7), _features(12, 64, 8)
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value >= 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_quality_report_names_and_warns():
    small_real, small_fake = _features(20, 32, 9), _features(20, 32, 10)
    report = quality_report(small_real, small_fake, "vae", kid_subsets=5, kid_subset_size=10)
    assert report["fd_name"] == "FD[vae]" and report["preferred"] == "kid"
    assert any("biased" in w for w in report["warnings"])
    big = quality_report(_features(100, 8, 11), _features(100, 8, 12), "inception", kid_subsets=5,
                         kid_subset_size=50)
    assert big["fd_name"] == "FID" and big["warnings"] == [] and big["preferred"] == "fd"
    assert distance_name("inception-torchvision") == "FD[inception-torchvision]"


def test_a_metric_network_spec_is_named_by_its_network_as_its_embedder_names_itself():
    from pathlib import Path

    from memcontrol.metrics import build_embedder

    folder = Path(__file__).resolve().parent.parent / "data" / "metric_nets" / "domain"
    spec = {"type": "metric_net", "path": str(folder)}
    assert distance_name(spec) == "FD[domain]" and distance_name(spec, "kid") == "KID[domain]"
    assert distance_name(spec) == distance_name(build_embedder(spec).name)
    assert distance_name({"type": "vae"}) == "FD[vae]"
