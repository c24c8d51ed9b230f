"""Axial brain MRI phantoms: the second modality, for showing that a mask transfers to another domain.

Like the chest phantoms, each patient is one seed that fixes the anatomy (head shape, scalp and skull, cortex
folding, ventricles, midline) and the findings (lesions with side and lobe, enlarged ventricles), so that two
patients never share an image. Rendered with numpy in image-relative coordinates.
"""

from __future__ import annotations

import numpy as np

LOBES = {"frontal": (0.0, -0.45), "parietal": (0.0, 0.1), "occipital": (0.0, 0.55), "temporal": (0.45, 0.05)}
OPENINGS = ("axial brain mri.", "axial t2 brain mri.", "brain mri, axial view.", "axial mri of the brain.")
NORMAL = ("no lesion.", "no focal lesion seen.", "brain parenchyma normal.")
VENTRICLES = {False: ("ventricles normal.", "normal ventricles."), True: ("enlarged ventricles.",
                                                                       "ventricles enlarged.")}


def _smooth_noise(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    """Band-limited noise: a random coarse grid, upsampled bilinearly to size x size."""
    coarse = rng.standard_normal((grid + 1, grid + 1))
    t = np.linspace(0, grid, size)
    i = np.minimum(t.astype(int), grid - 1)
    f = t - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def render_brain_phantom(patient_seed: int, size: int = 64) -> tuple[np.ndarray, str]:
    rng = np.random.default_rng(patient_seed)
    u = rng.uniform
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    angle = u(-0.12, 0.12)
    xr = np.cos(angle) * (x - u(-0.04, 0.04)) + np.sin(angle) * (y - u(-0.04, 0.04))
    yr = -np.sin(angle) * x + np.cos(angle) * y
    a, b = u(0.62, 0.74), u(0.80, 0.90)
    head = (xr / a) ** 2 + (yr / b) ** 2
    skull_t = u(0.10, 0.14)
    inner = (xr / (a - skull_t)) ** 2 + (yr / (b - skull_t)) ** 2
    img = np.where(head < 1, u(0.75, 0.9), u(0.0, 0.05))  # scalp and fat: bright
    img = np.where((head < 0.9) & (inner >= 1), u(0.08, 0.15), img)  # skull: a dark ring under the scalp
    brain = inner < 1
    folding = _smooth_noise(rng, size, int(rng.integers(6, 10)))
    gray, white = u(0.38, 0.48), u(0.62, 0.72)
    depth = np.clip(1 - inner, 0, 1)
    cortex = depth < u(0.2, 0.3) + 0.12 * folding
    tissue = np.where(cortex, gray, white) + 0.03 * _smooth_noise(rng, size, 16)
    img = np.where(brain, tissue, img)
    img = np.where(brain & (np.abs(xr) < 0.012 + 0.01 * abs(folding.mean())) & (np.abs(yr) > 0.3), 0.2, img)
    enlarged = rng.random() < 0.25
    grow = u(1.35, 1.6) if enlarged else 1.0
    for side in (-1, 1):
        vx, vy = side * u(0.08, 0.13), u(-0.12, 0.02)
        vrx, vry = u(0.04, 0.06) * grow, u(0.18, 0.26) * grow
        tilt = -side * u(0.15, 0.35)
        dx, dy = xr - vx, yr - vy
        ex = np.cos(tilt) * dx + np.sin(tilt) * dy
        ey = -np.sin(tilt) * dx + np.cos(tilt) * dy
        img = np.where((ex / vrx) ** 2 + (ey / vry) ** 2 < 1, u(0.1, 0.18), img)
    findings = []
    for _ in range(int(rng.choice([0, 0, 1, 1, 2]))):
        lobe = str(rng.choice(list(LOBES)))
        side = str(rng.choice(["left", "right"]))
        lx, ly = LOBES[lobe]
        # Radiological convention: the patient's left is on the image's right.
        cx = (1 if side == "left" else -1) * (lx or u(0.2, 0.35)) * a
        cy = ly * b + u(-0.08, 0.08)
        grade = str(rng.choice(["small", "large"]))
        r = u(0.05, 0.08) if grade == "small" else u(0.1, 0.14)
        blob = np.exp(-((xr - cx) ** 2 + (yr - cy) ** 2) / (2 * (r / 1.8) ** 2))
        img = np.where(brain, img + u(0.3, 0.45) * blob, img)
        findings.append(f"{grade} lesion in the {side} {lobe} lobe.")
    img = img + 0.01 * rng.standard_normal(img.shape)
    report = " ".join([str(rng.choice(OPENINGS))] + (findings or [str(rng.choice(NORMAL))])
                      + [str(rng.choice(VENTRICLES[enlarged]))])
    return np.clip(img, 0, 1).astype(np.float32), report


def render_brain_phantoms(seeds, size: int = 64) -> tuple[np.ndarray, list[str]]:
    pairs = [render_brain_phantom(int(s), size) for s in seeds]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]
