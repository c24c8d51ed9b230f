"""Which generated images truly copy a training patient, where that is knowable: every patient distinct.

In the synthetic hospital each patient's anatomy comes from its own seed, so no two patients share an image. A
sample is then a *true copy* of private patient ``q`` when, in pixels (L2):

1. it lies closer to ``q``'s image than any other real patient's image does (another private patient, or any
   held-out one): it reproduces what only ``q`` has; and
2. it is at most ``ratio`` (default 2/3) times as far from ``q`` as from the nearest other patient: unambiguously
   ``q``'s.

The second condition is there because L2 favours blur: the average of two or ten phantoms is already closer to
some patient than any real patient is, yet it copies nobody; it sits about as far from several patients (ratio
0.84 to 1 on phantoms), which the ratio rejects (the distance-ratio idea of Carlini et al., 2023).

This truth uses neither the detector's features nor its threshold, so the detector (nearest neighbour in some
feature space above ``tau``) can be scored against it with precision and recall.
"""

from __future__ import annotations

import math

import torch


def patient_margins(private: torch.Tensor, keys: list[str], others: torch.Tensor) -> torch.Tensor:
    """For each private image, the pixel L2 distance to the nearest image of *another* patient: a different key
    among ``private`` (duplicate records share a key) or any image of ``others``."""
    if len(keys) != len(private):
        raise ValueError(f"{len(private)} private images but {len(keys)} keys")
    flat = private.flatten(1).double()
    within = torch.cdist(flat, flat)
    same = torch.tensor([[a == b for b in keys] for a in keys])
    within[same] = math.inf
    nearest = within.min(1).values
    if len(others):
        nearest = torch.minimum(nearest, torch.cdist(flat, others.flatten(1).double()).min(1).values)
    return nearest


def true_copies(samples: torch.Tensor, private: torch.Tensor, keys: list[str], others: torch.Tensor,
                ratio: float = 2 / 3) -> list:
    """For each sample, the key of the private patient it copies (see the module), or None."""
    if samples.shape[1:] != private.shape[1:]:
        raise ValueError(f"samples are {tuple(samples.shape[1:])}, private images {tuple(private.shape[1:])}: "
                         "compare them at the same resolution")
    margins = patient_margins(private, keys, others)
    flat = samples.flatten(1).double()
    to_private = torch.cdist(flat, private.flatten(1).double())
    to_others = torch.cdist(flat, others.flatten(1).double()) if len(others) else None
    copies = []
    for row, dist in enumerate(to_private):
        q = int(dist.argmin())
        other_patients = dist[[k != keys[q] for k in keys]]
        if to_others is not None:
            other_patients = torch.cat([other_patients, to_others[row]])
        runner_up = other_patients.min() if len(other_patients) else torch.tensor(math.inf)
        is_copy = dist[q] < margins[q] and dist[q] <= ratio * runner_up
        copies.append(keys[q] if is_copy else None)
    return copies


def precision_recall(detected: list, truth: list) -> dict:
    """Score per-sample detections (the key a detector attributes a copy to, or None) against the truth. A
    detection is right only with the right patient. Precision is NaN when nothing was detected, recall when
    nothing was copied."""
    if len(detected) != len(truth):
        raise ValueError(f"{len(detected)} detections for {len(truth)} samples")
    hits = sum(d is not None and d == t for d, t in zip(detected, truth))
    n_detected = sum(d is not None for d in detected)
    n_true = sum(t is not None for t in truth)
    return {"true_positives": hits, "detected": n_detected, "true_copies": n_true,
            "precision": hits / n_detected if n_detected else math.nan,
            "recall": hits / n_true if n_true else math.nan}
