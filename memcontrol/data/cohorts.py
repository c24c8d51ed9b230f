"""The cohorts of the synthetic hospital, each drawn from its own seed so that no patient is in two of them.

- public: what the bundled base model was pretrained on (chest and brain phantoms, rendered in memory);
- private: the small "sensitive" chest cohort the default job fine-tunes on (DICOM, some records duplicated);
- heldout: further new chest patients, for the quality metric and as the "not memorized" baseline;
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

SEEDS = {"public_chest": 1000, "public_brain": 2000, "private": 7, "heldout": 8, "brain_private": 17,
         "brain_heldout": 18}


def public_cohort(patients: int, resolution: int = 64) -> tuple[torch.Tensor, list[str]]:
    """`patients` chest and `patients` brain phantoms, rendered in memory."""
    chest, chest_text = render_phantoms(patient_seeds(SEEDS["public_chest"], patients), resolution)
    brain, brain_text = render_brain_phantoms(patient_seeds(SEEDS["public_brain"], patients), resolution)
    images = np.concatenate([chest, brain])
    return torch.stack([to_model_tensor(im, resolution) for im in images]), chest_text + brain_text


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
