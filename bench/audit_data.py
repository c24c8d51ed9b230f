"""Speed of the training-data audit (`memcontrol audit-data`, pixel features) on many images, on a given number of
CPU threads.

    python bench/audit_data.py --n 100000 --threads 2 --repeats 3     # the issue's target: 100k images, 2 cores
    python bench/audit_data.py --n 5000 10000 20000 --threads 2       # smaller sets, with an extrapolation to 100k

Images: synthetic grey 64 x 64 tensors held in memory (smooth random fields, so that no two are alike), 1% of them
planted again with another window and 8-bit quantisation; files are not read, so decoding (DICOM/PNG, which a real
run adds, about linear in n) is left out. Stages, timed separately, repeats interleaved across sizes:

* embed: pixel features (area-downsampled to 32 x 32, grey) and the centred unit rows, linear in n;
* search: exact range search of every image against all (``pairs_above``), quadratic in n: it
  dominates from a few thousand images on.

Prints images/s per stage and in all, with the median and spread (min-max) of the repeats, the machine, and for
sizes under 100k the 100k time extrapolated (embed linear, search quadratic in n), marked as such.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memcontrol.data.duplicates import PIXEL_SIZE, PIXEL_THRESHOLD, pairs_above, similarity_rows  # noqa: E402
from memcontrol.metrics.embedders import PixelEmbedder  # noqa: E402

TARGET = 100_000


def synthetic_images(n: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """n grey 64 x 64 images in [-1, 1]; the last 1% re-export earlier ones (another window, 8-bit)."""
    gen = torch.Generator().manual_seed(seed)
    planted = n // 100
    fields = F.interpolate(torch.randn(n - planted, 1, 16, 16, generator=gen), size=(64, 64), mode="bicubic",
                           align_corners=False)
    images = torch.tanh(fields)
    source = images[:planted]
    again = torch.round(((source + 1) / 2 * 0.9 + 0.05).clamp(0, 1) * 255) / 255 * 2 - 1
    return torch.cat([images, again]), planted


def run_once(images: torch.Tensor) -> dict:
    t0 = time.perf_counter()
    feats = PixelEmbedder(PIXEL_SIZE, batch_size=1024).embed(images)
    rows = similarity_rows(feats, centre=True)
    t1 = time.perf_counter()
    pairs = pairs_above(rows, rows, PIXEL_THRESHOLD, same_set=True, progress=False)
    t2 = time.perf_counter()
    return {"embed": t1 - t0, "search": t2 - t1, "pairs": len(pairs)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} logical CPUs, load average {load:.1f}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[5000, 10000, 20000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; torch threads {args.threads}")
    data = {n: synthetic_images(n) for n in args.n}
    times = {n: [] for n in args.n}
    for _ in range(args.repeats):
        for n in args.n:  # interleaved: a slow spell of a shared machine hits every size alike
            result = run_once(data[n][0])
            if result["pairs"] < data[n][1]:
                raise SystemExit(f"n={n}: {result['pairs']} pairs found, {data[n][1]} planted")
            times[n].append(result)
    for n in args.n:
        embed = [t["embed"] for t in times[n]]
        search = [t["search"] for t in times[n]]
        total = [e + s for e, s in zip(embed, search)]

        def fmt(values):
            return f"{statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})"

        print(f"n={n}: embed {fmt(embed)}, search {fmt(search)}, total {fmt(total)}; "
              f"{n / statistics.median(total):.0f} images/s in all; pairs found {times[n][0]['pairs']} "
              f"(planted {data[n][1]})")
        if n < TARGET:
            scale = TARGET / n
            lo = min(embed) * scale + min(search) * scale ** 2
            mid = statistics.median(embed) * scale + statistics.median(search) * scale ** 2
            hi = max(embed) * scale + max(search) * scale ** 2
            print(f"  EXTRAPOLATED from n={n} to {TARGET}: {mid:.0f} s (from {lo:.0f} to {hi:.0f}), "
                  f"{TARGET / mid:.0f} images/s; measure it with --n {TARGET}")


if __name__ == "__main__":
    main()
