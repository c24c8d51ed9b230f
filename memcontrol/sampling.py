"""Seeded image generation from a Stable Diffusion pipeline, for audits and search trials.

Every sample has its own starting noise, drawn from a generator seeded by ``noise_seed(prompt, seed, j)`` for the
j-th sample of a prompt: the same prompt with the same seed gives the same image whatever the batch it lands in or
the other prompts of the call, and different prompts start from independent noise.
"""

from __future__ import annotations

import hashlib

import torch
from tqdm.auto import tqdm

from .errors import ConfigError

SAMPLERS = ("ddim", "dpm")


def noise_seed(prompt: str, seed: int, j: int) -> int:
    """The noise seed of sample j of ``prompt``. It depends on the prompt because FD and KID assume independent
    samples: with one seed shared by every prompt, a model that follows its prompts weakly draws nearly the same
    image for all of them, and its sample set looks far less diverse than the model is."""
    digest = hashlib.sha256(f"{seed + j}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_noise(pipe, seed: int, height: int, width: int) -> torch.Tensor:
    """Unscaled N(0, I) starting latents of one sample (the pipeline scales them by init_noise_sigma)."""
    shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)


def scheduler_for(pipe, sampler: str | None):
    """A scheduler built from the pipeline's own config: its noise schedule and prediction type are kept."""
    if sampler is None:
        return pipe.scheduler
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    kinds = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
    if sampler not in kinds:
        raise ConfigError(f"unknown sampler '{sampler}' (use one of: {', '.join(SAMPLERS)}, or leave it out)")
    return kinds[sampler].from_config(pipe.scheduler.config)


@torch.no_grad()
def generate_samples(pipe, prompts: list[str], n_per_prompt: int = 1, steps: int = 20, seed: int = 0,
                     guidance_scale: float = 7.5, batch_size: int = 8, sampler: str | None = None,
                     resolution: int | None = None, prompt_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Images N x 3 x H x W in [-1, 1], prompt-major: prompt 0's samples first, then prompt 1's, and so on.

    ``prompt_embeds`` (P x L x D, one per prompt) conditions on these text embeddings instead of the prompts' own
    (an inference-time mitigation's adjusted embeddings); the prompts still seed the starting noise, so the same
    prompt starts from the same noise with or without them.

    ``sampler`` swaps in DDIM or DPM-Solver++ (good with 10-25 steps) built from the pipeline's scheduler config for
    this call only; ``None`` keeps the pipeline's scheduler.
    """
    if n_per_prompt < 1:
        raise ConfigError(f"n_per_prompt must be at least 1, got {n_per_prompt}")
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if prompt_embeds is not None and len(prompt_embeds) != len(prompts):
        raise ConfigError(f"prompt_embeds holds {len(prompt_embeds)} embeddings for {len(prompts)} prompts")
    jobs = [(i, noise_seed(p, seed, j)) for i, p in enumerate(prompts) for j in range(n_per_prompt)]
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    original = pipe.scheduler
    pipe.scheduler = scheduler_for(pipe, sampler)
    pipe.set_progress_bar_config(disable=True)
    out = []
    try:
        for start in tqdm(range(0, len(jobs), batch_size), desc="generating", unit="batch", leave=False):
            chunk = jobs[start:start + batch_size]
            latents = torch.stack([sample_noise(pipe, s, size, size) for _, s in chunk]).to(device, dtype)
            which = [i for i, _ in chunk]
            text = ({"prompt": [prompts[i] for i in which]} if prompt_embeds is None
                    else {"prompt_embeds": prompt_embeds[which].to(device, dtype)})
            images = pipe(**text, latents=latents, num_inference_steps=steps,
                          guidance_scale=guidance_scale, height=size, width=size, output_type="pt").images
            out.append((images.float().cpu() * 2 - 1).clamp(-1, 1))
    finally:
        pipe.scheduler = original
    return torch.cat(out) if out else torch.zeros(0, 3, size, size)
