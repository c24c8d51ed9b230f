"""The cohorts of the synthetic hospital, each drawn from its own seed so that no patient is in two of them.

- public: what the bundled base model was pretrained on (chest and brain phantoms of the public site, in memory);
- private: the small "sensitive" chest cohort the default job fine-tunes on, from the private site (portable AP
  films, collimation, marker, support devices; see phantoms.py), as DICOM, with a repeated subset (PRIVATE);
- heldout: further patients of the private site, on disk (DICOM), for the quality metric and as the "not memorized"
  baseline;
- heldout_rendered: as many more private-site patients as wanted, rendered in memory from their seeds
  (`private_site_heldout`): the quality reference with hundreds of images, and the "other patients" a copy detector
  is tested against;
- brain_private / brain_heldout: the second modality, for the mask-transfer job (PNG files and a manifest).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .brain_phantoms import render_brain_phantoms
from .phantoms import patient_seeds, render_phantoms
from .transforms import to_model_tensor

SEEDS = {"public_chest": 1000, "public_brain": 2000, "private": 7, "heldout": 8, "heldout_rendered": 9,
         "brain_private": 17, "brain_heldout": 18}

# Memorization pressure of the private cohort: 8 patients, half of them (4) repeated with 8 records each, so they
# make 32 of its 36 records and a fine-tune sees each of them 8 times as often as a single-record patient. Real
# archives repeat studies (re-exports, follow-ups), and duplicated training images are the ones diffusion models are
# found to copy (Carlini et al. 2023; Somepalli et al. 2023); the MemControl reference likewise repeats a
# memorization subset many times. Why these numbers: the quickstart's budget is fixed (500 steps at batch 8, 4,000
# images seen), and at pixel level (memcontrol.metrics.ground_truth) its full fine-tune copied almost nothing when
# that budget was spread over 32 patients (8 repeated 4 times: each repeated patient seen about 290 times) or 16 (8
# repeated 8 times, about 440 times): 2 of 16 samples at step 500. Four repeated patients seen about 900 times each
# are copied (README: the synthetic hospital, measured along the fine-tune), and the 4 single-record patients, seen
# about 110 times, are the part of the cohort that is learnt from rather than replayed.
PRIVATE = {"patients": 8, "duplicates": 4, "records": 8}
HELDOUT_PATIENTS = 64  # on disk; more are rendered in memory (private_site_heldout)


def public_cohort(patients: int, resolution: int = 64) -> tuple[torch.Tensor, list[str]]:
    """`patients` chest and `patients` brain phantoms, rendered in memory."""
    chest, chest_text = render_phantoms(patient_seeds(SEEDS["public_chest"], patients), resolution)
    brain, brain_text = render_brain_phantoms(patient_seeds(SEEDS["public_brain"], patients), resolution)
    images = np.concatenate([chest, brain])
    return torch.stack([to_model_tensor(im, resolution) for im in images]), chest_text + brain_text


def private_site_heldout(count: int, resolution: int = 64) -> tuple[np.ndarray, list[str]]:
    """`count` held-out patients of the private site, rendered in memory (float32 N x res x res in [0, 1], and
    their reports). Their seeds are disjoint from every other cohort's; a larger count starts with the same
    patients."""
    return render_phantoms(patient_seeds(SEEDS["heldout_rendered"], count), resolution, site="private")


def write_brain_cohort(out_dir, patients: int, seed: int, size: int = 64) -> Path:
    """Brain phantoms as 8-bit PNG files with a `manifest.csv` (file, text, subject)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, reports = render_brain_phantoms(patient_seeds(seed, patients), size)
    width = max(4, len(str(patients)))
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["file", "text", "subject"])
        for i, (image, report) in enumerate(zip(images, reports)):
            subject = f"sub-{i + 1:0{width}d}"
            Image.fromarray(np.round(image * 255).astype(np.uint8)).save(out_dir / "images" / f"{subject}.png")
            writer.writerow([f"images/{subject}.png", report, subject])
    return manifest
