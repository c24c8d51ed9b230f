"""The copy detector's false-positive rate on samples of a model that never saw the private patients: a shadow model.

    python bench/shadow.py --out runs/shadow                                        # configs/paper.yaml's settings
    python bench/shadow.py --out runs/shadow --study runs/paper configs/paper.yaml  # and a study rescored

tau (``objectives.memorization.tau``) is calibrated on real held-out patients of the private site: the similarity that
1% of them exceed to their nearest private record in the copy detector's features. Generated samples are not real
patients: a fine-tuned model draws the site's look, its devices and reports, and the detector may place such samples
nearer to the private records than real strangers come. The *shadow model* measures that, as membership-inference
audits do: fine-tuning exactly as one of the config's baseline rows (``--baseline``: ``full_ft`` by default,
``lora_attention`` or ``bitfit_norm``, the low-capacity rows whose samples are blurrier; train settings, the row's
learning rate, seed 0) on a shadow cohort built like the private one (8 private-site patients of another seed,
``--shadow-seed``, 4 of them repeated with 8 records each) that shares no patient with it; or ``--baseline base``,
the untuned model itself (give it other ``--sampling-seeds`` than a study's to keep its samples apart from the
study's base-model row). Its samples from the
*private* training reports (``--sampling-seeds`` x the config's ``prompts`` reports, as the search picks them, x
``per_prompt``) copy no private patient by construction. Printed:

- how many of them the identity truth (``memcontrol.metrics.ground_truth``; 4,000 others) calls copies (should be
  none: a check of the truth on realistic generated non-copies);
- the share of them above the config's tau (the detector's false-positive rate on generated non-copies, Wilson 95%),
  and the tau that ``--fpr`` of them exceed (the tau a shadow calibration would set);
- with ``--study DIR CONFIG`` (repeatable), that study's detections at both taus against the identity truth, pooled
  over its evaluated runs: precision and recall with Wilson 95% intervals.

The shadow samples are kept in ``--out`` (a rerun reads them back and trains nothing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402


def shadow_samples(settings, pipe, private, out: Path, shadow_seed: int, sampling_seeds: list[int],
                   baseline: str) -> torch.Tensor:
    """Samples of the shadow model from the private cohort's reports (trained and drawn once, then read back)."""
    from safetensors.torch import load_file, save_file

    from memcontrol.sampling import generate_samples
    from memcontrol.search.context import spread
    from memcontrol.training import pipeline_with_unet

    path = out / f"shadow_samples_{baseline}.safetensors"
    if path.is_file():
        return load_file(str(path))["samples"]
    if baseline == "base":  # the untuned model: it never saw any patient of the private site
        shadow_pipe = pipeline_with_unet(pipe, pipe.unet)
    else:
        shadow_pipe = pipeline_with_unet(pipe, _trained(settings, pipe, out, shadow_seed, baseline))
    prompts = spread(list(dict.fromkeys(private.captions)), settings.sampling["prompts"])  # as the search picks them
    s = settings.sampling
    samples = torch.cat([generate_samples(shadow_pipe, prompts, n_per_prompt=s["per_prompt"], steps=s["steps"],
                                          seed=seed, guidance_scale=s["guidance_scale"], sampler=s["sampler"])
                         for seed in sampling_seeds])
    save_file({"samples": samples.contiguous()}, str(path))
    return samples


def _trained(settings, pipe, out: Path, shadow_seed: int, baseline: str):
    """The UNet fine-tuned as ``baseline`` on the shadow cohort (its DICOM files written to ``out``)."""
    from memcontrol.data import load_source
    from memcontrol.data.cohorts import PRIVATE
    from memcontrol.data.hospital import make_phantoms
    from memcontrol.search.baselines import baseline_candidate
    from memcontrol.search.trial import to_mask
    from memcontrol.training import TrainConfig, cache_training_data, finetune

    manifest = make_phantoms(out / "shadow_cohort", PRIVATE["patients"], shadow_seed, PRIVATE["duplicates"],
                             size=settings.data["resolution"], site="private", records=PRIVATE["records"])
    shadow = load_source({"source": str(manifest)}, settings.data["resolution"])
    candidate = baseline_candidate(baseline, settings, pipe.unet)
    cfg = TrainConfig.from_dict({**settings.train, **candidate.train, "seed": 0})
    torch.manual_seed(0)
    t0 = time.perf_counter()
    result = finetune(pipe, to_mask(candidate), cache_training_data(pipe, shadow, None, progress=False), cfg)
    if result.status != "ok":
        raise SystemExit(f"the shadow fine-tune ended {result.status}: {result.reason}")
    print(f"shadow model ({baseline}, lr {cfg.lr:g}): {result.steps} steps on {len(shadow)} records of "
          f"{PRIVATE['patients']} patients ({time.perf_counter() - t0:.0f} s)", flush=True)
    return result.merged_unet()


def rescore(run: Path, config: Path, taus: dict, others: int) -> None:
    """A study's detections at each tau against the identity truth, pooled over its evaluated runs."""
    from memcontrol.config import load_config
    from memcontrol.metrics.ground_truth import precision_recall, true_copies
    from memcontrol.search.settings import load_settings
    from quickstart import detections, evaluated_runs, real_images, run_samples
    from truth import share

    settings = load_settings(load_config(config), run)
    private, keys, others_drawn = real_images(settings, others)
    truth, detected = [], {name: [] for name in taus}
    for _, folder in evaluated_runs(run):
        truth += true_copies(run_samples(folder)[:, :private.shape[1]], private, keys, others_drawn)
        for name, tau in taus.items():
            detected[name] += detections(folder, tau)
    print(f"\n{run} ({len(truth)} samples, {sum(t is not None for t in truth)} true copies):")
    for name, tau in taus.items():
        pr = precision_recall(detected[name], truth)
        print(f"  {name} {tau:.3f}: {pr['detected']} detected, "
              f"precision {share(pr['true_positives'], pr['detected'])}, "
              f"recall {share(pr['true_positives'], pr['true_copies'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "paper.yaml")
    ap.add_argument("--out", type=Path, required=True, help="folder for the shadow cohort and samples (kept)")
    ap.add_argument("--shadow-seed", type=int, default=80, help="cohort seed of the shadow patients")
    ap.add_argument("--baseline", choices=("full_ft", "lora_attention", "bitfit_norm", "base"), default="full_ft",
                    help="how the shadow model is fine-tuned: as this baseline row of the config, or not at all "
                         "(base: the untuned model)")
    ap.add_argument("--sampling-seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--fpr", type=float, default=0.01)
    ap.add_argument("--others", type=int, default=4000, help="other patients of the site for the identity truth")
    ap.add_argument("--study", nargs=2, action="append", default=[], metavar=("RUN", "CONFIG"),
                    help="a finished study and its config: its detections rescored at both taus")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for run, config in args.study:
        if not Path(run, "trials.csv").is_file() or not Path(config).is_file():
            ap.error(f"--study {run} {config}: needs a finished study folder (trials.csv) and its config file")

    from memcontrol.config import load_config
    from memcontrol.data import load_source
    from memcontrol.metrics import build_embedder
    from memcontrol.metrics.ground_truth import true_copies
    from memcontrol.metrics.memorization import tau_at_false_positive_rate
    from memcontrol.metrics.nn_search import nearest_neighbours
    from memcontrol.models import load_pipeline
    from memcontrol.search.objectives import dataset_pixels
    from memcontrol.search.settings import load_settings
    from quickstart import real_images
    from truth import share

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = load_settings(load_config(args.config), args.out / "settings")
    pipe = load_pipeline(settings.model["path"], option="model.path")
    private = load_source(settings.data["train"], settings.data["resolution"])
    samples = shadow_samples(settings, pipe, private, args.out, args.shadow_seed, args.sampling_seeds, args.baseline)

    mem = settings.objectives["memorization"]
    embedder = build_embedder(mem["features"], pipe=pipe)
    train_feats = embedder.embed(torch.cat(list(dataset_pixels(private)))).float()
    sims = nearest_neighbours(embedder.embed(samples).float(), train_feats, k=1, progress=False)[0][:, 0]
    tau = float(mem["tau"])
    refs, keys, others = real_images(settings, args.others)
    called = sum(t is not None for t in true_copies(samples[:, :refs.shape[1]], refs, keys, others))
    shadow_tau = tau_at_false_positive_rate(sims.double().numpy(), args.fpr)
    print(f"\nshadow model's samples from the private reports: {len(samples)}")
    print(f"  called copies by the identity truth: {share(called, len(samples))}")
    print(f"  above the config's tau {tau:.3f} (the detector's false-positive rate on them): "
          f"{share(int((sims > tau).sum()), len(samples))}")
    print(f"  nearest-private similarity: median {sims.median():.3f}, max {sims.max():.3f}; the tau {args.fpr:.0%} of "
          f"them exceed: {shadow_tau:.3f}")
    for run, config in args.study:
        rescore(Path(run), Path(config), {"config tau": tau, "shadow tau": shadow_tau}, args.others)
    print(f"\n{time.perf_counter() - start:.0f} s; python bench/shadow.py {' '.join(argv or sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
