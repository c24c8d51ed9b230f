"""Calibrate the pixel-space near-duplicate threshold of `memcontrol audit-data` on data it is never tested on.

    python bench/calibrate_duplicates.py [--patients 2000] [--threshold 0.97]

Patients: phantom chest films of the public site and of the private site, rendered in memory from the seeds of
`cohorts.SEEDS["public_chest"]` and `cohorts.SEEDS["heldout_rendered"]` (neither is the bundled private or held-out
cohort on disk). For each patient:

* negatives: its most similar *other* patient of the same site (a false pair when above the threshold);
* positives, the same film exported again: another display window (black and white points moved by up to 10% and
  15% of the range, clipped) with 8-bit quantisation; a crop of up to 6% of each side, resized back; both at once;
  and (public site only, as a harder case that is *not* required) a re-take with other positioning and exposure
  (`data.reacquire`).

Prints, for each threshold candidate, the false-positive rate per image (share of patients whose nearest other
patient reaches it) and the recall of each positive kind, with Wilson 95% intervals. Measured 2026-11-30 on the
2-core development machine (2,000 patients per site, seed 0):

    the table in the README section "Auditing the training data" (pixels, and the copy detector), from which
    the default threshold 0.99 was chosen: no false pair among 4,000 patients, every re-export with another
    window found.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memcontrol.data.cohorts import SEEDS  # noqa: E402
from memcontrol.data.duplicates import PIXEL_SIZE, PIXEL_THRESHOLD, feature_rows  # noqa: E402
from memcontrol.data.phantoms import patient_seeds, render_phantoms  # noqa: E402
from memcontrol.data.reacquire import rerender  # noqa: E402
from memcontrol.metrics.intervals import wilson  # noqa: E402
from memcontrol.metrics.nn_search import nearest_neighbours  # noqa: E402


def rows(images: np.ndarray, features: str, size: int) -> torch.Tensor:
    """The audit's own similarity rows (``feature_rows``) of images in [0, 1]."""
    spec = {"type": "pixels", "size": size} if features == "pixels" else {"type": "metric_net", "path": features}
    return feature_rows(torch.from_numpy(images).unsqueeze(1) * 2 - 1, spec)


def rewindow(images: np.ndarray, rng) -> np.ndarray:
    low = rng.uniform(0, 0.10, (len(images), 1, 1))
    high = rng.uniform(0.85, 1.0, (len(images), 1, 1))
    return np.round(np.clip((images - low) / (high - low), 0, 1) * 255).astype(np.float32) / 255


def crop(images: np.ndarray, rng, most: float = 0.06) -> np.ndarray:
    size = images.shape[-1]
    out = np.empty_like(images)
    for i, image in enumerate(images):
        top, bottom, left, right = (int(rng.uniform(0, most) * size) for _ in range(4))
        part = torch.from_numpy(image[top:size - bottom, left:size - right].copy())[None, None]
        out[i] = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pixel-size", type=int, default=PIXEL_SIZE, help="pixel features: side in pixels")
    parser.add_argument("--features", default="pixels", help="pixels, or a metric network folder "
                                                             "(data/metric_nets/copy_detector)")
    parser.add_argument("--threshold", type=float, nargs="*",
                        default=[0.9, 0.93, 0.95, 0.96, 0.97, 0.98, PIXEL_THRESHOLD])
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    torch.set_num_threads(2)
    sites = {"public": SEEDS["public_chest"], "private": SEEDS["heldout_rendered"]}
    negatives, positives = [], {}
    for site, seed in sites.items():
        seeds = patient_seeds(seed, args.patients)
        images, _ = render_phantoms(seeds, 64, site=site)
        base = rows(images, args.features, args.pixel_size)
        sims, _ = nearest_neighbours(base, base, k=2, progress=False)
        negatives.append(sims[:, 1].numpy())  # column 0 is the patient itself
        variants = {"window+8bit": rewindow(images, rng), "crop": crop(images, rng),
                    "window+8bit+crop": crop(rewindow(images, rng), rng)}
        if site == "public":
            variants["re-take (not required)"] = rerender(seeds, rng, 64)
        for name, variant in variants.items():
            same = (rows(variant, args.features, args.pixel_size) * base).sum(1).numpy()
            positives.setdefault(name, []).append(same)
        print(f"{site}: nearest other patient similarity median {np.median(negatives[-1]):.4f}, "
              f"max {negatives[-1].max():.4f}", flush=True)
    negatives = np.concatenate(negatives)
    positives = {k: np.concatenate(v) for k, v in positives.items()}
    for name, values in positives.items():
        print(f"positives {name}: min {values.min():.4f}, 1st percentile {np.percentile(values, 1):.4f}")
    print(f"{'threshold':>9}  {'FPR per image (95% CI)':<28}" + "".join(f"  recall {k:<24}" for k in positives))
    for t in sorted(set(args.threshold)):
        fp = int((negatives >= t).sum())
        line = f"{t:>9.3f}  {fp}/{len(negatives)} = {wilson(fp, len(negatives))!s:<18}"
        for values in positives.values():
            hits = int((values >= t).sum())
            line += f"  {hits}/{len(values)} {wilson(hits, len(values))!s:<16}"
        print(line)


if __name__ == "__main__":
    main()
