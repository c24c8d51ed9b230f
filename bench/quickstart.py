"""The main job, timed, with its claim and the detector checked against the truth.

    python bench/quickstart.py                                  # runs configs/quickstart.yaml into a temporary folder
    python bench/quickstart.py --run runs/quickstart            # only reads a finished run (of --config)
    python bench/quickstart.py --config configs/paper.yaml --run runs/paper     # the headline table

Prints the wall time, then the claim (``memcontrol.search.claim``, also written by the search to OUT/claim.md): every
run's copy rate (share of memorization samples above the config's tau, Wilson 95%) and quality (FD to the held-out
reference, bootstrap 95% over generated samples); the share of the base model's quality gap full fine-tuning closes
(the floor: as many further real patients of the private site, rendered in memory, never in the reference); the
quality gain the chosen candidate recovers, (Q_base - Q_chosen) / (Q_base - Q_full), from its re-evaluation on fresh
seeds; the copy rate it cuts; and the verdict against every other row (controls, baselines, published mitigations).

Then the detector against the truth. Every phantom patient's anatomy comes from its seed, so whether a sample truly
copies a private patient is known from identity (``memcontrol.metrics.ground_truth``): its nearest image in pixels,
among the private patients and ``--others`` further patients of the private site rendered in memory, all through
the model's VAE, is that patient's. The detector (nearest private patient in the config's features, above tau) is
right when it names that patient. Precision and recall are given per run and pooled over every evaluated run of the
study (with Wilson 95% intervals). Beside them, for the detections the truth calls right and those it calls wrong, how
far each detected sample is from the detected patient once its global brightness and contrast are fitted (the affine
residual): a wrong detection as close as the right ones is a copy at another exposure, which pixel L2 does not
forgive, rather than a detector's mistake. Last, for the right and the wrong detections apart, how many
name the patient whose report prompted the sample, and the patients named most.
"""

from __future__ import annotations

import argparse
import collections
import csv
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def load_rows(run: Path) -> list[dict]:
    """Every run of the study: trials.csv (baselines, base model, trials), then controls.csv (the re-evaluation and
    the controls), each folder once."""
    rows, seen = [], set()
    for name in ("trials.csv", "controls.csv"):
        if (run / name).is_file():
            with open(run / name, newline="", encoding="utf-8") as fh:
                for r in csv.DictReader(fh):
                    if r["folder"] not in seen:
                        seen.add(r["folder"])
                        rows.append(r)
    return rows


def evaluated_runs(run: Path, rows: list[dict] | None = None):
    """(row, folder) of every run the search measured to the end, its detector's neighbours kept (neighbours.json);
    ``rows`` default to the study's (``load_rows``)."""
    for r in load_rows(run) if rows is None else rows:
        folder = run / r["folder"]
        if r["state"] == "complete" and (folder / "neighbours.json").is_file():
            yield r, folder


def real_images(settings, others: int):
    """Private images with their patient keys at the run's resolution, and ``others`` patients of the private site
    rendered in memory (the identity truth's other patients), all through the model's VAE."""
    import torch

    from memcontrol.data import load_source, run_salt
    from memcontrol.metrics.ground_truth import through_vae
    from memcontrol.models import load_pipeline
    from memcontrol.search.objectives import dataset_pixels

    resolution = settings.data["resolution"]
    dataset = load_source(settings.data["train"], resolution, salt=run_salt(settings.out_dir))
    private = torch.cat(list(dataset_pixels(dataset)))
    # Compared as the model draws them (ground_truth.through_vae): its VAE cannot draw a private-site film closer
    # than two patients lie apart.
    vae = load_pipeline(settings.model["path"], option="model.path").vae
    return (through_vae(vae, private), dataset.keys,
            other_patients(Path(settings.model["path"]), others, resolution, private.shape[1]))


@functools.lru_cache(maxsize=4)
def _other_patients(model: Path, count: int, resolution: int, channels: int):
    import torch

    from memcontrol.data.cohorts import private_site_heldout
    from memcontrol.data.transforms import to_model_tensor
    from memcontrol.metrics.ground_truth import through_vae
    from memcontrol.models import load_pipeline

    rendered, _ = private_site_heldout(count, resolution)
    vae = load_pipeline(model, option="model.path").vae
    return through_vae(vae, torch.stack([to_model_tensor(im, resolution, channels) for im in rendered]))


def other_patients(model: Path, count: int, resolution: int, channels: int):
    """The identity truth's other patients: ``count`` patients of the private site rendered in memory, through the VAE
    of the diffusers folder ``model``. Rendered once per process (4,000 take about a minute) however many studies a
    bench scores against them; callers only read the tensor."""
    return _other_patients(Path(model).resolve(), count, resolution, channels)


def prompt_patients(settings, run: Path) -> list[str]:
    """The patient of each memorization prompt, in the order the search draws them: its samples are prompt-major, so
    sample i came from prompt i // per_prompt (each distinct training report once, spread as the search does)."""
    from memcontrol.data import load_source, run_salt
    from memcontrol.search.context import spread

    dataset = load_source(settings.data["train"], settings.data["resolution"], salt=run_salt(run))
    first = {}
    for key, caption in zip(dataset.keys, dataset.captions):
        first.setdefault(caption, key)
    return [first[c] for c in spread(list(first), settings.sampling["prompts"])]


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


def affine_residual(sample, reference) -> float:
    """RMS difference left once a gain and an offset are fitted to ``reference`` by least squares: how far a sample
    is from a patient's image whatever its global brightness and contrast (the truth's pixel L2 fits neither)."""
    import torch

    x, y = sample.flatten().double(), reference.flatten().double()
    design = torch.stack([y, torch.ones_like(y)], 1)
    fit = torch.linalg.lstsq(design, x[:, None]).solution[:, 0]
    return float((x - design @ fit).square().mean().sqrt())


def score_runs(run: Path, rows: list[dict], settings, images) -> dict:
    """Truth and detector for every evaluated run: {folder: (truth, detected, residual)}, ``residual`` the affine
    residual of each detected sample to the detected patient's first record (None where nothing was detected)."""
    from memcontrol.metrics.ground_truth import true_copies

    private, keys, others = images
    channels = private.shape[1]
    tau = float(settings.objectives["memorization"]["tau"])
    scored = {}
    for r, folder in evaluated_runs(run, rows):
        samples, detected = run_samples(folder)[:, :channels], detections(folder, tau)
        residual = [None if d is None else affine_residual(x, private[keys.index(d)]) for x, d in zip(samples, detected)]
        scored[r["folder"]] = (true_copies(samples, private, keys, others), detected, residual)
    return scored


def residual_summary(values: list) -> str:
    import numpy as np

    if not values:
        return "-"
    q = np.percentile(values, [0, 50, 100])
    return f"{q[1]:.3f} ({q[0]:.3f}-{q[2]:.3f}, {len(values)})"


def floor_features(settings, n: int):
    """Quality features of ``n`` real patients of the private site that are in no cohort on disk (rendered from
    their seeds): what a model drawing the site perfectly would score with as many samples."""
    import torch

    from memcontrol.data.cohorts import private_site_heldout
    from memcontrol.data.transforms import to_model_tensor
    from memcontrol.metrics import build_embedder
    from memcontrol.models import load_pipeline

    spec = settings.objectives["quality"]["features"]
    pipe = load_pipeline(settings.model["path"], option="model.path")
    resolution = settings.data["resolution"]
    rendered, _ = private_site_heldout(n, resolution)
    images = torch.stack([to_model_tensor(im, resolution, 3) for im in rendered])
    return build_embedder(spec, pipe=pipe).embed(images).double().numpy()


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
    ap.add_argument("--json", type=Path, default=None, help="also write the claim's figures here")
    args = ap.parse_args(argv)

    from memcontrol.config import load_config
    from memcontrol.metrics.ground_truth import chance_rate, precision_recall
    from memcontrol.search.claim import compute, load_reference
    from memcontrol.search.objectives import quality_name
    from memcontrol.search.results import collect
    from memcontrol.search.run import open_search_storage
    from memcontrol.search.settings import load_settings

    run, seconds = args.run, None
    if run is None:
        run = Path(tempfile.mkdtemp(prefix="memcontrol-quickstart-")) / "run"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "memcontrol.cli", "search", "--config", str(args.config),
                        "--out", str(run)], check=True, cwd=REPO)
        seconds = time.perf_counter() - start
    settings = load_settings(load_config(args.config), run)
    results = collect(settings, open_search_storage(settings))
    reference = load_reference(run)
    if reference is None:
        raise SystemExit(f"{run}: no quality_reference.safetensors (a run made before the claim's figures were kept)")
    n_quality = settings.sampling["quality_prompts"] * settings.sampling["per_prompt"]
    claim = compute(results, settings, reference, floor_features(settings, n_quality))

    print(f"run folder: {run}")
    if seconds is not None:
        print(f"wall time of the search (start to report): {seconds / 60:.1f} min")
    print()
    print(claim.to_markdown(quality_name(settings)))
    if args.json:
        args.json.write_text(json.dumps(claim.to_dict(), indent=1) + "\n")

    rows = load_rows(run)
    images = real_images(settings, args.others)
    scored = score_runs(run, rows, settings, images)
    n_patients = len(set(images[1]))
    print()
    print("| run | true copies | detector precision | detector recall | affine residual: right detections | "
          "wrong detections |")
    print("|---|---|---|---|---|---|")
    right_all, wrong_all = [], []
    for r in rows:
        if r["folder"] not in scored:
            continue
        truth, detected, residual = scored[r["folder"]]
        pr = precision_recall(detected, truth)
        right = [e for t, d, e in zip(truth, detected, residual) if d is not None and d == t]
        wrong = [e for t, d, e in zip(truth, detected, residual) if d is not None and d != t]
        right_all += right
        wrong_all += wrong
        print(f"| {r['label']} | {pr['true_copies']}/{len(truth)} | {rate(pr['true_positives'], pr['detected'])} | "
              f"{rate(pr['true_positives'], pr['true_copies'])} | {residual_summary(right)} | "
              f"{residual_summary(wrong)} |")
    print("affine residual: RMS difference (images in [-1, 1]) between a detected sample and the detected patient's "
          "image once a gain and an offset are fitted; median (range, count)")
    print(f"all runs: right detections {residual_summary(right_all)}, wrong detections {residual_summary(wrong_all)}")
    truth = [t for tr, _, _ in scored.values() for t in tr]
    detected = [d for _, de, _ in scored.values() for d in de]
    pooled = precision_recall(detected, truth)
    print(f"detector against the truth (identity among {n_patients} private and {args.others} other patients of "
          f"the site; chance rate {chance_rate(n_patients, args.others):.2%}), pooled over {len(scored)} evaluated "
          f"runs ({len(truth)} samples): {pooled['true_copies']} true copies, {pooled['detected']} detected, "
          f"{pooled['true_positives']} right; precision {rate(pooled['true_positives'], pooled['detected'])}, "
          f"recall {rate(pooled['true_positives'], pooled['true_copies'])}")
    # Whom a detection names, against the report that prompted the sample: a wrong detection of the prompt's own
    # patient, or of one patient whatever the prompt, is a model drawing that patient, which the truth's pixel L2
    # may not count (other devices or exposure than the record's), not a false alarm on a stranger.
    owners, per_prompt = prompt_patients(settings, run), settings.sampling["per_prompt"]
    named = {True: collections.Counter(), False: collections.Counter()}
    own = {True: 0, False: 0}
    for truth, detected, _ in scored.values():
        for i, (t, d) in enumerate(zip(truth, detected)):
            if d is not None:
                named[d == t][d] += 1
                own[d == t] += i // per_prompt < len(owners) and d == owners[i // per_prompt]
    for right in (True, False):
        print(f"{'right' if right else 'wrong'} detections: {own[right]} of {sum(named[right].values())} name the "
              f"patient whose report prompted the sample; the patients named most: "
              + (", ".join(f"{k} x{n}" for k, n in named[right].most_common(3)) or "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
