"""Speed of memcontrol's inner loop (``memcontrol.training.finetune``).

    python bench/train_step.py                 # tiny preset: cached latents vs encoding every step, as a ratio
    python bench/train_step.py --gpu-sd15      # CUDA: a UNet of SD 1.5's config (random weights), 64x64 latents,
                                               # batch 8, bf16 autocast: LoRA / bias+norm / full fine-tuning

Tiny mode trains LoRA on every attention site of the tiny preset twice with the same settings: once from the
training cache (``cache_training_data``: latents and text embeddings computed once), once encoding each batch with
the VAE and the text encoder at every step, the way diffusers' ``train_text_to_image.py`` does (images already in
memory in both runs, so the difference is the encoders' work). Steps per second are one over the median step time,
after a few warm-up steps, over alternating repeats. GPU mode reports steps per second and peak GPU memory (``torch.cuda.max_memory_allocated``, which includes
the frozen base UNet that ``finetune`` keeps beside its trained copy) for three masks, and the LoRA run once more
with random-weight SD 1.5 VAE and CLIP-L text encoders encoding 512x512 images at every step; without CUDA it says
so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memcontrol.masks import Mask, adaptable_sites  # noqa: E402
from memcontrol.training import TrainConfig, finetune  # noqa: E402


class StepClock:
    """A ``finetune`` callback that records when each step ends (synchronising CUDA first)."""

    def __init__(self):
        self.times = []

    def __call__(self, step, unet):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def durations(self, warmup: int) -> list[float]:
        t = self.times[warmup:]
        return [b - a for a, b in zip(t, t[1:])]

    def steps_per_second(self, warmup: int) -> float:
        t = self.times[warmup:]
        return (len(t) - 1) / (t[-1] - t[0])


class EncodeEveryStep:
    """The data source of diffusers' example script: each batch goes through the VAE (a posterior sample) and the
    text encoder when it is drawn. Same interface as ``CachedData``."""

    def __init__(self, pipe, dataset):
        from memcontrol.training import encode_prompts

        self.pipe, self.dataset = pipe, dataset
        self.empty_embed = encode_prompts(pipe, [""]).float().cpu()

    def __len__(self):
        return len(self.dataset)

    @torch.no_grad()
    def batch(self, indices):
        from memcontrol.training import encode_prompts

        items = [self.dataset[int(i)] for i in indices]
        vae = self.pipe.vae
        pixels = torch.stack([it["pixel_values"] for it in items]).to(vae.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        return latents.float(), encode_prompts(self.pipe, [it["caption"] for it in items]).float()


class EncodeEveryStepSD15:
    """GPU mode's encode-every-step source: 512x512 images through a VAE of SD 1.5's config and token ids through a
    text encoder of CLIP ViT-L/14's config (random weights, bf16), as each batch is drawn."""

    def __init__(self, n: int, device: str = "cuda"):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel

        gen = torch.Generator().manual_seed(1)
        with torch.device(device):
            self.vae = AutoencoderKL(**SD15_VAE_CONFIG).to(torch.bfloat16).eval()
            self.text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG)).to(torch.bfloat16).eval()
        self.pixels = torch.rand(n, 3, 512, 512, generator=gen).mul(2).sub(1)
        self.ids = torch.randint(0, CLIP_L_TEXT_CONFIG["vocab_size"], (n, 77), generator=gen)
        self.device = device
        self.empty_embed = self._embed(self.ids[:1]).cpu()

    def __len__(self):
        return len(self.ids)

    @torch.no_grad()
    def _embed(self, ids):
        return self.text_encoder(ids.to(self.device))[0].float()

    @torch.no_grad()
    def batch(self, indices):
        pixels = self.pixels[indices].to(self.device, torch.bfloat16)
        latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
        return latents.float(), self._embed(self.ids[indices])


# Stable Diffusion 1.5's VAE and text encoder (CLIP ViT-L/14) configs, for GPU mode's encoders.
SD15_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu",
                       scaling_factor=0.18215)
CLIP_L_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                          num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768)


def attention_lora(unet, rank: int = 4) -> Mask:
    return Mask([s for s in adaptable_sites(unet, "lora") if s.kind == "attention"], "lora",
                {"rank": rank, "alpha": rank})


def run_tiny(args) -> dict:
    import tempfile

    from memcontrol.data import patient_seeds, render_phantoms
    from memcontrol.models import tiny_pipeline
    from memcontrol.training import InMemoryDataset, cache_training_data

    pixels, reports = render_phantoms(patient_seeds(7, args.items), 64)
    images = torch.from_numpy(pixels).mul(2).sub(1)[:, None].expand(-1, 3, -1, -1).contiguous()
    dataset = InMemoryDataset(images, reports)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = tiny_pipeline(seed=0, words=None, tokenizer_dir=Path(tmp) / "tok").to(args.device)
        t0 = time.perf_counter()
        cached = cache_training_data(pipe, dataset, Path(tmp) / "cache", progress=False)
        cache_seconds = time.perf_counter() - t0
    mask = attention_lora(pipe.unet)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-4, seed=0)
    sources = {"cached": cached, "encode_every_step": EncodeEveryStep(pipe, dataset)}
    durations = {name: [] for name in sources}
    # Alternating repeats, and the median step time over all of them: on a shared CPU, bursts of other work would
    # otherwise decide the ratio.
    for _ in range(args.repeats):
        for name, source in sources.items():
            clock = StepClock()
            result = finetune(pipe, mask, source, cfg, callback=clock, callback_every=1, progress=False)
            assert result.status == "ok", result.reason
            durations[name] += clock.durations(args.warmup)
    rates = {name: 1.0 / statistics.median(values) for name, values in durations.items()}
    out = {"mode": "tiny", "device": str(args.device), "threads": torch.get_num_threads(), "items": args.items,
           "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats, "mask": mask.describe(),
           "cache_seconds": round(cache_seconds, 3),
           "cached_steps_per_s": round(rates["cached"], 3),
           "encode_every_step_steps_per_s": round(rates["encode_every_step"], 3),
           "speedup": round(rates["cached"] / rates["encode_every_step"], 3)}
    print(f"tiny preset on {out['device']} ({out['threads']} threads), batch {args.batch_size}, {mask.describe()}")
    print(f"| data source          | steps/s |\n|---|---|\n| cached latents       | {out['cached_steps_per_s']:.2f} |\n"
          f"| encode every step    | {out['encode_every_step_steps_per_s']:.2f} |")
    print(f"cached / encode-every-step: {out['speedup']:.2f}x  (building the cache once: {cache_seconds:.2f} s for "
          f"{args.items} images)")
    return out


def run_gpu_sd15(args) -> dict | None:
    if not torch.cuda.is_available():
        print("gpu-sd15: skipped, CUDA is not available on this machine")
        return None
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from memcontrol.models import SD15_UNET_CONFIG, SD_SCHEDULER_CONFIG
    from memcontrol.training import CachedData

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    unet.requires_grad_(False)
    pipe = SimpleNamespace(unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG))
    n, gen = 64, torch.Generator().manual_seed(0)
    cached = CachedData(torch.randn(n, 4, 64, 64, generator=gen), torch.randn(n, 77, 768, generator=gen),
                        torch.randn(1, 77, 768, generator=gen), [str(i) for i in range(n)], [""] * n)
    cfg = TrainConfig(steps=args.gpu_steps, batch_size=8, lr=1e-5, mixed_precision="bf16", seed=0)
    base_bytes = torch.cuda.memory_allocated()
    masks = {"lora r4, all attention": attention_lora(unet),
             "bitfit_norm, all sites": Mask(adaptable_sites(unet, "bitfit_norm"), "bitfit_norm"),
             "full fine-tuning": Mask.full_unet(unet)}
    runs = [(name, mask, lambda: cached) for name, mask in masks.items()]
    # The same LoRA run fed by encoders at every step: what the cache saves at SD 1.5's scale. The encoders are
    # built only for this run, so that the other rows' peak memory does not include them.
    runs.append(("lora r4, all attention, encode every step", masks["lora r4, all attention"],
                 lambda: EncodeEveryStepSD15(n)))
    rows = []
    for name, mask, make_source in runs:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        source = make_source()
        clock = StepClock()
        result = finetune(pipe, mask, source, cfg, callback=clock, callback_every=1, progress=False)
        peak = torch.cuda.max_memory_allocated()
        row = {"mask": name, "status": result.status, "trainable": result.applied.trainable,
               "trainable_percent": round(result.applied.percent, 3),
               "steps_per_s": round(clock.steps_per_second(args.warmup), 3) if result.status == "ok" else None,
               "peak_gib": round(peak / 2**30, 2), "peak_above_base_gib": round((peak - base_bytes) / 2**30, 2)}
        rows.append(row)
        del result, source
    cached_rate, encoding_rate = rows[0]["steps_per_s"], rows[-1]["steps_per_s"]
    speedup = cached_rate / encoding_rate if cached_rate and encoding_rate else None
    print(f"SD 1.5 UNet (random weights) on {torch.cuda.get_device_name()}, 64x64 latents, batch 8, bf16 autocast, "
          f"{args.gpu_steps} steps ({args.warmup} warm-up); base UNet resident: {base_bytes / 2**30:.2f} GiB")
    print("| mask | trainable | steps/s | peak GiB | peak above base GiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mask']} | {r['trainable']:,} ({r['trainable_percent']}%) | {r['steps_per_s']} | "
              f"{r['peak_gib']} | {r['peak_above_base_gib']} |")
    if speedup:
        print(f"cached / encode-every-step (VAE at 512x512 + CLIP-L, bf16): {speedup:.2f}x")
    return {"mode": "gpu-sd15", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "steps": args.gpu_steps, "base_gib": round(base_bytes / 2**30, 2), "rows": rows,
            "cached_over_encode_every_step": round(speedup, 3) if speedup else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-sd15", action="store_true", help="the SD 1.5-size GPU benchmark instead of tiny mode")
    ap.add_argument("--device", default="cpu", help="tiny mode: where to train (cpu, cuda)")
    ap.add_argument("--steps", type=int, default=20, help="tiny mode: steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="tiny mode: alternating runs per data source")
    ap.add_argument("--batch-size", type=int, default=8, help="tiny mode: batch size")
    ap.add_argument("--items", type=int, default=32, help="tiny mode: training images")
    ap.add_argument("--gpu-steps", type=int, default=40, help="GPU mode: steps per mask")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    result = run_gpu_sd15(args) if args.gpu_sd15 else run_tiny(args)
    if result is not None and args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
