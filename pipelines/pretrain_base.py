"""Pretrain the bundled base model: a tiny Stable-Diffusion-architecture pipeline on a *public* phantom cohort.

    python pipelines/pretrain_base.py --out data/base_model            # CPU: about 30 minutes on 2 cores
    python pipelines/pretrain_base.py --out data/base_model --device cuda --scale 4
    python pipelines/pretrain_base.py --init data/base_model --out /tmp/longer --unet-steps 3000   # continue

Stages: (1) the VAE learns to reconstruct the public images (L1 + a small KL term), and its latent scaling factor
is set so latents have unit variance, as Stable Diffusion's 0.18215 does; (2) the UNet learns the noise-prediction
objective on cached latents through memcontrol's own inner loop (every parameter unfrozen). With ``--init`` an
existing base folder is trained further: its VAE (and so its latent space) is kept and only stage 2 runs, on a
fresh warm-up and cosine schedule. The text encoder stays
at its seeded random initialisation, frozen, as Stable Diffusion keeps CLIP frozen: distinct reports still map to
distinct embeddings. The public cohort uses patient seeds that the private cohorts never use
(``memcontrol.data.cohorts``), so nothing the default job fine-tunes on was seen here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memcontrol.data.cohorts import public_cohort  # noqa: E402
from memcontrol.masks import Mask  # noqa: E402
from memcontrol.models import load_pipeline, save_pipeline, tiny_pipeline  # noqa: E402
from memcontrol.training import InMemoryDataset, TrainConfig, cache_training_data, finetune  # noqa: E402

CHECKSUMS = "CHECKSUMS.sha256"


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, device: str, seed: int,
              max_seconds: float = float("inf"), kl_weight: float = 1e-6) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    bar = tqdm(range(steps), desc="VAE", unit="step")
    start = time.perf_counter()
    for _ in bar:
        if time.perf_counter() - start > max_seconds:
            break
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = images[idx].to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        loss = (recon - x).abs().mean() + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False).to("cpu")
    return losses


@torch.no_grad()
def set_latent_scale(vae, images: torch.Tensor) -> float:
    latents = torch.cat([vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, len(images), 64)])
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    return scale


def write_checksums(folder: Path) -> Path:
    lines = []
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != CHECKSUMS and f.suffix != ".md":
            lines.append(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(folder).as_posix()}")
    (folder / CHECKSUMS).write_text("\n".join(lines) + "\n")
    return folder / CHECKSUMS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "data" / "base_model")
    ap.add_argument("--init", type=Path, default=None,
                    help="a base model folder to train further (its VAE is kept; only the UNet stage runs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--patients", type=int, default=3000, help="public cohort size per modality")
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--unet-steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply both step counts (use >1 on a GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=float("inf"),
                    help="time budget of each stage; a stage that reaches it stops early (the steps done are recorded)")
    args = ap.parse_args(argv)
    start = time.time()
    torch.manual_seed(args.seed)

    images, captions = public_cohort(args.patients, resolution=64)
    print(f"public cohort: {len(images)} images")
    if args.init is not None:
        pipe = load_pipeline(args.init, option="--init")
        vae_losses, scale = [], float(pipe.vae.config.scaling_factor)
        earlier = args.init / "provenance.json"
        previous = json.loads(earlier.read_text()) if earlier.is_file() else None
    else:
        pipe, previous = tiny_pipeline(seed=args.seed), None
        vae_losses = train_vae(pipe.vae, images, int(args.vae_steps * args.scale), args.batch_size, 1e-3,
                               args.device, args.seed, max_seconds=args.max_minutes * 60)
        scale = set_latent_scale(pipe.vae.to(args.device), images.to(args.device))
        pipe.vae.to("cpu")
        print(f"VAE: final L1+KL {sum(vae_losses[-50:]) / 50:.4f}, latent scaling factor {scale:.4f}")

    dataset = InMemoryDataset(images, captions)
    cached = cache_training_data(pipe, dataset, cache_dir=None, device=args.device)
    cfg = TrainConfig(steps=int(args.unet_steps * args.scale), lr=5e-4, batch_size=args.batch_size, warmup=100,
                      schedule="cosine", caption_dropout=0.1, seed=args.seed, device=args.device)
    unet_start = time.perf_counter()

    def time_budget(step, unet):
        if time.perf_counter() - unet_start > args.max_minutes * 60:
            return f"time budget of {args.max_minutes} minutes reached at step {step}"
        return None

    result = finetune(pipe, Mask.full_unet(pipe.unet), cached, cfg, callback=time_budget, callback_every=50)
    if result.status == "failed":
        print(f"UNet pretraining failed: {result.reason}", file=sys.stderr)
        return 1
    pipe.unet = result.applied.unet.eval().requires_grad_(False)
    args.out.mkdir(parents=True, exist_ok=True)
    save_pipeline(pipe.to("cpu"), args.out)
    write_checksums(args.out)
    minutes = (time.time() - start) / 60
    provenance = {
        "command": "python pipelines/pretrain_base.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "minutes": round(minutes, 1), "device": args.device,
        "device_name": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"),
        "torch": torch.__version__, "public_images": len(images), "vae_steps": len(vae_losses),
        "unet_steps": result.steps, "final_unet_loss": sum(result.losses[-50:]) / max(1, len(result.losses[-50:])),
        "latent_scaling_factor": scale,
    }
    if previous is not None:
        provenance["continues"] = previous
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=2))
    print(json.dumps(provenance, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
