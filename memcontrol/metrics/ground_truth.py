"""Which generated images truly copy a training patient, where that is knowable: identity comes from a seed.

In the synthetic hospital each patient's anatomy comes from its own seed, so any number of *other* patients of the
same site can be rendered. A sample is a *true copy* of private patient ``q`` when, among the private patients'
images and those of many (thousands of) other patients of the same site, the image nearest to it in pixel L2 is
``q``'s. The space is pixels, not any detector's features, and there is no threshold: nothing here was tuned on
the detector's answers. Pass the references as the generator can draw them: the bundled base model's VAE, trained
on public films, reconstructs a private-site film with an RMS error of 0.33 (images in [-1, 1]), more than the
distance between two patients, so no sample of it is nearest to its patient in raw pixels; ``bench/detector.py``
passes every reference through the VAE first.

- A sample that copies nobody but looks like a patient of the site lands on a private patient by chance with
  probability about ``chance_rate(n_private, n_others)`` = n_private / (n_private + n_others) (the patients are
  exchangeable): 0.2% for the 8 patients of the bundled private cohort among 4,000 others.
- L2 favours blur: the average of several patients is nearer to each of them than most real patients are; the
  thousands of others are what make such an average land on some other patient instead. How often it still lands
  on a private patient depends on the private set: for 12 public-site chest phantoms against 4,000 others,
  blurred (1.5 px) averages of two, three and four private patients landed on a private one 7%, 1% and 0.5% of the
  time (200 draws each); for a set of 8 holding two look-alike patients (each the other's nearest neighbour)
  against 1,000 others, most averages containing both landed on one of the two. A blend of look-alikes is the case
  this truth settles least well. Blurred (up to 2 px) and noisy copies of a patient were all found.
- L2 does not forgive exposure. Of copies of known identity re-acquired and given a global gain (0.85 to 1.15) and
  offset (-0.3 to 0.1) besides blur and noise, it names the right patient for about three in four (73.5% and 78.0%
  for two sets of 8 private-site patients among 4,000 others, through the VAE; ``python bench/truth.py``), so it
  undercounts copies drawn darker or paler than their patient. Nearest by pixel correlation (a gain and an offset
  forgiven) names 92.5% and 95.0% of them, but is not used: it names generic samples of the site as copies of one
  typical patient (a hub): 1 of the untuned base model's 32 samples in the headline study, 1 to 7 of 32 in
  every trial and random mask there, where L2 names none. Asking correlation's nearest patient to stand apart
  from the runner-up, with the margin calibrated on samples of models that never saw the private patients, does
  not help: none of those samples lands on a private patient, so no margin is set (``bench/truth.py --shadow``).
- "Nearest" is strict. Most of the samples the copy detector names a patient for and this truth does not are
  partial copies: that patient ranks among the nearest 1% of the 4,008 in pixels (median rank 8.5 pooled over two
  studies, 6 in a third), where the untuned base model's samples rank the same patients at a median of 462.5 and
  691 (``bench/detector_rules.py``). They count against the detector here. A near-miss truth (a copy of every
  private patient among a sample's 5 nearest; 1% of real non-private patients called copies) is measured beside
  this one in that bench, not used in its place.
"""

from __future__ import annotations

import math

import torch


def chance_rate(n_private: int, n_others: int) -> float:
    """Probability that a sample copying nobody is taken for a copy of some private patient."""
    return n_private / (n_private + n_others)


def true_copies(samples: torch.Tensor, private: torch.Tensor, keys: list[str], others: torch.Tensor,
                batch_size: int = 256) -> list:
    """For each sample, the key of the private patient whose image is its nearest (pixel L2) among ``private``
    and ``others``, or None when the nearest is one of ``others``. ``keys`` name the private images' patients
    (duplicate records share a key)."""
    if len(keys) != len(private):
        raise ValueError(f"{len(private)} private images but {len(keys)} keys")
    if samples.shape[1:] != private.shape[1:] or others.shape[1:] != private.shape[1:]:
        raise ValueError(f"samples are {tuple(samples.shape[1:])}, private images {tuple(private.shape[1:])}, "
                         f"other patients {tuple(others.shape[1:])}: compare them at the same resolution")
    references = torch.cat([private, others]).flatten(1).double()
    nearest = torch.cat([torch.cdist(samples[i:i + batch_size].flatten(1).double(), references).argmin(1)
                         for i in range(0, len(samples), batch_size)])
    return [keys[i] if i < len(keys) else None for i in nearest.tolist()]


@torch.no_grad()
def through_vae(vae, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Images ([-1, 1]) encoded and decoded by a model's VAE: how the model would draw them if it reproduced them
    exactly, the references a truth for its samples compares with."""
    out = [vae.decode(vae.encode(images[i:i + batch_size]).latent_dist.mean).sample
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).clamp(-1, 1)


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
