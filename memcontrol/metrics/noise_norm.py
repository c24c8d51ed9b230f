"""Text-conditional noise norm (Wen et al., "Detecting, Explaining, and Mitigating Memorization in Diffusion Models",
ICLR 2024): a memorization score per prompt that needs no training images.

For prompt p and a seeded start x_T ~ N(0, I), the sampler runs its first ``steps`` steps; at each step t the UNet
predicts the noise with the prompt's text embedding and with the empty prompt's, and the score is the mean over those
steps of || eps(x_t, e_p) - eps(x_t, e_empty) ||_2 (the L2 norm over all latent elements). The trajectory follows
the classifier-free-guided sampler (or the conditional one with ``guidance_scale <= 1``). A memorized prompt pulls
the prediction far from the unconditional one; published detection AUC is 0.96 from a single step, which costs one
UNet call on a batch of two per prompt.

Models that predict the clean sample or the velocity are converted to the noise they imply, so that the score means
the same thing for every prediction type.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError


def _param(module: torch.nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _as_epsilon(output, sample, t, scheduler):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return output
    a = scheduler.alphas_cumprod.to(sample.device)[int(t)].to(sample.dtype)
    if kind == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * sample
    if kind == "sample":
        return (sample - a.sqrt() * output) / (1 - a).sqrt()
    raise ConfigError(f"unknown prediction type '{kind}' in the scheduler config")


def _encode(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    device = _param(pipe.text_encoder).device
    with torch.no_grad():
        cond = pipe.encode_prompt(list(prompts), device, 1, False)[0]
        empty = pipe.encode_prompt([""], device, 1, False)[0]
    return cond, empty


def text_noise_gap(unet, model_in: torch.Tensor, t, text: torch.Tensor, scheduler):
    """|| eps(x_t, e_p) - eps(x_t, e_empty) ||_2 per item of ``model_in`` (B x C x h x w, already scaled for
    ``t``), with ``text`` the prompts' embeddings followed by as many empty-prompt embeddings (2B x L x D); also the
    raw conditional and unconditional outputs. Differentiable in ``text``: Wen et al.'s mitigation descends it."""
    out = unet(torch.cat([model_in, model_in]), t, encoder_hidden_states=text).sample
    out_c, out_u = out.chunk(2)
    eps_c = _as_epsilon(out_c, model_in, t, scheduler)
    eps_u = _as_epsilon(out_u, model_in, t, scheduler)
    return (eps_c - eps_u).flatten(1).float().norm(dim=1), out_c, out_u


@torch.no_grad()
def noise_norm(model, prompts, steps: int = 1, seed: int = 0, num_inference_steps: int = 50,
               guidance_scale: float = 7.5, samples_per_prompt: int = 1, batch_size: int = 16, *,
               uncond_embeds: torch.Tensor | None = None, scheduler=None, progress: bool = True) -> torch.Tensor:
    """Per-prompt noise norm, a float32 tensor of length len(prompts).

    ``model`` is a ``StableDiffusionPipeline`` with ``prompts`` a list of strings, or a UNet (peft-wrapped or not)
    with ``prompts`` a tensor of text embeddings P x L x D, ``uncond_embeds`` the empty prompt's 1 x L x D and
    ``scheduler`` the pipeline's scheduler (the form a training loop has at hand). Sample j of every prompt starts
    from the noise seeded ``seed + j``: prompts are compared on the same starts.
    """
    if steps < 1 or steps > num_inference_steps:
        raise ConfigError(f"noise norm steps must be between 1 and num_inference_steps ({num_inference_steps})")
    if hasattr(model, "unet"):
        unet, scheduler = model.unet, scheduler or model.scheduler
        cond, empty = _encode(model, prompts)
    else:
        unet, cond, empty = model, prompts, uncond_embeds
        if not isinstance(cond, torch.Tensor) or empty is None or scheduler is None:
            raise ConfigError("noise_norm on a bare UNet needs prompt embeddings as a tensor, uncond_embeds and "
                              "the scheduler")
    ref = _param(unet)
    cond, empty = cond.to(ref.device, ref.dtype), empty.to(ref.device, ref.dtype)
    config = unet.config
    latent_shape = (config.in_channels, config.sample_size, config.sample_size)
    jobs = [(p, seed + j) for p in range(len(cond)) for j in range(samples_per_prompt)]
    scores = torch.zeros(len(jobs))
    for start in tqdm(range(0, len(jobs), batch_size), desc="noise norm", unit="batch", leave=False,
                      disable=not progress or None):
        chunk = jobs[start:start + batch_size]
        sched = type(scheduler).from_config(scheduler.config)
        sched.set_timesteps(num_inference_steps, device=ref.device)
        noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator("cpu").manual_seed(s))
                             for _, s in chunk])
        x = noise.to(ref.device, ref.dtype) * sched.init_noise_sigma
        text = torch.cat([cond[[p for p, _ in chunk]], empty.expand(len(chunk), -1, -1)])
        total = torch.zeros(len(chunk), device=ref.device)
        for t in sched.timesteps[:steps]:
            model_in = sched.scale_model_input(x, t)
            gap, out_c, out_u = text_noise_gap(unet, model_in, t, text, sched)
            total += gap
            guided = out_u + guidance_scale * (out_c - out_u) if guidance_scale > 1 else out_c
            x = sched.step(guided, t, x).prev_sample
        scores[start:start + len(chunk)] = (total / steps).cpu()
    return scores.view(len(cond), samples_per_prompt).mean(1)
