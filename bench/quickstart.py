"""The main job, timed and checked against the truth: `memcontrol search --config configs/quickstart.yaml`.

    python bench/quickstart.py                       # runs the job into a fresh temporary folder
    python bench/quickstart.py --run runs/quickstart # only reads a finished run (of --config)

Prints the wall time and, for full fine-tuning, each baseline and the selected mask: copy rate (share of samples
whose nearest private patient is above the config's tau in its feature space), the private patients copied, mean
nearest-neighbour similarity, quality (FD and KID on the config's features, from samples of held-out captions),
trainable share and steps. Every figure carries its 95% interval: Wilson for rates (copy rate, precision, recall),
a bootstrap over the generated samples for the others (the search's own intervals, from trials.csv).

Then the detector against the truth. Every phantom patient's anatomy comes from its seed, so whether a sample truly
copies a private patient is known from identity (``memcontrol.metrics.ground_truth``): its nearest image in pixels,
among the private patients and ``--others`` further patients of the private site rendered in memory, all through
the model's VAE, is that patient's. The detector (nearest private patient in the config's features, above tau) is
right when it names that patient. Precision and recall are given per run and pooled over every evaluated run of the
study (with Wilson 95% intervals).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def load_rows(run: Path) -> list[dict]:
    with open(run / "trials.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def real_images(settings, others: int):
    """Private images with their patient keys at the run's resolution, and ``others`` patients of the private site
    rendered in memory (the identity truth's other patients), all through the model's VAE."""
    import torch

    from memcontrol.data import load_source, run_salt
    from memcontrol.data.cohorts import private_site_heldout
    from memcontrol.data.transforms import to_model_tensor
    from memcontrol.metrics.ground_truth import through_vae
    from memcontrol.models import load_pipeline
    from memcontrol.search.objectives import dataset_pixels

    resolution = settings.data["resolution"]
    dataset = load_source(settings.data["train"], resolution, salt=run_salt(settings.out_dir))
    private = torch.cat(list(dataset_pixels(dataset)))
    rendered, _ = private_site_heldout(others, resolution)
    others = torch.stack([to_model_tensor(im, resolution, private.shape[1]) for im in rendered])
    # Compared as the model draws them (ground_truth.through_vae): its VAE cannot draw a private-site film closer
    # than two patients lie apart.
    vae = load_pipeline(settings.model["path"], option="model.path").vae
    return through_vae(vae, private), dataset.keys, through_vae(vae, others)


def run_samples(folder: Path):
    """A run's saved samples (RGB PNGs), N x 3 x H x W in [-1, 1] as the search measured them."""
    import numpy as np
    import torch

    from memcontrol.data.images import read_image

    arrays = [read_image(f) * 2 - 1 for f in sorted((folder / "samples").glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def detections(folder: Path, tau: float) -> list:
    neighbours = json.loads((folder / "neighbours.json").read_text())
    return [n["key"] if n["similarity"] > tau else None for n in neighbours]


def score_runs(run: Path, rows: list[dict], settings, images) -> dict:
    """Truth and detector for every evaluated run: {folder: (truth, detected)}."""
    from memcontrol.metrics.ground_truth import true_copies

    private, keys, others = images
    channels = private.shape[1]
    tau = float(settings.objectives["memorization"]["tau"])
    scored = {}
    for r in rows:
        folder = run / r["folder"]
        if r["state"] != "complete" or not (folder / "neighbours.json").is_file():
            continue
        samples, detected = run_samples(folder)[:, :channels], detections(folder, tau)
        scored[r["folder"]] = (true_copies(samples, private, keys, others), detected)
    return scored


def base_model_row(settings) -> dict:
    """The un-tuned base model, sampled and measured exactly as every run is: the reference both objectives start
    from."""
    from memcontrol.config.devices import resolve_device
    from memcontrol.search.context import build_context
    from memcontrol.search.objectives import measure, sample

    ctx = build_context(settings, resolve_device(settings.model["device"], 0))
    metrics, _ = measure(settings, ctx.references, sample(settings, ctx.pipe, ctx.sample_prompts),
                         sample(settings, ctx.pipe, ctx.quality_prompts))
    return {"label": "base model, not fine-tuned", "chosen": "False", "trainable_percent": 0, "steps": 0,
            "step_budget": 0, "folder": None, **metrics}


def num(row: dict, key: str, spec: str) -> str:
    """A figure of a trials.csv row (or of a metrics dict) with its 95% interval."""
    from memcontrol.metrics.intervals import format_interval

    def get(name):
        value = row.get(name)
        return None if value in (None, "") else float(value)

    return format_interval(get(key), get(f"{key}_ci_low"), get(f"{key}_ci_high"), spec)


def rate(hits: int, n: int) -> str:
    """A rate with its Wilson 95% interval."""
    from memcontrol.metrics.intervals import wilson

    ci = wilson(hits, n)
    return "-" if not n else f"{ci.value:.0%} [{ci.low:.0%}, {ci.high:.0%}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "quickstart.yaml")
    ap.add_argument("--run", type=Path, default=None, help="a finished run folder to read instead of running")
    ap.add_argument("--others", type=int, default=4000,
                    help="patients of the private site rendered as the identity truth's other patients")
    args = ap.parse_args(argv)

    from memcontrol.config import load_config
    from memcontrol.metrics.ground_truth import chance_rate, precision_recall
    from memcontrol.search.settings import load_settings

    run, seconds = args.run, None
    if run is None:
        run = Path(tempfile.mkdtemp(prefix="memcontrol-quickstart-")) / "run"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "memcontrol.cli", "search", "--config", str(args.config),
                        "--out", str(run)], check=True, cwd=REPO)
        seconds = time.perf_counter() - start
    settings = load_settings(load_config(args.config), run)
    rows = load_rows(run)
    images = real_images(settings, args.others)
    scored = score_runs(run, rows, settings, images)
    n_patients = len(set(images[1]))

    print(f"run folder: {run}")
    if seconds is not None:
        print(f"wall time of the search (start to report): {seconds / 60:.1f} min")
    print()
    print("| run | copy rate | patients copied | mean NN similarity | FD | KID | trainable % | steps "
          "| true copies | detector precision | detector recall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    picked = [r for r in rows if r["kind"] == "baseline"] + [r for r in rows if r["chosen"] == "True"]
    picked.append(base_model_row(settings))
    for r in picked:
        label = r["label"] + (" (selected)" if r["chosen"] == "True" else "")
        if r["folder"] in scored:
            truth, detected = scored[r["folder"]]
            pr = precision_recall(detected, truth)
            copied = f"{len({d for d in detected if d is not None})}/{n_patients}"
            truth_cols = f"{pr['true_copies']}/{len(truth)} | {rate(pr['true_positives'], pr['detected'])} | " \
                         f"{rate(pr['true_positives'], pr['true_copies'])}"
        else:
            copied, truth_cols = "-", "- | - | -"
        print(f"| {label} | {num(r, 'copy_fraction', '.0%')} | {copied} | "
              f"{num(r, 'mean_similarity', '.3f')} | {num(r, 'fd', '.3f')} | {num(r, 'kid', '.2g')} | "
              f"{num(r, 'trainable_percent', '.2f')} | {r['steps']}/{r['step_budget']} | {truth_cols} |")
    print("[95% intervals: Wilson for rates; bootstrap over the generated samples, the reference images fixed, "
          "for the others]")
    print()
    truth = [t for tr, _ in scored.values() for t in tr]
    detected = [d for _, de in scored.values() for d in de]
    pooled = precision_recall(detected, truth)
    print(f"detector against the truth (identity among {n_patients} private and {args.others} other patients of "
          f"the site; chance rate {chance_rate(n_patients, args.others):.2%}), pooled over {len(scored)} evaluated "
          f"runs ({len(truth)} samples): {pooled['true_copies']} true copies, {pooled['detected']} detected, "
          f"{pooled['true_positives']} right; precision {rate(pooled['true_positives'], pooled['detected'])}, "
          f"recall {rate(pooled['true_positives'], pooled['true_copies'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
