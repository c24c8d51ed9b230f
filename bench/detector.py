"""The copy detector against the identity truth, on samples along full fine-tunes of the private cohort.

    python bench/detector.py --out runs/detector          # CPU: one run, checkpoints 350 and 500, two sampling seeds
    python bench/detector.py --out runs/detector --seeds 0 1 --checkpoints 300 400 500 --final-seeds 1 2

Positives and negatives come from where copies arise: full fine-tuning of the shipped base model on the bundled
private cohort with the quickstart's training settings (``--config``'s ``train`` section, at the full fine-tuning
baseline's learning rate), one sample per private patient's report (``sampling`` settings: sampler, steps, guidance)
at each of ``--checkpoints`` steps of each run (``--seeds``: training seed, also the sampling seed), at the last
checkpoint also with each of ``--final-seeds``, and the un-tuned base model's samples (step 0). Every sample set is
kept in ``--out`` (a rerun reads them back; ``--saved-only`` scores only those, e.g. a new detector, and never
fine-tunes), and so is each run's last UNet
(``unet-run{seed}-step{last}.safetensors``, for ``bench/hospital_gap.py --unet``). Two planted sets stand beside
them: each private patient's image through the model's VAE (encoded and decoded: what a model that reproduces its
training image exactly draws) and ``--planted`` held-out patients through the VAE (faithful images of patients it
never saw).

The truth (``memcontrol.metrics.ground_truth``): a sample copies private patient q when its nearest image in pixels,
among the private records and ``--others`` further patients of the private site rendered in memory, all passed
through the model's VAE (the image space the model draws in), is q's.

The detectors (``--detectors``, embedder specs): the nearest private record in their features (cosine), a copy
above tau; tau calibrated (``memcontrol.metrics.memorization.calibrate_tau``) at ``--fpr``, the share of
``--calibration`` further held-out patients of the private site (rendered, none of them among the truth's others)
whose nearest private record lies above it. Printed: each generated sample set's true copy rate (all reports,
the repeated patients' and the single-record patients' apart), tau, precision and recall with Wilson 95%
intervals per sample set, pooled over the generated sets (the headline) and over the planted ones apart, and the
time the measurements add to one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DETECTORS = ['{"type": "metric_net", "path": "data/metric_nets/copy_detector"}', '{"type": "vae"}']


def load_private(settings):
    from memcontrol.data import load_source
    from memcontrol.search.objectives import dataset_pixels

    dataset = load_source(settings.data["train"], settings.data["resolution"])
    return dataset, torch.cat(list(dataset_pixels(dataset)))


def rendered_patients(count: int, skip: int, resolution: int, channels: int) -> torch.Tensor:
    """Held-out patients ``skip`` .. ``skip + count`` of the private site, prepared as the private records are."""
    from memcontrol.data.cohorts import private_site_heldout
    from memcontrol.data.transforms import to_model_tensor

    images, _ = private_site_heldout(skip + count, resolution)
    return torch.stack([to_model_tensor(im, resolution, channels) for im in images[skip:]])


def patient_prompts(dataset) -> list[str]:
    """One report per private patient (a repeated patient's records share theirs): the prompts of a sample set."""
    first = {}
    for key, caption in zip(dataset.keys, dataset.captions):
        first.setdefault(key, caption)
    return list(first.values())


def checkpoint_samples(settings, pipe, dataset, seeds, checkpoints, final_seeds, out: Path, lr: float) -> dict:
    """{(run seed, step, sampling seed): samples}: step 0 is the base model; each checkpoint is sampled with the
    run's seed, the last one also with each of ``final_seeds``. Kept in ``out``: a rerun reads them back."""
    from safetensors.torch import load_file, save_file

    from memcontrol.masks import Mask
    from memcontrol.sampling import generate_samples
    from memcontrol.training import TrainConfig, cache_training_data, finetune, pipeline_with_unet

    prompts = patient_prompts(dataset)
    out.mkdir(parents=True, exist_ok=True)
    found = {}

    def take(seed, step, sample_seed, unet):
        path = out / f"samples-run{seed}-step{step}-seed{sample_seed}.safetensors"
        if path.is_file():
            found[(seed, step, sample_seed)] = load_file(str(path))["samples"]
            return
        t0 = time.perf_counter()
        s = settings.sampling
        samples = generate_samples(pipeline_with_unet(pipe, unet), prompts, steps=s["steps"], seed=sample_seed,
                                   guidance_scale=s["guidance_scale"], sampler=s["sampler"])
        save_file({"samples": samples.contiguous()}, str(path))
        found[(seed, step, sample_seed)] = samples
        print(f"run {seed}, step {step}, sampling seed {sample_seed}: {len(samples)} samples "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    take(seeds[0], 0, seeds[0], pipe.unet)
    for seed in seeds:
        wanted = {(step, seed) for step in checkpoints} | {(checkpoints[-1], s) for s in final_seeds}
        paths = [out / f"samples-run{seed}-step{step}-seed{s}.safetensors" for step, s in wanted]
        if all(p.is_file() for p in paths):
            for step, s in wanted:
                take(seed, step, s, None)
            continue

        def at_checkpoint(step, unet, seed=seed):
            if step in checkpoints:
                for s in sorted({seed} | (set(final_seeds) if step == checkpoints[-1] else set())):
                    take(seed, step, s, unet)
            if step == checkpoints[-1]:  # bench/hospital_gap.py --unet measures its quality without retraining
                save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
                          str(out / f"unet-run{seed}-step{step}.safetensors"))
            return None

        cfg = TrainConfig.from_dict({**settings.train, "lr": lr, "seed": seed, "steps": checkpoints[-1]})
        torch.manual_seed(seed)
        cached = cache_training_data(pipe, dataset, cache_dir=None, progress=False)
        result = finetune(pipe, Mask.full_unet(pipe.unet), cached, cfg, callback=at_checkpoint,
                          callback_every=_gcd(checkpoints))
        if result.status != "ok":
            raise RuntimeError(f"full fine-tuning with seed {seed} ended {result.status}: {result.reason}")
        print(f"run {seed}: {result.steps} steps in {result.seconds:.0f} s", flush=True)
    return found


def sample_paths(out: Path, seeds, checkpoints, final_seeds) -> list[Path]:
    """The sample set files a run of these seeds and checkpoints keeps in ``out`` (base model's included)."""
    wanted = {(seeds[0], 0, seeds[0])} | {(seed, step, seed) for seed in seeds for step in checkpoints}
    wanted |= {(seed, checkpoints[-1], s) for seed in seeds for s in final_seeds}
    return [out / f"samples-run{seed}-step{step}-seed{s}.safetensors" for seed, step, s in sorted(wanted)]


def _gcd(values) -> int:
    import math

    out = 0
    for v in values:
        out = math.gcd(out, int(v))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "quickstart.yaml")
    ap.add_argument("--out", type=Path, required=True, help="folder for the samples (kept: a rerun reads them)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="full fine-tuning runs (training seeds)")
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[350, 500])
    ap.add_argument("--final-seeds", type=int, nargs="*", default=[1],
                    help="further sampling seeds at the last checkpoint")
    ap.add_argument("--others", type=int, default=4000, help="other patients of the private site for the truth")
    ap.add_argument("--calibration", type=int, default=1000, help="held-out patients that calibrate tau")
    ap.add_argument("--fpr", type=float, default=0.01, help="false-positive rate at which tau is calibrated")
    ap.add_argument("--planted", type=int, default=256,
                    help="held-out patients through the VAE, planted beside the private records through the VAE")
    ap.add_argument("--detectors", nargs="+", default=DETECTORS, help="embedder specs (JSON)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--saved-only", action="store_true",
                    help="score the sample sets already in --out (e.g. with a new --detectors spec) and never "
                         "fine-tune: a missing one is an error")
    args = ap.parse_args(argv)
    if args.saved_only:
        missing = [p.name for p in sample_paths(args.out, args.seeds, sorted(args.checkpoints), args.final_seeds)
                   if not p.is_file()]
        if missing:
            ap.error(f"--saved-only: {args.out} lacks {', '.join(missing)} (run without --saved-only to make them)")

    from memcontrol.config import feature_spec, load_config
    from memcontrol.metrics import build_embedder
    from memcontrol.metrics.ground_truth import chance_rate, precision_recall, through_vae, true_copies
    from memcontrol.metrics.intervals import wilson
    from memcontrol.metrics.memorization import calibrate_tau, copy_detection
    from memcontrol.models import load_pipeline
    from memcontrol.search.settings import load_settings

    torch.manual_seed(0)
    cfg = load_config(args.config)
    settings = load_settings(cfg, args.out)
    pipe = load_pipeline(settings.model["path"], device="cpu", option="model.path")
    dataset, private = load_private(settings)
    keys, resolution, channels = list(dataset.keys), settings.data["resolution"], private.shape[1]
    lr = float((settings.baselines.get("lr") or {}).get("full_ft", settings.train["lr"]))
    print(f"full fine-tuning at lr {lr:g}, {settings.train['batch_size']} per batch, {settings.train['schedule']} "
          f"schedule; checkpoints {sorted(args.checkpoints)}; seeds {args.seeds}", flush=True)
    generated = checkpoint_samples(settings, pipe, dataset, args.seeds, sorted(args.checkpoints), args.final_seeds,
                                   args.out, lr)
    samples = {f"run {seed}, step {step}, sampling seed {s}": v for (seed, step, s), v in sorted(generated.items())}

    t0 = time.perf_counter()
    others = rendered_patients(args.others, 0, resolution, channels)
    calibration = rendered_patients(args.calibration, args.others, resolution, channels)
    render_seconds = time.perf_counter() - t0
    # The truth compares in the image space the model draws in: every reference through its VAE (the base VAE,
    # trained on public films, reconstructs a private-site film with an error larger than the distance between two
    # patients, so raw pixels would tell no sample's patient).
    private_drawn, others_drawn = through_vae(pipe.vae, private), through_vae(pipe.vae, others)
    first = sorted({k: i for i, k in reversed(list(enumerate(keys)))}.values())  # one record per patient
    samples["planted: each private patient through the VAE"] = private_drawn[first]
    samples["planted: held-out patients through the VAE"] = through_vae(
        pipe.vae, rendered_patients(args.planted, args.others + args.calibration, resolution, channels))
    t0 = time.perf_counter()
    truth = {k: true_copies(v, private_drawn, keys, others_drawn) for k, v in samples.items()}
    truth_seconds = (time.perf_counter() - t0) / len(samples)
    n_patients = len(set(keys))
    print(f"\nprivate cohort: {len(keys)} records of {n_patients} patients; truth among {args.others} other patients "
          f"of the site (chance rate {chance_rate(n_patients, args.others):.2%}); {len(generated)} generated sample "
          f"sets of {n_patients} (one per patient's report), and two planted sets")
    figures = {"samples": {k: len(v) for k, v in samples.items()}, "detectors": {}, "copy_rates": {}}
    # How much each model copies, by the truth alone: a sample is a copy when its nearest image is a private
    # patient's (any one); the repeated patients' reports and the single-record patients' reports apart.
    prompt_keys = list(dict.fromkeys(keys))
    repeated = [keys.count(k) > 1 for k in prompt_keys]
    print("\n| sample set | true copies: all | repeated patients' reports | single-record patients' reports |")
    print("|---|---|---|---|")
    for label, found in truth.items():
        if label.startswith("planted"):
            continue
        parts = {part: [t is not None for t, r in zip(found, repeated) if r in wanted]
                 for part, wanted in (("all", (True, False)), ("repeated", (True,)), ("single", (False,)))}
        rates = {part: wilson(sum(flags), len(flags)) for part, flags in parts.items()}
        figures["copy_rates"][label] = {k: v for part, ci in rates.items() for k, v in ci.fields(part).items()}
        print(f"| {label} | " + " | ".join(f"{sum(parts[p])}/{len(parts[p])}, {rates[p]}" for p in rates) + " |")
    for spec_text in args.detectors:
        spec = feature_spec(json.loads(spec_text), REPO)
        embedder = build_embedder(spec, pipe=pipe)
        t0 = time.perf_counter()
        train_feats = embedder.embed(private)
        tau, held_sims = calibrate_tau(embedder.embed(calibration), train_feats, args.fpr)
        calibrate_seconds = time.perf_counter() - t0
        print(f"\n[{embedder.name}] tau {tau:.4f}: {int((held_sims > tau).sum())} of {len(held_sims)} held-out "
              f"patients above it (calibrated at false-positive rate {args.fpr:g}; "
              f"{calibrate_seconds:.1f} s for the training and calibration features)")
        print("| sample set | samples | true copies (rate, 95% CI) | detected | right | precision (95% CI) | "
              "recall (95% CI) |")
        print("|---|---|---|---|---|---|---|")
        pooled = {"generated": ([], []), "planted": ([], [])}
        embed_seconds = 0.0
        for label, images in samples.items():
            t0 = time.perf_counter()
            result = copy_detection(embedder.embed(images), train_feats, keys, tau=tau)
            embed_seconds += time.perf_counter() - t0
            detected = [k if c else None for k, c in zip(result["samples"]["nn_key"], result["samples"]["is_copy"])]
            pr = precision_recall(detected, truth[label])
            pooled_detected, pooled_truth = pooled["planted" if label.startswith("planted") else "generated"]
            pooled_truth += truth[label]
            pooled_detected += detected
            print(f"| {label} | {len(images)} | {pr['true_copies']} ({wilson(pr['true_copies'], len(images))}) | "
                  f"{pr['detected']} | {pr['true_positives']} | "
                  f"{wilson(pr['true_positives'], pr['detected'])} | "
                  f"{wilson(pr['true_positives'], pr['true_copies'])} |")
        figures["detectors"][embedder.name] = {"tau": tau, "fpr": args.fpr, "calibration_patients": len(held_sims),
                                               "seconds_per_run": embed_seconds / len(samples),
                                               "calibration_seconds": calibrate_seconds}
        # The headline pools the fine-tunes' own samples (and the base model's): copies that training made. The
        # planted sets (images through the VAE) are reported apart, since they are not what a model draws.
        for part, (pooled_detected, pooled_truth) in pooled.items():
            pr = precision_recall(pooled_detected, pooled_truth)
            precision, recall = wilson(pr["true_positives"], pr["detected"]), wilson(pr["true_positives"],
                                                                                    pr["true_copies"])
            print(f"pooled over the {part} sample sets ({len(pooled_truth)} samples): {pr['true_copies']} true "
                  f"copies, {pr['detected']} detected, {pr['true_positives']} right; precision {precision}, "
                  f"recall {recall} (Wilson 95%)")
            figures["detectors"][embedder.name][part] = {
                **pr, "precision_ci": [precision.low, precision.high], "recall_ci": [recall.low, recall.high]}
        print(f"time this detector adds to one run: {embed_seconds / len(samples):.2f} s to embed and match "
              f"a sample set; once per study: {calibrate_seconds:.1f} s to embed the private records and the "
              f"calibration patients")
    print(f"\ntruth: {render_seconds:.0f} s to render {args.others + args.calibration} patients of the site once, "
          f"{truth_seconds:.2f} s per sample set to find each sample's nearest patient")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
