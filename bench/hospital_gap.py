"""Is the private site something to learn? Quality of the base model and of a full fine-tune at the private site.

    python bench/hospital_gap.py                                # 256 samples per model, 512 reference patients
    python bench/hospital_gap.py --samples 64 --reference 128 --steps 100   # a quick look, not the figure
    python bench/hospital_gap.py --features '{"type": "torchscript", "path": "my_net.pt"}'

The base model (`data/base_model`, pretrained on the public site only) and a full fine-tune of it on the private
cohort (`data/hospital/private`, with the quickstart's training settings from `configs/quickstart.yaml`: its
`train` section and the full fine-tuning baseline's learning rate) each generate one sample per held-out report of
the private site (patients rendered in memory, `memcontrol.data.cohorts.private_site_heldout`), with the
quickstart's sampler. Both are compared with the images of `--reference` further held-out private-site patients:
FD and KID (unbiased MMD^2 with the cubic kernel, on all samples at once), each with a bootstrap 95% interval over
generated samples (the reference held fixed). Two rows of real images frame the numbers: private-site patients not
in the reference (the floor a perfect model would reach with this many samples) and public-site patients (what the
base model was taught). "Gap closed" is (base - fine-tuned) / (base - floor), with a paired interval: sample i of
both models comes from the same report and the same starting noise.

Features (`--features`, repeatable): by default the config's quality features (`objectives.quality.features`: the
hospital's domain network, 64 dimensions), then `vae-pooled64`, the base model's VAE latent means average-pooled to
4 x 4 x 4 = 64 dimensions and not normalised (frozen during fine-tuning, so both models are measured in the same
space). Both have far fewer dimensions than samples, as the Frechet distance needs. Any embedder spec of
`memcontrol.metrics` may be given instead.

Then the memorization check with the quickstart's own detector: samples from the training reports (every private
patient's report, `--per-patient` samples each), copy = cosine similarity, in the config's memorization features
(`objectives.memorization.features`), to the nearest private patient above the config's tau (calibrated in those
same features), and that patient is the prompt's own; the copy rate with its Wilson 95% interval, for the repeated
subset and the other patients apart. The identity truth and the detector's precision and recall are
`bench/detector.py`'s.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memcontrol.metrics.intervals import bootstrap_indices, interval, paired, wilson  # noqa: E402
from memcontrol.metrics.intervals import resampled_frechet as fd_statistic  # noqa: E402
from memcontrol.metrics.intervals import resampled_mmd2 as mmd_statistic  # noqa: E402
from memcontrol.metrics.quality import distance_name, gaussian_stats  # noqa: E402


def as_model_images(gray: np.ndarray) -> torch.Tensor:
    """N x H x W in [0, 1] -> N x 3 x H x W in [-1, 1], as the pipeline's samples are."""
    return torch.from_numpy(gray).float().mul(2).sub(1).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def vae_pooled(vae, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    """The VAE's latent means average-pooled to 4 x 4 per channel: 64 unnormalised dimensions (4 channels)."""
    out = [torch.nn.functional.adaptive_avg_pool2d(vae.encode(images[i:i + batch]).latent_dist.mean, 4).flatten(1)
           for i in range(0, len(images), batch)]
    return torch.cat(out).double().numpy()


def full_finetune(pipe, job, steps: int | None):
    """Full fine-tuning as the quickstart's baseline trains (``job``: the config, ``memcontrol.config.read_config``)."""
    from memcontrol.data import ImageCaptionDataset
    from memcontrol.masks import Mask
    from memcontrol.training import TrainConfig, cache_training_data, finetune

    dataset = ImageCaptionDataset(REPO / "data" / "hospital" / "private" / "manifest.csv", resolution=64)
    cached = cache_training_data(pipe, dataset, None, progress=False)
    train = {**job.train.model_dump(), "lr": job.baselines.lr.full_ft}
    if steps is not None:
        train["steps"] = steps
    cfg = TrainConfig.from_dict(train)
    start = time.perf_counter()
    result = finetune(pipe, Mask.full_unet(pipe.unet), cached, cfg, progress=True)
    if result.status != "ok":
        raise SystemExit(f"full fine-tuning {result.status}: {result.reason}")
    print(f"full fine-tune: {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr:g} ({cfg.schedule}), "
          f"{time.perf_counter() - start:.0f} s, final loss {result.final_loss:.4f}", flush=True)
    return result.applied.unet.eval(), dataset


def _feature_spec(text: str):
    return text if text == "vae-pooled64" else json.loads(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "quickstart.yaml")
    ap.add_argument("--samples", type=int, default=256, help="held-out reports to sample from (one sample each)")
    ap.add_argument("--reference", type=int, default=512, help="held-out private-site patients to compare with")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the config's)")
    ap.add_argument("--unet", type=Path, default=None,
                    help="a full fine-tune's UNet weights (safetensors, e.g. bench/detector.py's "
                         "unet-run0-step500.safetensors) instead of fine-tuning here")
    ap.add_argument("--features", type=_feature_spec, action="append", default=None,
                    help="embedder spec (JSON) for FD/KID, or vae-pooled64; repeatable; default: the config's "
                         "quality features, then vae-pooled64")
    ap.add_argument("--per-patient", type=int, default=2, help="memorization samples per private patient's report")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    from memcontrol.config import read_config
    from memcontrol.data import ImageCaptionDataset, patient_seeds, render_phantoms
    from memcontrol.data.cohorts import SEEDS, private_site_heldout
    from memcontrol.metrics import build_embedder
    from memcontrol.metrics.memorization import copy_detection
    from memcontrol.models import load_pipeline
    from memcontrol.sampling import generate_samples
    from memcontrol.training import pipeline_with_unet

    torch.manual_seed(0)
    job = read_config(args.config)
    pipe = load_pipeline(job.model.path)
    sampling = {k: getattr(job.sampling, k) for k in ("steps", "sampler", "guidance_scale")}
    started = time.perf_counter()
    # One render: the first `samples` patients give the prompts and the floor row; the reference follows them.
    held, held_reports = private_site_heldout(args.samples + args.reference)
    prompts, floor_images, reference_images = held_reports[:args.samples], held[:args.samples], held[args.samples:]
    public_images, _ = render_phantoms(patient_seeds(SEEDS["public_chest"], args.samples), 64)

    if args.unet is None:
        unet, train_set = full_finetune(pipe, job, args.steps)
    else:  # a full fine-tune already made (bench/detector.py keeps its last one), of this base model
        from safetensors.torch import load_file

        unet = copy.deepcopy(pipe.unet)
        unet.load_state_dict(load_file(str(args.unet)))
        unet.eval()
        train_set = ImageCaptionDataset(REPO / "data" / "hospital" / "private" / "manifest.csv", resolution=64)
        print(f"full fine-tune: read from {args.unet}", flush=True)
    tuned = pipeline_with_unet(pipe, unet)
    generated = {}
    for name, model in (("base model", pipe), ("full fine-tune", tuned)):
        t0 = time.perf_counter()
        generated[name] = generate_samples(model, prompts, 1, seed=0, **sampling)
        print(f"{name}: {len(prompts)} samples in {time.perf_counter() - t0:.0f} s", flush=True)

    indices = bootstrap_indices(args.samples, args.resamples, seed=0)
    base, tuned_name, floor = "base model", "full fine-tune", "real private-site patients (floor)"
    figures = {"samples": args.samples, "reference": args.reference, "quality": {}}
    images = {**generated, floor: as_model_images(floor_images),
              "real public-site patients": as_model_images(public_images)}
    for spec in args.features or [job.objectives.quality.features.model_dump(exclude_none=True), "vae-pooled64"]:
        if spec == "vae-pooled64":
            feature_name = "vae-pooled64"
            embed = lambda x: vae_pooled(pipe.vae, x)  # noqa: E731
        else:
            embedder = build_embedder(spec, pipe)
            feature_name = embedder.name
            embed = lambda x, embedder=embedder: embedder.embed(x).double().numpy()  # noqa: E731
        reference = embed(as_model_images(reference_images))
        reference_stats = gaussian_stats(reference)
        rows = {k: embed(v) for k, v in images.items()}
        fd = {k: fd_statistic(v, reference_stats) for k, v in rows.items()}
        table = figures["quality"][feature_name] = {"dims": int(reference.shape[1]), "rows": {}}
        print(f"\nquality at the private site, features {feature_name} ({reference.shape[1]} dims), {args.samples} "
              f"samples vs {args.reference} held-out patients; 95% bootstrap intervals over samples")
        print(f"{'':38s} {distance_name(feature_name):>28s} {'KID (MMD^2)':>34s}")
        for name, features in rows.items():
            fd_ci = interval(fd[name], indices)
            kid_ci = interval(mmd_statistic(features, reference), indices)
            table["rows"][name] = {**fd_ci.fields("fd"), **kid_ci.fields("kid")}
            print(f"{name:38s} {str(fd_ci):>28s} {str(kid_ci):>34s}")
        gap = paired(fd[base], fd[tuned_name], indices)
        closed = paired(lambda i: fd[base](i) - fd[tuned_name](i), lambda i: fd[base](i) - fd[floor](i), indices,
                        combine=np.divide)
        table.update({**gap.fields("fd_gain"), **closed.fields("gap_closed")})
        print(f"FD base - fine-tuned: {gap}; share of the gap to the floor closed by full fine-tuning: {closed}")

    # Memorization, with the quickstart's own detector: its features (cosine), nearest private patient, and the tau
    # calibrated in those features (a tau means nothing in another feature space).
    tau = job.objectives.memorization.tau
    detector = build_embedder(job.objectives.memorization.features.model_dump(exclude_none=True), pipe)
    first = {}
    for i, key in enumerate(train_set.keys):
        first.setdefault(key, i)
    keys = list(first)
    private = torch.stack([train_set[first[k]]["pixel_values"] for k in keys])
    records = {k: train_set.keys.count(k) for k in keys}
    private_features = detector.embed(private)
    captions = [train_set.captions[first[k]] for k in keys]
    heldout = ImageCaptionDataset(REPO / "data" / "hospital" / "heldout" / "manifest.csv", resolution=64)
    held_real = detector.embed(torch.stack([heldout[i]["pixel_values"] for i in range(len(heldout))]))
    nearest = copy_detection(held_real, private_features, keys, tau)
    # The audit's `tau: heldout`: the highest similarity any real held-out patient has to a private one, fixed on
    # data apart from the samples it then judges.
    taus = {f"config tau {tau}": tau, f"held-out tau {nearest['max']:.4f}": nearest["max"]}
    figures["memorization"] = {"features": detector.name, "taus": taus,
                               "heldout_real_above_config_tau": [nearest["copies"], nearest["n"]]}
    print(f"\nreal held-out patients (data/hospital/heldout) above the config's tau {tau}: {nearest['copies']} of "
          f"{nearest['n']} (highest similarity {nearest['max']:.4f})")
    print(f"copies of the prompt's own patient (the quickstart's detector: {detector.name} features, cosine above "
          f"tau), {args.per_patient} sample(s) per private patient's report; Wilson 95% intervals")
    for name, model in (("base model", pipe), ("full fine-tune", tuned)):
        samples = generate_samples(model, captions, args.per_patient, seed=1, **sampling)
        found = copy_detection(detector.embed(samples), private_features, keys)["samples"]
        prompt_key = [keys[i // args.per_patient] for i in range(len(samples))]
        repeated = np.array([records[k] > 1 for k in prompt_key])
        for label, threshold in taus.items():
            own = np.array([nn == k and sim > threshold
                            for k, nn, sim in zip(prompt_key, found["nn_key"], found["similarity"])])
            parts = {"all": own, "repeated": own[repeated], "single-record": own[~repeated]}
            cis = {part: wilson(int(flags.sum()), len(flags)) for part, flags in parts.items()}
            figures["memorization"][f"{name}, {label}"] = {k: v for part, ci in cis.items()
                                                           for k, v in ci.fields(part).items()}
            print(f"{name:16s} {label:22s} " + "; ".join(f"{part}: {ci} (n={len(parts[part])})"
                                                         for part, ci in cis.items()))
    figures["seconds"] = time.perf_counter() - started
    print(f"\ntotal {figures['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
