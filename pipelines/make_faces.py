"""Write the face cohorts of the mask-transfer job under data/faces/ from scikit-image's `lfw_subset`.

    python pipelines/make_faces.py            # rewrites data/faces/ byte for byte (needs scikit-image: the dev extra)

`skimage.data.lfw_subset()` ships offline 100 real face crops (25 x 25 grey, from Labeled Faces in the Wild)
followed by 100 non-face crops; only the faces are used. No identity comes with them, and none is written: files and
subjects are named by an index within their split, never by the face's position in `lfw_subset` or a name.

Split (a seeded permutation of the 100 faces, seed ``SEED``):
  private/  the first ``PRIVATE_FACES`` faces of the permutation, the fine-tuning set. The first ``REPEATED`` of them
            have ``RECORDS`` identical records each, the others one: the hospital's private cohort's pressure
            (memcontrol/data/cohorts.py), under which full fine-tuning at the transfer budget (500 steps at batch 8)
            sees each repeated face about 900 times and copies; duplicated training images are the ones diffusion
            models are found to copy (Carlini et al. 2023; Somepalli et al. 2023).
  heldout/  the other faces: the "never trained on" baseline of copy detection and the quality reference.

Images are resized from 25 to 64 pixels (the base model's resolution) with Pillow's bicubic filter on the 8-bit
grey image, and written as 8-bit grey PNG. Every record has the one caption ``CAPTION``: the base model's tokenizer
knows each of its words (memcontrol/tokenizer.py), and nothing distinguishes the faces in words.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

SEED = 0
FACES = 100             # lfw_subset: faces first, then as many non-faces
PRIVATE_FACES = 8
REPEATED = 4
RECORDS = 8
SIZE = 64
CAPTION = "grayscale photograph portrait of a person face"


def split_faces(seed: int = SEED) -> tuple[list[int], list[int]]:
    """Positions in lfw_subset of the private faces (repeated ones first) and of the held-out faces."""
    order = np.random.default_rng(seed).permutation(FACES).tolist()
    return order[:PRIVATE_FACES], order[PRIVATE_FACES:]


def records(private_count: int) -> list[int]:
    """How many records each private face has, in order."""
    return [RECORDS if i < REPEATED else 1 for i in range(private_count)]


def to_png(face: np.ndarray, path: Path) -> None:
    from PIL import Image

    grey = Image.fromarray(np.round(np.clip(face, 0, 1) * 255).astype(np.uint8), mode="L")
    grey.resize((SIZE, SIZE), Image.Resampling.BICUBIC).save(path, optimize=False)


def write_split(folder: Path, faces: list[np.ndarray], copies: list[int]) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    rows = []
    for index, (face, n) in enumerate(zip(faces, copies), start=1):
        name = f"images/{index:04d}.png"
        to_png(face, folder / name)
        rows += [{"file": name, "text": CAPTION, "subject": f"face-{index:04d}"}] * n
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "text", "subject"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "data" / "faces")
    args = ap.parse_args(argv)
    from skimage.data import lfw_subset

    faces = lfw_subset()[:FACES]
    private, heldout = split_faces()
    print(write_split(args.out / "private", [faces[i] for i in private], records(len(private))))
    print(write_split(args.out / "heldout", [faces[i] for i in heldout], [1] * len(heldout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
