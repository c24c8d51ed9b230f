"""What it costs to flag a memorized prompt: the noise norm (1 and 4 steps) against generate-then-nearest-neighbour.

    python bench/detect_cost.py                        # phantoms of the synthetic hospital and the shapes world
    python bench/detect_cost.py --images phantoms --json detect.json

The model is the known-truth world of the tests (``tests/fixtures_metrics.build_memorized_world``): a tiny Stable
Diffusion pipeline (SD 1.5's block layout, 32 px) over-trained on 6 images with their captions, beside a "public" set
whose captions carry no information about the image. ``--images phantoms`` draws all images from the data area's
chest-radiograph phantoms (the synthetic hospital), ``shapes`` from distinct coloured shapes (the tests' default).

Two detectors score each prompt; the memorized prompts (the 6 training captions) should score higher than the 18
prompts the model never saw, and the AUC says how well each detector ranks them:

* noise norm (Wen et al., ICLR 2024) after 1 or 4 steps: 2 UNet evaluations (prompt and empty prompt) per step;
* generate-then-NN: one sample per prompt with 50 DDIM steps (conditional only, guidance 1: one UNet evaluation per
  step, the cheapest sampler; with classifier-free guidance it costs twice as much), decoded, embedded (raw pixels)
  and scored by its cosine similarity to the nearest training image. The training features are computed once
  beforehand and not counted.

Cost per prompt = wall-clock time of the whole batch of 24 prompts (batch size 8) / 24, the median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the known-truth world lives with the tests that use it

from fixtures_metrics import build_memorized_world  # noqa: E402

from memcontrol.metrics import build_embedder, nearest_neighbours, noise_norm  # noqa: E402
from memcontrol.models import load_pipeline  # noqa: E402
from memcontrol.sampling import generate_samples  # noqa: E402


def auc(positive, negative) -> float:
    diff = np.asarray(positive)[:, None] - np.asarray(negative)[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def timed(func, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_world(kind: str, repeats: int, gen_steps: int, seed: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        world = build_memorized_world(Path(tmp), seed=seed, images=kind)
        built = time.perf_counter() - start
        pipe = load_pipeline(world.pipe_dir)
    prompts = world.train_captions + world.unseen_prompts
    n_mem = len(world.train_captions)
    pixels = build_embedder({"type": "pixels"})
    train_feats = pixels.embed(world.train_images)

    def generate_then_nn():
        images = generate_samples(pipe, prompts, steps=gen_steps, guidance_scale=1.0, sampler="ddim", batch_size=8)
        sims, _ = nearest_neighbours(pixels.embed(images), train_feats, k=1, progress=False)
        return sims[:, 0].numpy()

    rows = []
    for name, func in [(f"noise norm, {s} step{'s' * (s > 1)}",
                        lambda s=s: noise_norm(pipe, prompts, steps=s, batch_size=8, progress=False).numpy())
                       for s in (1, 4)] + [(f"generate ({gen_steps} steps) + NN", generate_then_nn)]:
        seconds, scores = timed(func, repeats)
        rows.append({"images": kind, "detector": name, "per_prompt_ms": 1000 * seconds / len(prompts),
                     "auc": auc(scores[:n_mem], scores[n_mem:]), "prompts": len(prompts), "memorized": n_mem,
                     "world_build_s": round(built, 1)})
    base = rows[0]["per_prompt_ms"]
    for row in rows:
        row["cost_vs_noise_norm_1"] = row["per_prompt_ms"] / base
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", default=["phantoms", "shapes"], choices=["phantoms", "shapes"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for kind in args.images:
        rows += bench_world(kind, args.repeats, args.gen_steps, args.seed)
        for r in rows[-3:]:
            print(f"{r['images']:<9} {r['detector']:<28} {r['per_prompt_ms']:9.1f} ms/prompt "
                  f"x{r['cost_vs_noise_norm_1']:<7.1f} AUC {r['auc']:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
