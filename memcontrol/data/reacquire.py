"""The same chest phantom patients under another acquisition: what a re-take of the radiograph changes.

A patient's anatomy and findings come from its seed; the acquisition (positioning and exposure) is a handful of
those drawn parameters. Re-drawing only those around the patient's own values gives another image of the *same*
patient: the positives a copy detector must match, and the copies its tests plant.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .phantoms import Patient, describe_patient, render_patients

# Half-widths of the re-drawn acquisition parameters: patient positioning (rotation in radians, shifts and zoom in
# image-relative units) and exposure (gamma, background), each about a third of its range across patients.
ACQUISITION_JITTER = {"rotation": 0.03, "shift_x": 0.02, "shift_y": 0.015, "zoom": 0.04, "gamma": 0.15,
                      "background": 0.02}


def reacquire(patient: Patient, rng: np.random.Generator) -> Patient:
    """``patient`` with its acquisition parameters re-drawn; anatomy, findings and report unchanged."""
    anatomy = dict(patient.anatomy)
    for name, half_width in ACQUISITION_JITTER.items():
        if name in ("zoom", "gamma"):
            anatomy[name] = anatomy[name] * (1.0 + rng.uniform(-half_width, half_width))
        else:
            anatomy[name] = anatomy[name] + rng.uniform(-half_width, half_width)
    anatomy["background"] = max(0.0, anatomy["background"])
    return replace(patient, anatomy=anatomy)


def rerender(seeds, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Each seed's public-site patient re-acquired once (float32 N x size x size in [0, 1])."""
    return render_patients([reacquire(describe_patient(int(s)), rng) for s in seeds], size)
