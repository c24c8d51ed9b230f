"""The identity truth checked on copies of known identity: does it name a copy's own patient, and does it leave
non-copies alone. Pixel L2 (the truth, ``memcontrol.metrics.ground_truth``) beside pixel correlation (a global gain
and offset forgiven), the alternative that was tried and not adopted, and (``--shadow``) correlation with a margin.

    python bench/truth.py                                                # constructed copies and non-copies, two sets
    python bench/truth.py --study runs/paper configs/paper.yaml          # also a finished study's samples (repeatable)
    python bench/truth.py --shadow runs/shadow --study runs/paper configs/paper.yaml   # and the margin rule

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

Each for every rule, Wilson 95% intervals. Seeded: the same command prints the same figures. With ``--study RUN
CONFIG``, every evaluated run of that study is scored by every rule too (the private records are the study's,
through its model's VAE, as ``bench/quickstart.py`` scores them): how many of its samples each rule calls copies,
and whose; then the copy detector's detections against each rule, precision and recall, pooled over the runs (and
over the studies when there are several). The base model's samples are copies of nobody (it never saw the private
patients): a rule that names some is wrong there, and so wherever else it names that patient for samples that look
alike.

The margin rule (``--shadow DIR``): correlation's nearest must also stand apart from everyone else, rho = (1 - r1) /
(1 - r2) below a limit, r2 the best correlation with another patient (``correlation_margin``). The limit is
calibrated on separate data, never on the studies: the samples of ``bench/shadow.py``'s shadow models (fine-tuned on
other patients of the site, drawing from the private reports, so copies of no private patient), the largest limit at
which at most ``--shadow-rate`` of them are called copies.
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


def _standardized(x: torch.Tensor) -> torch.Tensor:
    x = x.flatten(1).double()
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def correlation_margin(samples, private, keys, others) -> tuple[list, torch.Tensor]:
    """Nearest reference by pixel correlation (least squares with a gain and an offset leaves a residual that falls
    as the correlation rises): its key (None for one of ``others`` or a flat sample, which correlates with nothing),
    and the margin ratio rho = (1 - r1) / (1 - r2), r2 the best correlation with any *other* patient (a private
    patient's duplicate records are one patient). A copy stands apart from everyone else (small rho); a generic
    sample near a typical patient (a hub) has a runner-up almost as close (rho near 1)."""
    scores = _standardized(samples) @ _standardized(torch.cat([private, others])).T
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    patient = torch.tensor([ids[k] for k in keys] + list(range(len(ids), len(ids) + len(others))))
    best = scores.argmax(1)
    runner_up = scores.masked_fill(patient[None, :] == patient[best][:, None], -2.0).max(1).values
    rho = (1 - scores.gather(1, best[:, None])[:, 0]).clamp_min(0) / (1 - runner_up).clamp_min(1e-12)
    flat = (scores.abs().sum(1) == 0).tolist()
    return [None if f or i >= len(keys) else keys[i] for i, f in zip(best.tolist(), flat)], rho


def correlation(samples, private, keys, others) -> list:
    """The alternative rule: nearest reference by pixel correlation (see ``correlation_margin``)."""
    return correlation_margin(samples, private, keys, others)[0]


RULES = [(true_copies, "pixel L2 (the truth)"), (correlation, "pixel correlation")]


def margin_rule(limit: float):
    """Pixel correlation that also asks the copy to stand apart: nearest is a private patient and rho < ``limit``."""
    def rule(samples, private, keys, others) -> list:
        named, rho = correlation_margin(samples, private, keys, others)
        return [k if k is not None and r < limit else None for k, r in zip(named, rho.tolist())]
    return rule


def calibrate_margin(shadow: Path, config: Path, others: int, rate: float) -> float:
    """The largest rho limit at which at most ``rate`` of the shadow models' samples (``bench/shadow.py``: models that
    never saw the private patients, drawing from the private reports) are called copies of a private patient."""
    from safetensors.torch import load_file

    from memcontrol.config import load_config
    from memcontrol.search.settings import load_settings
    from quickstart import real_images

    files = sorted(shadow.glob("shadow_samples_*.safetensors"))
    if not files:
        raise SystemExit(f"--shadow {shadow}: no shadow_samples_*.safetensors there (python bench/shadow.py makes them)")
    private, keys, others_drawn = real_images(load_settings(load_config(config), shadow / "settings"), others)
    named, rho = [], []
    for f in files:
        n, r = correlation_margin(load_file(str(f))["samples"][:, :private.shape[1]], private, keys, others_drawn)
        named += n
        rho += r.tolist()
        print(f"{f.name}: {sum(k is not None for k in n)} of {len(n)} nearest to a private patient by correlation")
    near = sorted(r for k, r in zip(named, rho) if k is not None)
    allowed = int(rate * len(named))
    limit = near[allowed] if len(near) > allowed else float("inf")
    print(f"margin limit: rho < {limit:.4f} calls at most {allowed} of the {len(named)} shadow samples "
          f"({rate:.1%}); their rho when nearest a private patient: {', '.join(f'{r:.3f}' for r in near[:8])}"
          f"{' ...' if len(near) > 8 else ''}")
    return limit


def share(hits: int, n: int) -> str:
    """``hits`` of ``n`` with the share's Wilson 95% interval."""
    if not n:
        return "-"
    ci = wilson(hits, n)
    return f"{hits}/{n} = {ci.value:.1%} [{ci.low:.1%}, {ci.high:.1%}]"


def check_set(label: str, private_seed: int, others: torch.Tensor, vae, args, rules) -> None:
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
    for rule, name in rules:
        own = sum(a == b for a, b in zip(rule(copies, private, keys, others), owners))
        named = [sum(t is not None for t in rule(x, private, keys, others))
                 for x in (fresh, blends, *averages.values())]
        sizes = [len(fresh), len(blends), *(len(a) for a in averages.values())]
        print(f"| {name} | {share(own, len(owners))} | " + " | ".join(share(h, n) for h, n in zip(named, sizes)) + " |")


def check_study(run: Path, config: Path, others: int, rules) -> dict:
    """Every rule on every evaluated run of a finished study: copies called, and the patients named; then the copy
    detector's detections (``neighbours.json``, at the config's tau) against each rule, pooled over the runs.
    Returns each rule's pooled counts (``ground_truth.precision_recall``)."""
    import collections

    from memcontrol.config import load_config
    from memcontrol.metrics.ground_truth import precision_recall
    from memcontrol.search.settings import load_settings
    from quickstart import detections, evaluated_runs, real_images, run_samples

    settings = load_settings(load_config(config), run)
    tau = float(settings.objectives["memorization"]["tau"])
    private, keys, others = real_images(settings, others)
    print(f"\n### {run}: samples each rule calls copies (and of whom: the patients named most)\n")
    print("| run | samples | " + " | ".join(name for _, name in rules) + " |")
    print("|---|---|" + "---|" * len(rules))
    detected, truths = [], [[] for _ in rules]
    for r, folder in evaluated_runs(run):
        samples = run_samples(folder)[:, :private.shape[1]]
        detected += detections(folder, tau)
        cells = []
        for (rule, _), truth in zip(rules, truths):
            called = rule(samples, private, keys, others)
            truth += called
            named = collections.Counter(k for k in called if k is not None)
            whose = ", ".join(f"{k} x{n}" for k, n in named.most_common(2))
            cells.append(f"{sum(named.values())}" + (f" ({whose})" if whose else ""))
        print(f"| {r['label']} | {len(samples)} | " + " | ".join(cells) + " |")
    counts = {name: precision_recall(detected, truth) for (_, name), truth in zip(rules, truths)}
    print_detector(f"{run}: the detector at tau {tau:.3f}", counts)
    return counts


def print_detector(title: str, counts: dict) -> None:
    print(f"\n{title}, against each rule:")
    for name, c in counts.items():
        print(f"  {name}: {c['true_copies']} copies, {c['detected']} detected; precision "
              f"{share(c['true_positives'], c['detected'])}, recall {share(c['true_positives'], c['true_copies'])}")


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
    ap.add_argument("--study", nargs=2, action="append", default=[], metavar=("RUN", "CONFIG"),
                    help="a finished study and its config: its samples scored by every rule (repeatable; pooled)")
    ap.add_argument("--shadow", type=Path, default=None,
                    help="bench/shadow.py's folder: adds correlation with a margin, its limit calibrated on the "
                         "shadow samples there")
    ap.add_argument("--shadow-config", type=Path, default=ROOT / "configs" / "paper.yaml",
                    help="the config the shadow samples were made with")
    ap.add_argument("--shadow-rate", type=float, default=0.005,
                    help="share of the shadow samples the margin rule may call copies")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for run, config in args.study:
        if not Path(run, "trials.csv").is_file() or not Path(config).is_file():
            ap.error(f"--study {run} {config}: needs a finished study folder (trials.csv) and its config file")
    start = time.perf_counter()
    vae = load_pipeline(args.model, option="--model").vae
    others = other_patients(args.model, args.others, SIZE, CHANNELS)
    rules = list(RULES)
    if args.shadow:
        limit = calibrate_margin(args.shadow, args.shadow_config, args.others, args.shadow_rate)
        rules.append((margin_rule(limit), f"correlation, rho < {limit:.3f}"))
    check_set("a fresh set of private-site patients", 77, others, vae, args, rules)
    check_set("the bundled private cohort's patients", SEEDS["private"], others, vae, args, rules)
    pooled = {}
    for run, config in args.study:
        for name, c in check_study(Path(run), Path(config), args.others, rules).items():
            pooled[name] = {k: pooled.get(name, {}).get(k, 0) + c[k] for k in ("true_positives", "detected",
                                                                             "true_copies")}
    if len(args.study) > 1:
        print_detector(f"Pooled over {len(args.study)} studies: the detector", pooled)
    print(f"\n{time.perf_counter() - start:.0f} s; python bench/truth.py {' '.join(argv or sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
