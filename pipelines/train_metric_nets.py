"""Train the synthetic hospital's two metric networks on the *public* phantom cohort only, and ship them.

    python pipelines/train_metric_nets.py --out data/metric_nets --max-minutes 8       # CPU, both networks
    python pipelines/train_metric_nets.py --only copy_detector --patients 500 --steps 50   # a quick try

- ``domain`` (``data/metric_nets/domain``): 64 features for FD/KID. Trained to predict what each phantom's seed says
  (chest or brain; view; nodule grade, side and zone; effusion grade and side; cardiomegaly grade; brain lesion count
  and ventricles) *and* to reconstruct the image (a 16 px decoder from the same 64 features): the labels make the
  features see findings, the reconstruction keeps the rest of the image in them (borders, devices, exposure), which
  the private site changes and the public labels never name.
- ``copy_detector`` (``data/metric_nets/copy_detector``): 64 features compared by cosine similarity, trained with
  InfoNCE (NT-Xent, temperature 0.1). Positives: the same patient re-acquired (``memcontrol.data.reacquire``:
  positioning and exposure re-drawn; chest) and augmented (exposure, blur, noise, random erasing, collimation-like
  borders, tube-like lines, marker-like squares); negatives: the other patients of the batch.

Both use the public seeds of ``memcontrol.data.cohorts`` (the cohort the base model was pretrained on): the first
``--patients`` per modality for training, the next ``--eval-patients`` (public, never trained on) for the accuracy
that ``provenance.json`` records. No private or held-out patient is rendered here.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memcontrol.data.brain_phantoms import render_brain_phantoms  # noqa: E402
from memcontrol.data.cohorts import SEEDS  # noqa: E402
from memcontrol.data.phantoms import describe_patient, patient_seeds, render_phantoms  # noqa: E402
from memcontrol.data.reacquire import rerender  # noqa: E402
from memcontrol.metrics.metric_nets import MetricNet, MetricNetConfig, save_metric_net, to_grey  # noqa: E402

# Classification heads of the domain network: name -> number of classes. Labels that do not apply (a nodule's side
# when there is none, any chest label on a brain image) are ignored by the loss.
HEADS = {"modality": 2, "view": 2, "nodule": 3, "nodule_side": 2, "nodule_zone": 3, "effusion": 4,
         "effusion_side": 2, "cardiomegaly": 4, "lesions": 3, "ventricles": 2}
GRADES = {"nodule": ("small", "large"), "effusion": ("small", "moderate", "large"),
          "cardiomegaly": ("mild", "moderate", "severe")}
IGNORE = -100


# ----------------------------------------------------------------------------------------------------- the data
RECON_SIZE = 16  # the domain network reconstructs a thumbnail: layout and contrast, not texture
RENDER_SIZE = 64  # the phantoms are rendered as the hospital's images are, then resized as the embedder resizes


def to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """float [0, 1] N x H x W -> N x 1 x size x size in [-1, 1], resized as the embedder resizes samples."""
    return to_grey(torch.from_numpy(images).unsqueeze(1) * 2 - 1, size)


def chest_labels(seed: int) -> dict:
    patient = describe_patient(seed)
    labels = dict.fromkeys(HEADS, IGNORE)
    labels.update(modality=0, view=int(patient.view == "AP"), nodule=0, effusion=0, cardiomegaly=0)
    for f in patient.findings:
        labels[f.kind] = 1 + GRADES[f.kind].index(f.grade)
        if f.kind in ("nodule", "effusion"):
            labels[f"{f.kind}_side"] = ("right", "left").index(f.side)
        if f.kind == "nodule":
            labels["nodule_zone"] = ("upper", "middle", "lower").index(f.zone)
    return labels


def brain_labels(report: str) -> dict:
    labels = dict.fromkeys(HEADS, IGNORE)
    labels.update(modality=1, lesions=len(re.findall(r"lesion in the", report)),
                  ventricles=int("enlarged" in report))
    return labels


def public_split(first: int, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Public patients ``first`` .. ``first + count`` of each modality: images (chest, then brain), the label
    matrix (N x heads) and the chest seeds."""
    chest_seeds = patient_seeds(SEEDS["public_chest"], first + count)[first:]
    brain_seeds = patient_seeds(SEEDS["public_brain"], first + count)[first:]
    chest, _ = render_phantoms(chest_seeds, RENDER_SIZE)
    brain, brain_reports = render_brain_phantoms(brain_seeds, RENDER_SIZE)
    rows = [chest_labels(s) for s in chest_seeds] + [brain_labels(r) for r in brain_reports]
    labels = torch.tensor([[row[h] for h in HEADS] for row in rows])
    return to_tensor(np.concatenate([chest, brain]), size), labels, chest_seeds


# -------------------------------------------------------------------------------------------- the augmentations
def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (sigma in pixels, 0 = none), separable, 7 taps."""
    taps = torch.arange(-3, 4, dtype=x.dtype)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    n = len(x)
    rows = F.conv2d(F.pad(x.transpose(0, 1), (3, 3, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n)
    out = F.conv2d(F.pad(rows, (0, 0, 3, 3), mode="replicate"), kernel[:, None, :, None], groups=n)
    return out.transpose(0, 1)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What may differ between a patient's image and a copy of it: exposure, blur, noise, and occluding
    additions (erased patches, collimation-like borders, tube-like lines, marker-like squares). ``x`` in [-1, 1]."""
    n, _, h, w = x.shape

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*(shape or (n,)), generator=gen)

    def chance(p):
        return torch.rand(n, generator=gen) < p

    y = (x + 1) / 2
    y = (u(0.85, 1.15)[:, None, None, None] * y + u(-0.08, 0.08)[:, None, None, None]).clamp(0, 1)
    y = y ** u(0.8, 1.25)[:, None, None, None]
    y = gaussian_blur(y, u(0.0, 1.0) * chance(0.6))  # up to 2 px at the 64 px the images come at
    y = y + u(0.0, 0.04)[:, None, None, None] * torch.randn(y.shape, generator=gen)
    rows, cols = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    for p, fill in ((0.25, "erase"), (0.3, "border"), (0.3, "line"), (0.3, "marker")):
        on = chance(p)[:, None, None]
        if fill == "border":
            margin = (u(0, 0.12, n, 4) * h).long()
            inside = ((rows >= margin[:, 0, None, None]) & (rows < h - margin[:, 1, None, None])
                      & (cols >= margin[:, 2, None, None]) & (cols < w - margin[:, 3, None, None]))
            mask, value = on & ~inside, u(0.0, 0.15)
        elif fill == "line":
            a, b, c = u(-1, 1), u(-1, 1), u(-0.5, 0.5)
            dist = (a[:, None, None] * (cols / w - 0.5) + b[:, None, None] * (rows / h - 0.5) - c[:, None, None])
            dist = dist.abs() / torch.sqrt(a ** 2 + b ** 2)[:, None, None]
            mask, value = on & (dist < 1.2 / w), u(0.8, 1.0)
        else:
            side = u(0.04, 0.08) if fill == "marker" else u(0.12, 0.3)
            top, left = u(0, 1) * (1 - side), u(0, 1) * (1 - side)
            mask = on & ((rows / h >= top[:, None, None]) & (rows / h < (top + side)[:, None, None])
                         & (cols / w >= left[:, None, None]) & (cols / w < (left + side)[:, None, None]))
            value = u(0.85, 1.0) if fill == "marker" else u(0.0, 1.0)
        y = torch.where(mask[:, None], value[:, None, None, None], y)
    return y.clamp(0, 1) * 2 - 1


def generated_look(x: torch.Tensor, gen: torch.Generator, share: float, contrast: float = 2.0,
                   noise: float = 0.12) -> torch.Tensor:
    """What a fine-tuned diffusion model's copy of a patient shows beyond a re-take (the missed copies of a
    full fine-tune: the patient's anatomy at up to twice the contrast, darker, with blotchy low-frequency noise), on a
    ``share`` of the images: contrast about the image mean x log-uniform [0.7, ``contrast``], offset [-0.25, 0.1],
    gamma [0.6, 1.6], and a Gaussian noise field drawn at 4 to 16 px and smoothed up (std up to ``noise``). ``x`` in
    [-1, 1]."""
    n, _, h, w = x.shape

    def u(lo, hi):
        return (lo + (hi - lo) * torch.rand(n, generator=gen))[:, None, None, None]

    y = (x + 1) / 2
    mean = y.mean((1, 2, 3), keepdim=True)
    y = (mean + torch.exp(u(np.log(0.7), np.log(contrast))) * (y - mean) + u(-0.25, 0.1)).clamp(0, 1) ** u(0.6, 1.6)
    coarse = int(torch.randint(4, 17, (1,), generator=gen))
    field = torch.randn(n, 1, coarse, coarse, generator=gen)
    y = y + u(0.0, noise) * F.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)
    on = (torch.rand(n, generator=gen) < share)[:, None, None, None]
    return torch.where(on, y.clamp(0, 1) * 2 - 1, x)


def copy_views(seeds: list[int], size: int, variants: int, seed: int) -> torch.Tensor:
    """V x N x 1 x size x size: each chest patient re-acquired ``variants`` times (the first view is the original
    render); brain patients (no re-acquisition model) repeat their original and get their variety from
    ``augment``."""
    rng = np.random.default_rng(seed)
    chest = [render_phantoms(seeds, RENDER_SIZE)[0]] + [rerender(seeds, rng, RENDER_SIZE)
                                                        for _ in range(variants - 1)]
    return torch.stack([to_tensor(c, size) for c in chest])


# --------------------------------------------------------------------------------------------------- training
class DomainTrainer(torch.nn.Module):
    """The encoder plus what only training needs: the label heads and the reconstruction decoder."""

    def __init__(self, net: MetricNet):
        super().__init__()
        self.net = net
        dim = net.config.dim
        self.heads = torch.nn.Linear(dim, sum(HEADS.values()))
        up = torch.nn.Upsample(scale_factor=2)
        self.decoder = torch.nn.Sequential(  # the features -> a RECON_SIZE image
            torch.nn.Linear(dim, 32 * 4 * 4), torch.nn.Unflatten(1, (32, 4, 4)),
            up, torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.SiLU(),
            up, torch.nn.Conv2d(32, 16, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(16, 1, 3, padding=1))

    def forward(self, x):
        features = self.net(x)
        return self.heads(features), self.decoder(features)


def shrink(x: torch.Tensor) -> torch.Tensor:
    """The reconstruction target: the image at RECON_SIZE."""
    return F.adaptive_avg_pool2d(x, RECON_SIZE)


def head_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    total, start = 0.0, 0
    for i, classes in enumerate(HEADS.values()):
        target = labels[:, i]
        if (target != IGNORE).any():
            total = total + F.cross_entropy(logits[:, start:start + classes], target, ignore_index=IGNORE)
        start += classes
    return total


@torch.no_grad()
def head_accuracy(model: DomainTrainer, images: torch.Tensor, labels: torch.Tensor) -> dict:
    logits = torch.cat([model(images[i:i + 256])[0] for i in range(0, len(images), 256)])
    out, start = {}, 0
    for i, (name, classes) in enumerate(HEADS.items()):
        target = labels[:, i]
        known = target != IGNORE
        predicted = logits[:, start:start + classes].argmax(1)
        # the majority class shows what an accuracy is worth on an unbalanced label
        majority = float((target[known] == target[known].mode().values).float().mean())
        out[name] = {"accuracy": round(float((predicted[known] == target[known]).float().mean()), 4),
                     "majority_class": round(majority, 4), "n": int(known.sum())}
        start += classes
    return out


def optimise(name: str, module: torch.nn.Module, batch_loss, args) -> dict:
    """AdamW on a one-cycle schedule of ``--steps`` steps, until its end, ``--stop-after`` steps or ``--max-minutes``;
    ``batch_loss()`` draws a batch and returns its loss. The steps done, minutes and final loss, for the provenance.
    A run that stopped on its time budget is repeated on any machine by ``--stop-after`` its steps."""
    opt = torch.optim.AdamW(module.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
    steps, start, losses = 0, time.perf_counter(), []
    last = min(args.steps, args.stop_after or args.steps)
    while steps < last and time.perf_counter() - start < args.max_minutes * 60:
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        steps += 1
        losses.append(loss.item())
        if steps % 100 == 0:
            print(f"{name} step {steps}: loss {np.mean(losses[-100:]):.4f} "
                  f"({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    module.eval()
    return {"steps": steps, "minutes": round((time.perf_counter() - start) / 60, 2),
            "final_loss": round(float(np.mean(losses[-100:])), 4)}


def train_domain(args, train, evaluation) -> tuple[MetricNet, dict]:
    images, labels, _ = train
    torch.manual_seed(args.seed)
    model = DomainTrainer(MetricNet(MetricNetConfig("domain", size=args.size)))
    gen = torch.Generator().manual_seed(args.seed)

    def batch_loss():
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        x = images[idx]
        logits, recon = model(x)
        return head_losses(logits, labels[idx]) + args.recon_weight * F.mse_loss(recon, shrink(x))

    record = optimise("domain", model, batch_loss, args)
    eval_images, eval_labels, _ = evaluation
    with torch.no_grad():
        recon = torch.cat([model(eval_images[i:i + 256])[1] for i in range(0, len(eval_images), 256)])
        recon_mse = float(F.mse_loss(recon, shrink(eval_images)))
    measured = {"heads": head_accuracy(model, eval_images, eval_labels),
                "reconstruction_mse_16px": round(recon_mse, 5),
                "pixel_variance_16px": round(float(shrink(eval_images).var()), 5)}
    return model.net, {**record, "measured_on_unseen_public": measured}


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(-torch.inf)
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


@torch.no_grad()
def copy_separation(net: MetricNet, seeds: list[int], size: int, seed: int, fpr: float = 0.01) -> dict:
    """On unseen public chest patients: each patient's original image is the 'training set'; a re-acquired,
    augmented image of each is the copy. AUC of copy-vs-original similarities against every other patient's,
    top-1 identification, and the recall at the tau where a share ``fpr`` of copies' nearest *other* patient
    lies above it."""
    gen = torch.Generator().manual_seed(seed)
    originals = to_tensor(render_phantoms(seeds, RENDER_SIZE)[0], size)
    copies = augment(to_tensor(rerender(seeds, np.random.default_rng(seed), RENDER_SIZE), size), gen)
    a, b = F.normalize(net(originals), dim=1), F.normalize(net(copies), dim=1)
    sim = b @ a.T
    positive = sim.diagonal()
    negative = sim.masked_fill(torch.eye(len(sim), dtype=torch.bool), -torch.inf)
    nearest_other = negative.max(1).values
    negatives = negative[torch.isfinite(negative)]
    auc = float((positive[:, None] > negatives[None, :]).float().mean())
    tau = float(torch.quantile(nearest_other, 1 - fpr))
    top1 = float((sim.argmax(1) == torch.arange(len(sim))).float().mean())
    return {"patients": len(seeds), "auc": round(auc, 5), "top1": round(top1, 4),
            "tau_at_fpr": round(tau, 4), "fpr": fpr, "recall_at_tau": round(float((positive > tau).float().mean()), 4),
            "copy_similarity_median": round(float(positive.median()), 4),
            "other_similarity_median": round(float(negatives.median()), 4)}


def train_copy_detector(args, train, evaluation) -> tuple[MetricNet, dict]:
    images, _, chest_seeds = train
    n_chest = len(chest_seeds)
    print(f"re-acquiring {n_chest} chest patients {args.variants - 1} times", flush=True)
    views = copy_views(chest_seeds, args.size, args.variants, args.seed)
    torch.manual_seed(args.seed)
    net = MetricNet(MetricNetConfig("copy_detector", size=args.size))
    gen = torch.Generator().manual_seed(args.seed + 1)
    half = args.batch_size // 2

    def batch_loss():
        idx = torch.randperm(len(images), generator=gen)[:half]
        pick = torch.randint(0, args.variants, (2, half), generator=gen)
        pairs = []
        for v in range(2):
            x = images[idx].clone()
            chest = idx < n_chest
            x[chest] = views[pick[v, chest], idx[chest]]
            if args.generated_look:
                x = generated_look(x, gen, args.generated_look)
            pairs.append(augment(x, gen))
        return nt_xent(net(pairs[0]), net(pairs[1]), args.temperature)

    record = optimise("copy_detector", net, batch_loss, args)
    return net, {**record, "measured_on_unseen_public": copy_separation(net, evaluation[2], args.size, args.seed + 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "data" / "metric_nets")
    ap.add_argument("--only", choices=("domain", "copy_detector"), default=None)
    ap.add_argument("--patients", type=int, default=2000, help="public training patients per modality")
    ap.add_argument("--eval-patients", type=int, default=300, help="further public patients per modality, unseen")
    ap.add_argument("--size", type=int, default=32, help="network input side (images are rendered at 64)")
    ap.add_argument("--steps", type=int, default=3000, help="length of each network's one-cycle schedule")
    ap.add_argument("--max-minutes", type=float, default=7.0, help="time budget of each network's training")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop after this many steps of the --steps schedule (what a time budget stopped elsewhere)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--recon-weight", type=float, default=1.0, help="domain: weight of the reconstruction loss")
    ap.add_argument("--variants", type=int, default=4, help="copy detector: acquisitions per chest patient")
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--generated-look", type=float, default=0.0, metavar="SHARE",
                    help="copy detector: the share of views drawn with a fine-tuned model's copy look (wide contrast "
                         "and exposure, coarse noise); 0: none")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    command = "python pipelines/train_metric_nets.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    train = public_split(0, args.patients, args.size)
    evaluation = public_split(args.patients, args.eval_patients, args.size)
    print(f"public cohort: {len(train[0])} training, {len(evaluation[0])} evaluation images "
          f"({(time.perf_counter() - t0) / 60:.1f} min to render)", flush=True)
    trainers = {"domain": train_domain, "copy_detector": train_copy_detector}
    for kind in [args.only] if args.only else list(trainers):
        net, record = trainers[kind](args, train, evaluation)
        provenance = {
            "command": command, "seed": args.seed, "kind": kind,
            "data": {"cohort": "public (memcontrol.data.cohorts.SEEDS public_chest, public_brain)",
                     "training_patients_per_modality": args.patients, "training_indices": [0, args.patients],
                     "evaluation_indices": [args.patients, args.patients + args.eval_patients], "size": args.size},
            "batch_size": args.batch_size, "lr": args.lr, "schedule_steps": args.steps, **record,
            "device_name": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
        }
        if kind == "domain":
            provenance["recon_weight"] = args.recon_weight
        else:
            provenance.update(variants=args.variants, temperature=args.temperature,
                              generated_look=args.generated_look)
        save_metric_net(net, args.out / kind, provenance)
        print(json.dumps(provenance, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
