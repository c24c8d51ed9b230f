"""Inference-time mitigation of Wen et al., "Detecting, Explaining, and Mitigating Memorization in Diffusion Models"
(ICLR 2024): before sampling, each prompt's text embedding is optimised to lower its text-conditional noise norm
|| eps(x_T, e) - eps(x_T, e_empty) || at the sampler's first step, the quantity that is large for memorized prompts
(``memcontrol.metrics.noise_norm``); the images are then sampled from the adjusted embedding.

Each prompt is optimised on ``starts`` fixed starts x_T (seeded by the prompt and the sampling seed, apart from the
starts the samples themselves use): every iteration measures the mean norm over them and takes one Adam step on the
embedding; a prompt stops as soon as its norm falls below the target, keeping the embedding that reached it. The published settings (the authors' script) are AdamW
with learning rate 0.05 for at most 10 iterations at the first step, on the starts of the prompt's 4 images, the
start-of-text position left as it is, and an absolute target l_target chosen per model;
since the norm's scale depends on the model (latent size, training), the default target here is relative: half of
the prompt's starting norm. Cost: up to ``steps`` UNet forward and backward passes on a batch of 2 x ``starts`` per prompt.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..config.base import Section
from ..metrics.noise_norm import _encode, text_noise_gap
from ..sampling import noise_seed, scheduler_for

# Optimisation starts are drawn from seeds far from those of the samples (``sampling.noise_seed(p, seed, j)``).
SEED_OFFSET = 1_000_003


class WenConfig(Section):
    """``baselines.wen``: ``steps`` (iteration cap), ``lr`` (Adam), ``starts`` (noise starts per prompt the norm is
    averaged over), ``target`` (absolute noise-norm target,
    Wen et al.'s l_target) or, when unset, ``target_ratio`` (stop below this fraction of the prompt's own starting
    norm)."""

    steps: int = Field(10, ge=1)
    lr: float = Field(0.05, gt=0)
    starts: int = Field(4, ge=1)
    target: float | None = Field(None, gt=0)
    target_ratio: float = Field(0.5, gt=0, lt=1)


def _starts(prompts: list[str], seed: int, n: int, shape: tuple) -> torch.Tensor:
    """n starts per prompt, start-major: start 0 of every prompt, then start 1 of every prompt..."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
        noise_seed(p, seed + SEED_OFFSET, j))) for j in range(n) for p in prompts])


def adjust_prompt_embeds(pipe, prompts: list[str], cfg: WenConfig | None = None, num_inference_steps: int = 20,
                         sampler: str | None = None, seed: int = 0, batch_size: int = 8) -> tuple[torch.Tensor, dict]:
    """Adjusted text embeddings of ``prompts`` (P x L x D, for ``generate_samples(prompt_embeds=...)``) and, per
    prompt, the noise norm at the first and at the last iteration and the iterations taken (``start``, ``end``,
    ``iterations``). The UNet's weights are not touched (gradients are taken for the embeddings only)."""
    cfg = cfg or WenConfig()
    unet = pipe.unet
    ref = next(unet.parameters())
    sched = scheduler_for(pipe, sampler)
    sched = type(sched).from_config(sched.config)
    sched.set_timesteps(num_inference_steps, device=ref.device)
    t = sched.timesteps[0]
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    cond, empty = _encode(pipe, prompts)
    out, report = [], {"start": [], "end": [], "iterations": []}
    for begin in range(0, len(prompts), batch_size):
        chunk = prompts[begin:begin + batch_size]
        embeds = cond[begin:begin + len(chunk)].detach().to(ref.device, torch.float32).clone().requires_grad_(True)
        uncond = empty.to(ref.device, ref.dtype).expand(len(chunk), -1, -1)
        opt = torch.optim.AdamW([embeds], lr=cfg.lr)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=ref.device)
        kept = embeds.detach().clone()
        x = _starts(chunk, seed, cfg.starts, shape).to(ref.device, ref.dtype) * sched.init_noise_sigma
        model_in = sched.scale_model_input(x, t)
        start = end = iterations = None
        for it in range(cfg.steps + 1):
            text = torch.cat([embeds.to(ref.dtype).repeat(cfg.starts, 1, 1), uncond.repeat(cfg.starts, 1, 1)])
            gap = text_noise_gap(unet, model_in, t, text, sched)[0].view(cfg.starts, len(chunk)).mean(0)
            value = gap.detach()
            if it == 0:
                start, end = value.clone(), value.clone()
                iterations = torch.zeros(len(chunk), dtype=torch.long, device=ref.device)
                limit = torch.full_like(value, cfg.target) if cfg.target is not None else cfg.target_ratio * value
            end = torch.where(done, end, value)
            reached = (value < limit) & ~done
            kept[reached] = embeds.detach()[reached]
            done |= reached
            if done.all() or it == cfg.steps:
                break
            iterations += (~done).long()
            (grad,) = torch.autograd.grad(gap.masked_fill(done, 0).sum(), embeds)
            grad[:, 0] = 0  # the start-of-text position stays as encoded, as in the authors' code
            embeds.grad = grad
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                embeds[done] = kept[done]  # a prompt that reached its target keeps that embedding
        out.append(embeds.detach().to(cond.dtype))
        report["start"].append(start.cpu())
        report["end"].append(end.cpu())
        report["iterations"].append(iterations.cpu())
    return torch.cat(out), {k: torch.cat(v) for k, v in report.items()}
