"""The identity truth checked on copies of known identity: does it name a copy's own patient, and does it leave
non-copies alone. Pixel L2 (the truth, ``memcontrol.metrics.ground_truth``) beside pixel correlation (a global gain
and offset forgiven), the alternative that was tried and not adopted.

    python bench/truth.py                                        # constructed copies and non-copies, two sets
    python bench/truth.py --run runs/paper --config configs/paper.yaml    # also a finished study's samples

For each set P of 8 private-site patients, among ``--others`` further patients of the site (the truth's others,
``bench/quickstart.py``'s ``other_patients``), everything drawn through the base model's VAE as the truth
compares it (``memcontrol.metrics.ground_truth.through_vae``):

- copies: ``--copies`` per patient, each re-acquired (``memcontrol.data.reacquire``: positioning and exposure
  re-drawn around the patient's own) and then given a global gain U(0.85, 1.15), an offset U(-0.3, 0.1) (images in
  [-1, 1]; the offsets of full fine-tuning's darker copies in the headline study were about -0.1 to -0.25), a
  Gaussian blur of sigma U(0, 1.5) px and noise of sigma U(0, 0.05). Printed: the share named as their own patient.
- fresh patients: ``--fresh`` further patients of the site, equally perturbed. Printed: the share named as some
  patient of P (chance: 8 / (8 + others)).
- blends: ``--blends`` blurred (1 px) averages of two patients of P; averages of 16 and of 64 fresh patients
  (blurred 1.5 px, ``--averages`` each). Printed: the share named as a patient of P.

Each for both rules, Wilson 95% intervals. Seeded: the same command prints the same figures. With ``--run`` and
``--config``, every evaluated run of that study is scored by both rules too (the private records are the study's,
through its model's VAE, as ``bench/quickstart.py`` scores them): how many of its samples each rule calls copies, and
whose. The base model's samples are copies of nobody (it never saw the private patients): a rule that names some is
wrong there, and so wherever else it names that patient for samples that look alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.transforms.functional import gaussian_blur  # noqa: E402

from memcontrol.data.cohorts import SEEDS  # noqa: E402
from memcontrol.data.phantoms import describe_patient, patient_seeds, render_patients  # noqa: E402
from memcontrol.data.reacquire import reacquire  # noqa: E402
from memcontrol.data.transforms import to_model_tensor  # noqa: E402
from memcontrol.metrics.ground_truth import chance_rate, through_vae, true_copies  # noqa: E402
from memcontrol.metrics.intervals import wilson  # noqa: E402
from memcontrol.models import load_pipeline  # noqa: E402
from quickstart import other_patients  # noqa: E402

SIZE = 64
CHANNELS = 3  # the bundled model's images


def tensors(patients) -> torch.Tensor:
    return torch.stack([to_model_tensor(im, SIZE, CHANNELS) for im in render_patients(patients, SIZE)])


def blurred(image: torch.Tensor, sigma: float) -> torch.Tensor:
    return gaussian_blur(image[None], [7, 7], [sigma, sigma])[0]


def perturb(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    out = []
    for im in images:
        im = (rng.uniform(0.85, 1.15) * im + rng.uniform(-0.3, 0.1)).clamp(-1, 1)
        sigma = rng.uniform(0, 1.5)
        if sigma > 0.2:  # below that a 7-pixel kernel leaves the image as it is
            im = blurred(im, sigma)
        noise = torch.from_numpy(rng.standard_normal(im.shape).astype(np.float32))
        out.append((im + rng.uniform(0, 0.05) * noise).clamp(-1, 1))
    return torch.stack(out)


def correlation(samples, private, keys, others) -> list:
    """The alternative rule: nearest reference by pixel correlation (least squares with a gain and an offset leaves a
    residual that falls as the correlation rises). A flat sample correlates with nothing."""
    def standardized(x):
        x = x.flatten(1).double()
        x = x - x.mean(1, keepdim=True)
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    scores = standardized(samples) @ standardized(torch.cat([private, others])).T
    flat = (scores.abs().sum(1) == 0).tolist()
    return [None if f or i >= len(keys) else keys[i] for i, f in zip(scores.argmax(1).tolist(), flat)]


RULES = ((true_copies, "pixel L2 (the truth)"), (correlation, "pixel correlation"))


def share(hits: int, n: int) -> str:
    """``hits`` of ``n`` with the share's Wilson 95% interval."""
    if not n:
        return "-"
    ci = wilson(hits, n)
    return f"{hits}/{n} = {ci.value:.1%} [{ci.low:.1%}, {ci.high:.1%}]"


def check_set(label: str, private_seed: int, others: torch.Tensor, vae, args) -> None:
    rng = np.random.default_rng(args.seed)
    patients = [describe_patient(s, "private") for s in patient_seeds(private_seed, 8)]
    keys = [str(i) for i in range(8)]
    drawn = tensors(patients)
    private = through_vae(vae, drawn)
    copies = through_vae(vae, perturb(tensors([reacquire(p, rng) for p in patients for _ in range(args.copies)]), rng))
    owners = [k for k in keys for _ in range(args.copies)]
    fresh = through_vae(vae, perturb(tensors([describe_patient(s, "private") for s in
                                              patient_seeds(args.fresh_seed, args.fresh)]), rng))
    pairs = [rng.choice(8, 2, replace=False) for _ in range(args.blends)]
    blends = through_vae(vae, torch.stack([blurred((drawn[i] + drawn[j]) / 2, 1.0) for i, j in pairs]))
    pool = tensors([describe_patient(s, "private") for s in patient_seeds(args.fresh_seed + 1, 1000)])
    averages = {k: through_vae(vae, torch.stack([
        blurred(pool[torch.from_numpy(rng.choice(len(pool), k, replace=False))].mean(0), 1.5)
        for _ in range(args.averages)])) for k in (16, 64)}

    print(f"\n### {label} (patient_seeds({private_seed}, 8)) among {len(others)} others; chance "
          f"{chance_rate(8, len(others)):.2%}\n")
    print("| rule | copies named their own patient | fresh patients named a patient of P | two-patient blends "
          "named P | averages of 16 named P | averages of 64 named P |")
    print("|---|---|---|---|---|---|")
    for rule, name in RULES:
        own = sum(a == b for a, b in zip(rule(copies, private, keys, others), owners))
        named = [sum(t is not None for t in rule(x, private, keys, others))
                 for x in (fresh, blends, *averages.values())]
        sizes = [len(fresh), len(blends), *(len(a) for a in averages.values())]
        print(f"| {name} | {share(own, len(owners))} | " + " | ".join(share(h, n) for h, n in zip(named, sizes)) + " |")


def check_study(run: Path, config: Path, others: int) -> None:
    """Both rules on every evaluated run of a finished study: copies called, and the patients named."""
    import collections

    from memcontrol.config import load_config
    from memcontrol.search.settings import load_settings
    from quickstart import load_rows, real_images, run_samples

    settings = load_settings(load_config(config), run)
    private, keys, others = real_images(settings, others)
    print(f"\n### {run}: samples each rule calls copies (and of whom: the patients named most)\n")
    print("| run | samples | " + " | ".join(name for _, name in RULES) + " |")
    print("|---|---|" + "---|" * len(RULES))
    for r in load_rows(run):
        folder = run / r["folder"]
        if r["state"] != "complete" or not (folder / "samples").is_dir():
            continue
        samples = run_samples(folder)[:, :private.shape[1]]
        cells = []
        for rule, _ in RULES:
            named = collections.Counter(k for k in rule(samples, private, keys, others) if k is not None)
            whose = ", ".join(f"{k} x{n}" for k, n in named.most_common(2))
            cells.append(f"{sum(named.values())}" + (f" ({whose})" if whose else ""))
        print(f"| {r['label']} | {len(samples)} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "data" / "base_model", help="diffusers pipeline folder")
    ap.add_argument("--others", type=int, default=4000)
    ap.add_argument("--copies", type=int, default=25, help="constructed copies per patient")
    ap.add_argument("--fresh", type=int, default=400)
    ap.add_argument("--blends", type=int, default=200)
    ap.add_argument("--averages", type=int, default=100)
    ap.add_argument("--fresh-seed", type=int, default=78, help="cohort seed of the fresh patients (+1: the averages')")
    ap.add_argument("--seed", type=int, default=2026, help="perturbations and draws")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--run", type=Path, default=None, help="a finished study whose samples both rules also score")
    ap.add_argument("--config", type=Path, default=None, help="the config the --run study was made with")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.run is None) != (args.config is None):
        ap.error("--run and --config go together: the study and the config it was made with")
    start = time.perf_counter()
    vae = load_pipeline(args.model, option="--model").vae
    others = other_patients(vae, args.others, SIZE, CHANNELS)
    check_set("a fresh set of private-site patients", 77, others, vae, args)
    check_set("the bundled private cohort's patients", SEEDS["private"], others, vae, args)
    if args.run:
        check_study(args.run, args.config, args.others)
    print(f"\n{time.perf_counter() - start:.0f} s; python bench/truth.py {' '.join(argv or sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
