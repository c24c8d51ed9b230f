"""Known-truth copies on real phantoms: a copy is a sample whose nearest patient, among the private ones and many
other patients of the same site, is a private one; and the detector's score against that truth."""

import math

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from fixtures_scripts import load_script
from memcontrol.data import patient_seeds, render_phantoms
from memcontrol.metrics.ground_truth import chance_rate, precision_recall, true_copies


def as_images(pixels):
    return torch.from_numpy(pixels).unsqueeze(1) * 2 - 1


@pytest.fixture(scope="module")
def cohort():
    private = as_images(render_phantoms(patient_seeds(70, 8), size=64)[0])
    # private: patients a to h, with c's record duplicated, as in the bundled private cohort; 1,000 others
    others = as_images(render_phantoms(patient_seeds(71, 1000), size=64)[0])
    return torch.cat([private, private[2:3]]), list("abcdefghc"), others


def test_planted_copies_are_found_and_strangers_are_not(cohort):
    private, keys, others = cohort
    gen = torch.Generator().manual_seed(0)
    blurred_b = gaussian_blur(private[1:2], kernel_size=7, sigma=1.5)[0]
    noisy_a = private[0] + 0.1 * torch.randn(private[0].shape, generator=gen)
    stranger = as_images(render_phantoms(patient_seeds(72, 1), size=64)[0])[0]
    samples = torch.stack([blurred_b, noisy_a, private[8], stranger])
    assert true_copies(samples, private, keys, others) == ["b", "a", "c", None]


def test_a_blurred_average_of_patients_is_not_a_copy(cohort):
    private, keys, others = cohort
    # L2 favours blur: the blurred average of 64 patients of the site (the 8 private ones among them) is nearer to
    # each of them than most patients are
    blend = gaussian_blur(torch.cat([private[:8], others[:56]]).mean(0, keepdim=True), kernel_size=7, sigma=1.5)
    assert true_copies(blend, private, keys, others) == [None]
    # it is the other patients that reject it: against the private images alone it is a "copy"
    assert true_copies(blend, private, keys, others[:0]) != [None]


def bench_truth():
    return load_script("bench/truth.py")


def test_pixel_l2_misses_copies_at_another_exposure_and_correlation_does_not(cohort):
    # The truth's measured blind spot (bench/truth.py), and the alternative that bench compares it with.
    bench = bench_truth()
    private, keys, others = cohort
    shifted = torch.stack([(gain * private[i] + offset).clamp(-1, 1) for i in range(8)
                           for gain, offset in ((0.9, -0.2), (1.1, -0.15), (0.85, 0.05))])
    owners = [k for k in keys[:8] for _ in range(3)]
    assert bench.correlation(shifted, private, keys, others) == owners
    by_l2 = true_copies(shifted, private, keys, others)
    assert sum(a == b for a, b in zip(by_l2, owners)) < len(owners) - 4
    # a flat sample correlates with nothing: it must not become the first private patient's copy
    flat = torch.stack([torch.zeros(private.shape[1:]), torch.full(private.shape[1:], -1.0)])
    assert bench.correlation(flat, private, keys, others) == [None, None]


def test_a_copy_stands_apart_and_an_average_does_not(cohort):
    # bench/truth.py's margin: a copy's runner-up (another patient: c's duplicate record is c) is far behind it; a
    # blurred average of the site's patients has one almost as near as its nearest
    bench = bench_truth()
    private, keys, others = cohort
    copies = torch.stack([(1.1 * private[i] - 0.1).clamp(-1, 1) for i in (0, 2, 8)])
    average = gaussian_blur(others[100:164].mean(0, keepdim=True), kernel_size=7, sigma=1.5)
    named, rho = bench.correlation_margin(torch.cat([copies, average]), private, keys, others)
    assert named[:3] == ["a", "c", "c"]
    assert rho[:3].max() < 0.2 and rho[3] > 0.8, rho
    assert bench.margin_rule(0.5)(torch.cat([copies, average]), private, keys, others) == ["a", "c", "c", None]


def test_resolution_mismatch_is_refused(cohort):
    private, keys, others = cohort
    with pytest.raises(ValueError, match="same resolution"):
        true_copies(torch.zeros(1, 1, 32, 32), private, keys, others)


def test_chance_rate_is_the_private_share_of_the_patients():
    assert chance_rate(12, 3988) == pytest.approx(0.003)


def test_precision_and_recall_need_the_right_patient():
    truth = ["a", None, "b", "c", None]
    detected = ["a", "b", "c", None, None]  # one right, one false alarm, one wrong patient, one missed
    score = precision_recall(detected, truth)
    assert (score["true_positives"], score["detected"], score["true_copies"]) == (1, 3, 3)
    assert score["precision"] == pytest.approx(1 / 3) and score["recall"] == pytest.approx(1 / 3)
    empty = precision_recall([None, None], [None, "a"])
    assert math.isnan(empty["precision"]) and empty["recall"] == 0
