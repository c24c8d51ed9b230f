"""Mask transfer, measured on real faces: a mask chosen elsewhere, trained at its own searched learning rate, against
the base model, full fine-tuning and share-matched random masks.

    python bench/transfer_faces.py --mask runs/quickstart/best/mask.json --out runs/transfer_faces
    python bench/transfer_faces.py --out runs/transfer_faces     # the mask of configs/finetune_example.yaml

Data: `data/faces` (pipelines/make_faces.py): 8 real face crops of scikit-image's `lfw_subset` to fine-tune on (4 of
them with 8 identical records), 92 others held out. Training: `configs/transfer_faces.yaml` (500 steps, batch 8,
warm-up 100, cosine), with the same functions as `memcontrol finetune`. Every sample comes from the one training
caption (DPM-Solver++, 20 steps, guidance 7.5, the quickstart's sampler), sample j from noise seeded by seed + j.

Rows: the base model (not fine-tuned); full fine-tuning at the quickstart's lr 2e-3; the transferred mask at each
lr of a log grid (``--lrs``) on the *search* seeds, of which the project's ``copy_bound`` rule
(``memcontrol.search.selection``: best FD among runs copying at most 5% of their samples; the base model wins unless
beaten beyond the FD interval) picks one, then that run re-evaluated on *fresh* seeds; ``--controls`` random masks
with the mask's family and trainable share (``memcontrol.search.followups.draw_sites``) at the chosen lr; LoRA on
all attention blocks at the chosen lr. Every row of the table is measured on the same fresh seeds, so differences
between rows are paired.

Measures, fixed before any run was looked at:
* copies: each sample's Pearson correlation with its nearest private face, on 32 x 32 grey pixels (the centred
  cosine of ``memcontrol.data.duplicates``; the metric networks of this project know radiographs, not faces); a
  copy above tau, the largest correlation of any of the 92 held-out faces with a private face (``calibrate_tau`` at
  false-positive rate 1%: with 92 held-out faces nothing finer than 1/92 can be resolved, so none may lie above
  it). Copy rate with its Wilson 95% interval; mean nearest-neighbour correlation with a bootstrap interval.
* quality: FD on grey pixels area-pooled to 4 x 4 (16 dimensions: the reference, 52 held-out faces, and the 40
  samples of a row both well above that), against those 52 faces; bootstrap 95% interval over samples, reference
  held fixed. The floor: the other 40 held-out faces, as if they were samples.

Finished rows are kept in ``--out`` (samples, trained weights of the lr runs) and reused when the bench is run again.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memcontrol.metrics.intervals import bootstrap_indices, interval, paired, resampled_mean, wilson  # noqa: E402
from memcontrol.metrics.intervals import resampled_frechet  # noqa: E402

SAMPLING = dict(steps=20, sampler="dpm", guidance_scale=7.5)
LRS = (2e-4, 1e-3, 5e-3)        # a factor-5 log grid around the quickstart's LoRA baseline (2e-3)
FULL_LR = 2e-3                  # the quickstart's full fine-tuning
COPY_FPR = 0.01
COPY_SIZE = 32
FD_SIZE = 4
REFERENCE = 52                  # held-out faces in the FD reference; the next `samples` are the floor
SEARCH_SEED = 0
EXAMPLE_MASK = REPO / "configs" / "finetune_example.yaml"


def grey(images: torch.Tensor) -> torch.Tensor:
    return images.float().mean(1, keepdim=True)


def copy_features(images: torch.Tensor) -> torch.Tensor:
    """Unit rows whose dot products are Pearson correlations of 32 x 32 grey images."""
    from memcontrol.data.duplicates import similarity_rows

    return similarity_rows(F.interpolate(grey(images), size=COPY_SIZE, mode="area"), centre=True)


def fd_features(images: torch.Tensor) -> np.ndarray:
    return F.interpolate(grey(images), size=FD_SIZE, mode="area").flatten(1).double().numpy()


@dataclass
class Faces:
    train: object                 # the training dataset (36 records)
    caption: str
    private: torch.Tensor         # one image per private face
    keys: list[str]
    heldout: torch.Tensor         # the 92 held-out faces

    @classmethod
    def load(cls, job) -> Faces:
        from memcontrol.data import ImageCaptionDataset

        train = ImageCaptionDataset(job.data.train.source, resolution=job.data.resolution)
        held = ImageCaptionDataset(job.data.heldout.source, resolution=job.data.resolution)
        captions = set(train.captions)
        if len(captions) != 1:
            raise SystemExit(f"{job.data.train.source}: the bench samples from one caption, found {len(captions)}")
        first = {}
        for i, key in enumerate(train.keys):
            first.setdefault(key, i)
        private = torch.stack([train[i]["pixel_values"] for i in first.values()])
        heldout = torch.stack([held[i]["pixel_values"] for i in range(len(held))])
        return cls(train, captions.pop(), private, list(first), heldout)


class Measure:
    """The fixed yardsticks: private faces, tau, the FD reference and the bootstrap resamples."""

    def __init__(self, faces: Faces, samples: int, resamples: int = 1000):
        from memcontrol.metrics.memorization import calibrate_tau
        from memcontrol.metrics.quality import gaussian_stats

        if samples > len(faces.heldout) - REFERENCE:
            raise SystemExit(f"--samples {samples}: at most {len(faces.heldout) - REFERENCE} (the floor's real faces)")
        self.faces = faces
        self.private = copy_features(faces.private)
        self.tau, held_sims = calibrate_tau(copy_features(faces.heldout), self.private, COPY_FPR)
        self.heldout_max = float(held_sims.max())
        self.reference = gaussian_stats(fd_features(faces.heldout[:REFERENCE]))
        self.floor = faces.heldout[REFERENCE:REFERENCE + samples]
        self.indices = bootstrap_indices(samples, resamples, seed=0)

    def statistics(self, images: torch.Tensor) -> dict:
        """Per-resample statistics of one sample set (for rows and paired differences)."""
        from memcontrol.metrics.memorization import copy_detection

        found = copy_detection(copy_features(images), self.private, self.faces.keys, tau=self.tau,
                               indices=self.indices)
        sims = np.asarray(found["samples"]["similarity"])
        return {"copy": resampled_mean(sims > self.tau), "similarity": resampled_mean(sims),
                "fd": resampled_frechet(fd_features(images), self.reference), "copies": found["copies"],
                "n": found["n"], "attribution": found["attribution"]}

    def row(self, images: torch.Tensor) -> dict:
        s = self.statistics(images)
        return {**wilson(s["copies"], s["n"]).fields("copy_rate"), "copies": s["copies"], "n": s["n"],
                **interval(s["similarity"], self.indices).fields("similarity"),
                **interval(s["fd"], self.indices).fields("fd"), "attribution": s["attribution"]}


def ci(row: dict, name: str, spec: str) -> str:
    from memcontrol.metrics.intervals import format_interval

    return format_interval(row[name], row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high"), spec)


class Runs:
    """Trains and samples the rows, keeping each finished one in ``out`` (reused on a re-run)."""

    def __init__(self, pipe, faces: Faces, job, out: Path, samples: int, sampling: dict, steps: int | None):
        from memcontrol.training import cache_training_data

        self.pipe, self.faces, self.job, self.out = pipe, faces, job, out
        self.samples, self.sampling = samples, sampling
        self.train_settings = {**job.train.model_dump(), **({"steps": steps} if steps else {})}
        self.cached = cache_training_data(pipe, faces.train, out / "cache", progress=False)
        out.mkdir(parents=True, exist_ok=True)

    def unet(self, name: str, mask, lr: float) -> tuple[torch.nn.Module, dict]:
        """The UNet trained with ``mask`` at ``lr`` (read back when this run finished before), and its card."""
        from safetensors.torch import load_file, save_file

        from memcontrol.training import TrainConfig, finetune

        weights, card_file = self.out / f"{name}.unet.safetensors", self.out / f"{name}.train.json"
        if weights.exists() and card_file.exists():
            unet = copy.deepcopy(self.pipe.unet)
            unet.load_state_dict(load_file(str(weights)))
            return unet.eval(), json.loads(card_file.read_text())
        cfg = TrainConfig.from_dict({**self.train_settings, "lr": lr})
        result = finetune(self.pipe, mask, self.cached, cfg, progress=True)
        if result.status != "ok":
            raise RuntimeError(f"{name}: training {result.status}: {result.reason}")
        unet = result.merged_unet().eval()
        card = {"lr": lr, "steps": result.steps, "seconds": result.seconds, "final_loss": result.final_loss,
                "trainable": result.applied.trainable, "percent": result.applied.percent,
                "mask": mask.to_dict()}
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(weights))
        card_file.write_text(json.dumps(card, indent=2))
        print(f"{name}: lr {lr:g}, {result.steps} steps in {result.seconds:.0f} s, {card['percent']:.2f}% "
              f"trainable, final loss {result.final_loss:.4f}", flush=True)
        return unet, card

    def samples_of(self, name: str, unet, seed: int) -> torch.Tensor:
        from safetensors.torch import load_file, save_file

        from memcontrol.sampling import generate_samples
        from memcontrol.training import pipeline_with_unet

        path = self.out / f"{name}.seed{seed}.samples.safetensors"
        if path.exists():
            return load_file(str(path))["samples"]
        pipe = self.pipe if unet is None else pipeline_with_unet(self.pipe, unet)
        start = time.perf_counter()
        images = generate_samples(pipe, [self.faces.caption], self.samples, seed=seed, **self.sampling)
        save_file({"samples": images.contiguous()}, str(path))
        print(f"{name}: {len(images)} samples (seed {seed}) in {time.perf_counter() - start:.0f} s", flush=True)
        return images


def mask_granularity(unet, mask) -> str:
    from memcontrol.masks import enumerate_sites

    return "block" if set(mask.sites) <= {s.name for s in enumerate_sites(unet, "block")} else "role"


def random_masks(unet, mask, trainable: int, count: int, tolerance: float = 0.25) -> list:
    """``count`` masks of ``mask``'s family on random sites of the same kinds, ``trainable`` parameters each
    (within ``tolerance``, as the search's controls)."""
    from memcontrol.masks import Mask, enumerate_sites
    from memcontrol.search.followups import draw_sites, site_sizes

    granularity = mask_granularity(unet, mask)
    sites = enumerate_sites(unet, granularity)
    kinds = {s.kind for s in sites if s.name in set(mask.sites)}
    among = {s.name for s in sites if s.kind in kinds}
    sizes = site_sizes(unet, mask.family, dict(mask.params), granularity, among)
    return [Mask(draw_sites(sizes, set(mask.sites) & set(sizes), trainable, tolerance, seed=f"faces:random_mask_{k}"),
                 mask.family, dict(mask.params)) for k in range(count)]


def lora_attention(unet, mask):
    from memcontrol.masks import Mask, enumerate_sites

    params = dict(mask.params) if mask.family == "lora" else {"rank": 4, "alpha": 4.0}
    return Mask([s.name for s in enumerate_sites(unet, "block") if s.kind == "attention"], "lora", params)


def choose_lr(rows: dict, base: dict) -> tuple[float, str]:
    """The copy_bound rule over the lr runs and the base model (search seeds); when it says "do not fine-tune", the
    mask's row still needs an lr: the best FD among the runs within the copy bound, else the lowest copy rate."""
    from memcontrol.search.selection import Point, select

    points = [Point(lr, r["similarity"], r["fd"], r["copy_rate"], r["fd_ci_high"]) for lr, r in rows.items()]
    points.append(Point("base", base["similarity"], base["fd"], base["copy_rate"], base["fd_ci_high"], base=True))
    chosen = select(points, "copy_bound")
    if not chosen.do_not_finetune:
        return chosen.chosen.key, chosen.explanation
    safe = [p for p in points if not p.base and p.copy_rate <= 0.05]
    lr = (min(safe, key=lambda p: p.quality) if safe else min(points[:-1], key=lambda p: (p.copy_rate, p.quality))).key
    return lr, f"{chosen.explanation}; the mask's row uses lr {lr:g} ({'best FD within the copy bound' if safe else 'lowest copy rate'})"


def run(mask_path: Path | None, config: Path, out: Path, lrs=LRS, samples: int = 40, controls: int = 2,
        lora: bool = True, steps: int | None = None, sampling: dict | None = None, resamples: int = 1000) -> dict:
    from memcontrol.config import read_config
    from memcontrol.masks import Mask, load_mask
    from memcontrol.models import load_pipeline

    torch.manual_seed(0)
    job = read_config(config)
    mask = load_mask(mask_path) if mask_path else load_mask(read_config(EXAMPLE_MASK).mask)
    mask_name = str(mask_path) if mask_path else f"{EXAMPLE_MASK.relative_to(REPO)} (its mask)"
    pipe = load_pipeline(job.model.path)
    faces = Faces.load(job)
    measure = Measure(faces, samples, resamples)
    runs = Runs(pipe, faces, job, out, samples, sampling or SAMPLING, steps)
    fresh = SEARCH_SEED + samples          # seeds SEARCH_SEED + j, j < samples, are the search's
    started = time.perf_counter()

    search = {lr: runs.unet(f"mask-lr{lr:g}", mask, lr) for lr in lrs}
    search_rows = {lr: measure.row(runs.samples_of(f"mask-lr{lr:g}", unet, SEARCH_SEED))
                   for lr, (unet, _) in search.items()}
    base_search = measure.row(runs.samples_of("base", None, SEARCH_SEED))
    lr, why = choose_lr(search_rows, base_search)
    print(f"learning rate of the mask: {why}", flush=True)

    # label -> (run name, trained UNet, training card)
    trained = {"full fine-tuning": ("full", *runs.unet("full", Mask.full_unet(pipe.unet), FULL_LR)),
               "transferred mask, re-evaluated": (f"mask-lr{lr:g}", *search[lr])}
    trainable = search[lr][1]["trainable"]
    for k, control in enumerate(random_masks(pipe.unet, mask, trainable, controls)):
        name = f"random{k + 1}-lr{lr:g}"
        trained[f"random mask {k + 1}"] = (name, *runs.unet(name, control, lr))
    if lora:
        name = f"lora-attention-lr{lr:g}"
        trained["LoRA on all attention"] = (name, *runs.unet(name, lora_attention(pipe.unet, mask), lr))
    images = {"base model": runs.samples_of("base", None, fresh)}
    images.update({label: runs.samples_of(name, unet, fresh) for label, (name, unet, _) in trained.items()})
    cards = {label: card for label, (_, _, card) in trained.items()}
    table = {label: {**measure.row(x), **{k: cards[label][k] for k in ("lr", "percent", "seconds")
                                          if label in cards}} for label, x in images.items()}
    table["base model"].update(lr=None, percent=0.0, seconds=0.0)
    floor = measure.row(measure.floor)
    stats = {label: measure.statistics(x) for label, x in images.items()}
    comparisons = compare(stats, measure.indices, [k for k in table if k.startswith(("random", "LoRA"))])
    result = {"mask": mask_name, "mask_spec": mask.to_dict(), "tau": measure.tau, "samples": samples,
              "search": {f"{k:g}": v for k, v in search_rows.items()}, "search_base": base_search, "lr": lr,
              "lr_choice": why, "table": table, "floor": {k: floor[k] for k in ("fd", "fd_ci_low", "fd_ci_high")},
              "comparisons": comparisons, "seconds": time.perf_counter() - started,
              "sampling": sampling or SAMPLING, "train": runs.train_settings, "fresh_seed": fresh}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    figure(images, faces.private, out / "samples.png")
    return result


def compare(stats: dict, indices: np.ndarray, controls: list[str]) -> dict:
    """Paired 95% intervals (same seeds): the quality gap base - full fine-tuning, and mask - each control."""
    mask = "transferred mask, re-evaluated"
    out = {"FD base - full fine-tuning": paired(stats["base model"]["fd"], stats["full fine-tuning"]["fd"],
                                                indices).fields("value"),
           "FD mask - base": paired(stats[mask]["fd"], stats["base model"]["fd"], indices).fields("value")}
    for name in controls:
        for what in ("copy", "similarity", "fd"):
            out[f"{what} mask - {name}"] = paired(stats[mask][what], stats[name][what], indices).fields("value")
    return out


def figure(images: dict, private: torch.Tensor, path: Path, per_row: int = 8) -> None:
    import matplotlib.pyplot as plt

    from memcontrol.report import save_figure

    rows = {"private faces (training)": private, **images}
    fig, axes = plt.subplots(len(rows), per_row, figsize=(per_row * 0.9, len(rows) * 1.0), squeeze=False)
    for r, (label, x) in enumerate(rows.items()):
        for c in range(per_row):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(x):
                ax.imshow(grey(x[c:c + 1])[0, 0].add(1).div(2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r][0].set_title(label, fontsize=7, loc="left")
    save_figure(fig, path)


def print_result(result: dict) -> None:
    print(f"\nmask: {result['mask']}; tau {result['tau']:.4f} (largest held-out face's correlation); "
          f"{result['samples']} samples per row")
    print("\nlearning-rate search (search seeds):")
    print("| lr | copy rate | mean NN similarity | FD[pixels4] |\n|---|---|---|---|")
    for lr, r in {**result["search"], "base model": result["search_base"]}.items():
        print(f"| {lr} | {ci(r, 'copy_rate', '.2f')} | {ci(r, 'similarity', '.3f')} | {ci(r, 'fd', '.3g')} |")
    print(f"chosen: {result['lr_choice']}")
    print(f"\nfresh seeds ({result['fresh_seed']} + j); 95% intervals: Wilson (copy rate), bootstrap over samples")
    print("| run | lr | copy rate | mean NN similarity | FD[pixels4] | trainable % | train time |")
    print("|---|---|---|---|---|---|---|")
    for label, r in result["table"].items():
        lr = "-" if r["lr"] is None else f"{r['lr']:g}"
        print(f"| {label} | {lr} | {ci(r, 'copy_rate', '.2f')} ({r['copies']}/{r['n']}) | "
              f"{ci(r, 'similarity', '.3f')} | {ci(r, 'fd', '.3g')} | {r['percent']:.2f} | {r['seconds']:.0f} s |")
    f = result["floor"]
    print(f"| real held-out faces (the floor) | | | | {ci(f, 'fd', '.3g')} | | |")
    print("\npaired differences (same seeds), 95% bootstrap intervals:")
    for name, v in result["comparisons"].items():
        print(f"  {name}: {ci(v, 'value', '.3g')}{'' if v['value_ci_low'] <= 0 <= v['value_ci_high'] else '  *'}")
    print(f"\n{result['seconds']:.0f} s in all; * = the interval excludes 0")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mask", type=Path, default=None,
                    help="mask.json to transfer (default: the mask of configs/finetune_example.yaml)")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "transfer_faces.yaml")
    ap.add_argument("--out", type=Path, required=True, help="folder for samples, weights, results.json, samples.png")
    ap.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--controls", type=int, default=2, help="random share-matched masks")
    ap.add_argument("--no-lora-attention", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    ap.add_argument("--sampling-steps", type=int, default=SAMPLING["steps"])
    args = ap.parse_args(argv)
    if args.mask is not None and not args.mask.is_file():
        raise SystemExit(f"--mask {args.mask}: no such file")
    result = run(args.mask, args.config, args.out, args.lrs, args.samples, args.controls, not args.no_lora_attention,
                 args.steps, {**SAMPLING, "steps": args.sampling_steps})
    print_result(result)
    print(f"results: {args.out / 'results.json'}; samples: {args.out / 'samples.png'}")
    return 0 if all(math.isfinite(r["fd"]) for r in result["table"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
