"""Known-truth copies on real phantoms: what counts as a copy of a patient, and the detector's score against it."""

import math

import pytest
import torch

from memcontrol.data import render_phantoms
from memcontrol.metrics.ground_truth import patient_margins, precision_recall, true_copies


@pytest.fixture(scope="module")
def cohort():
    pixels, _ = render_phantoms(range(5000, 5010), size=64)
    images = torch.from_numpy(pixels).unsqueeze(1) * 2 - 1
    # private: patients a, b, c, with c's record duplicated, as in the bundled private cohort
    private = torch.cat([images[:3], images[2:3]])
    return private, ["a", "b", "c", "c"], images[3:]


def test_margin_ignores_the_same_patients_duplicate_but_counts_every_other_patient(cohort):
    private, keys, others = cohort
    margins = patient_margins(private, keys, others)
    assert torch.isfinite(margins).all() and (margins > 0).all()
    every_other = torch.cat([private[:2], others]).flatten(1).double()
    expected_c = torch.cdist(private[2:3].flatten(1).double(), every_other).min()
    assert margins[2].item() == pytest.approx(expected_c.item())
    assert margins[3].item() == pytest.approx(expected_c.item())


def test_near_copies_are_attributed_and_averages_and_unseen_patients_are_not(cohort):
    private, keys, others = cohort
    gen = torch.Generator().manual_seed(0)
    near_b = private[1] + 0.02 * torch.randn(private[1].shape, generator=gen)
    pair = (private[0] + private[1]) / 2
    crowd = torch.cat([private[:3], others]).mean(0)
    samples = torch.stack([near_b, pair, crowd, others[0], private[3]])
    assert true_copies(samples, private, keys, others) == ["b", None, None, None, "c"]
    # without the ratio condition, L2 takes both averages for copies
    assert true_copies(samples[1:3], private, keys, others, ratio=math.inf) != [None, None]


def test_resolution_mismatch_is_refused(cohort):
    private, keys, others = cohort
    with pytest.raises(ValueError, match="same resolution"):
        true_copies(torch.zeros(1, 1, 32, 32), private, keys, others)


def test_precision_and_recall_need_the_right_patient():
    truth = ["a", None, "b", "c", None]
    detected = ["a", "b", "c", None, None]  # one right, one false alarm, one wrong patient, one missed
    score = precision_recall(detected, truth)
    assert (score["true_positives"], score["detected"], score["true_copies"]) == (1, 3, 3)
    assert score["precision"] == pytest.approx(1 / 3) and score["recall"] == pytest.approx(1 / 3)
    empty = precision_recall([None, None], [None, "a"])
    assert math.isnan(empty["precision"]) and empty["recall"] == 0
