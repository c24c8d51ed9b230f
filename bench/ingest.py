"""Ingest speed: images per second for DICOM and PNG at 64 and 512 px.

    python bench/ingest.py                    # about a minute on 2 CPU cores
    python bench/ingest.py --images 500 --sizes 64 256 512

For each format and size it writes phantoms to a temporary folder, then times two things over the whole set:
`read` (decode one file to [0, 1] pixels: `memcontrol.data.read_image`) and `dataset` (decode and make the
model tensor at the same resolution: `ImageCaptionDataset[i]`, what training and the audit pay per image).
Building the dataset (which decodes each file once to check it) is timed too, as `check`; writing the DICOM
phantoms themselves (`make_phantoms`: render, encode, write) as `write`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memcontrol.data import ImageCaptionDataset, make_phantoms, read_image  # noqa: E402


def write_png_copy(dicom_root: Path, out: Path) -> Path:
    """The same cohort as 16-bit PNG files with the same manifest rows."""
    out.mkdir(parents=True, exist_ok=True)
    lines = (dicom_root / "manifest.csv").read_text(encoding="utf-8").splitlines()
    rows = [lines[0]]
    for line in lines[1:]:
        name, rest = line.split(",", 1)
        pixels = read_image(dicom_root / name)
        png = Path(name).with_suffix(".png").name
        Image.fromarray(np.round(pixels * 65535).astype(np.uint16)).save(out / png)
        rows.append(f"{png},{rest}")
    (out / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out / "manifest.csv"


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def bench(manifest: Path, size: int) -> dict[str, float]:
    start = time.perf_counter()
    ds = ImageCaptionDataset(manifest, resolution=size)
    check = time.perf_counter() - start
    start = time.perf_counter()
    for path in ds.paths:
        read_image(path)
    read = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    full = time.perf_counter() - start
    return {"check": rate(len(ds), check), "read": rate(len(ds), read), "dataset": rate(len(ds), full)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300, help="images per format at 64 px (fewer at larger sizes)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 512])
    args = ap.parse_args(argv)
    print(f"{'format':<7}{'size':>6}{'images':>8}{'write img/s':>13}{'check img/s':>14}{'read img/s':>13}"
          f"{'dataset img/s':>16}")
    with tempfile.TemporaryDirectory(prefix="memcontrol-bench-") as tmp:
        for size in args.sizes:
            count = max(20, args.images * 64 // max(size, 64))  # fewer large images: time, not disk, is the limit
            root = Path(tmp) / f"dicom{size}"
            start = time.perf_counter()
            dicom_manifest = make_phantoms(root, count, seed=0, size=size)
            written = {"DICOM": rate(count, time.perf_counter() - start)}
            png_manifest = write_png_copy(root, Path(tmp) / f"png{size}")
            for name, manifest in (("DICOM", dicom_manifest), ("PNG", png_manifest)):
                r = bench(manifest, size)
                write = f"{written[name]:>13.0f}" if name in written else f"{'-':>13}"
                print(f"{name:<7}{size:>6}{count:>8}{write}{r['check']:>14.0f}{r['read']:>13.0f}"
                      f"{r['dataset']:>16.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
