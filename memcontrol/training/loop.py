"""The inner loop: fine-tune a masked copy of a pipeline's UNet on cached latents and text embeddings.

``finetune`` never changes the pipeline it is given: it trains a deep copy of ``pipe.unet`` and returns it in
``TrainResult.applied.unet``. A search can therefore run many trials on one loaded pipeline; the copy of each trial
is freed when its result is dropped. ``pipeline_with_unet`` makes a pipeline around a trained UNet (sharing the VAE,
text encoder, tokenizer and scheduler) for sampling.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from ..config.base import Section, validated
from ..config.devices import Device, resolve_device
from ..errors import ConfigError
from ..masks import AppliedMask, Mask, apply_mask
from ..mitigations.captions import CaptionMitigation, caption_mitigator

log = logging.getLogger(__name__)

SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine"}
MIXED_PRECISION = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")


class TrainConfig(Section):
    """Settings of one fine-tuning run (the ``train`` section of a config). ``warmup`` is in steps; ``grad_clip`` 0
    turns clipping off; ``caption_dropout`` is the probability of training an item on the empty prompt (for
    classifier-free guidance); ``caption_mitigation`` is a training-time caption mitigation of Somepalli et al.
    (``memcontrol.mitigations.captions``, off by default); ``mixed_precision`` is accelerate's ("no", "fp16" on CUDA, "bf16"); ``device`` is
    where training runs (default: where the pipeline's UNet is)."""

    steps: int = Field(500, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    warmup: int = Field(0, ge=0)
    schedule: Literal[tuple(SCHEDULES)] = "constant"
    grad_clip: float = Field(1.0, ge=0)
    caption_dropout: float = Field(0.1, ge=0, lt=1)
    caption_mitigation: CaptionMitigation = Field(default_factory=CaptionMitigation)
    seed: int = Field(0, ge=0)
    mixed_precision: Literal[MIXED_PRECISION] = "no"
    gradient_checkpointing: bool = False
    weight_decay: float = Field(1e-2, ge=0)
    device: Device | None = None

    @classmethod
    def from_dict(cls, data: dict | None, where: str | None = None) -> TrainConfig:
        return validated(cls, dict(data or {}), where, prefix=("train",))

    def to_dict(self) -> dict:
        return self.model_dump()


@dataclass
class TrainResult:
    """``status`` is "ok", "failed" (non-finite loss, out of memory: ``reason`` says which) or "stopped" (the
    callback asked to stop; ``reason`` is its message). ``losses`` holds one value per completed step."""

    status: str
    reason: str | None
    steps: int
    seconds: float
    losses: list = field(default_factory=list)
    applied: AppliedMask | None = None

    def merged_unet(self) -> torch.nn.Module:
        """The trained UNet as a plain diffusers UNet: peft adapters merged into the weights they adapt (on a copy;
        ``applied.unet`` keeps its adapters), nothing trainable."""
        unet = self.applied.unet
        if getattr(unet, "peft_config", None):
            from peft.tuners.tuners_utils import BaseTunerLayer

            unet = copy.deepcopy(unet)
            for name, module in list(unet.named_modules()):
                if isinstance(module, BaseTunerLayer):
                    module.merge()
                    parent, _, child = name.rpartition(".")
                    setattr(unet.get_submodule(parent) if parent else unet, child, module.get_base_layer())
            del unet.peft_config
            unet._hf_peft_config_loaded = False
        return unet.requires_grad_(False)

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last (up to) ten steps: one step's loss is too noisy to compare runs by."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else None


def pipeline_with_unet(pipe, unet):
    """A pipeline of the same class as ``pipe`` that shares all its components except the UNet."""
    import inspect

    kwargs = dict(pipe.components, unet=unet)
    if "requires_safety_checker" in inspect.signature(type(pipe).__init__).parameters:
        kwargs["requires_safety_checker"] = bool(pipe.config.get("requires_safety_checker", False))
    out = type(pipe)(**kwargs)
    out.set_progress_bar_config(disable=True)
    return out


def _batch_indices(n: int, batch_size: int, gen: torch.Generator):
    """Endless batches: shuffled epochs without repeats, or draws with replacement when the set is smaller than
    a batch."""
    while True:
        if batch_size > n:
            yield torch.randint(0, n, (batch_size,), generator=gen)
            continue
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def _accelerator(mixed_precision: str, cpu: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError as err:
        # accelerate keeps one process-wide state; a later run with other precision settings must reset it.
        if "already been initialized" not in str(err):
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _noise_scheduler(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def _target(scheduler, latents, noise, timesteps):
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def finetune(pipe, mask: Mask, cached, cfg: TrainConfig | None = None, callback=None, callback_every: int = 0,
             allow_partial: bool = False, progress: bool = True, on_step=None) -> TrainResult:
    """Fine-tune a copy of ``pipe.unet`` restricted to ``mask`` on ``cached`` (a ``CachedData``, or any object
    with ``len()``, ``batch(indices) -> (latents, text_embeds)`` and ``empty_embed``).

    Every ``callback_every`` steps, ``callback(step, unet)`` runs under ``torch.no_grad`` with the UNet in eval
    mode; a string it returns stops the run (status "stopped"). ``on_step(step, steps)``, if given, is called
    after every step (progress reports: it must be cheap). A non-finite loss or running out of GPU memory
    ends the run with status "failed"; a mask that does not fit raises ``MaskError`` before training starts."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    cfg = cfg or TrainConfig()
    device = torch.device(resolve_device(cfg.device)) if cfg.device else _device_of(pipe.unet)
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.mixed_precision fp16 needs a CUDA device; use bf16 or no on CPU")
    unet = copy.deepcopy(pipe.unet).to(device)
    set_seed(cfg.seed)  # before the adapters are made: their initial weights come from the global generator
    applied = apply_mask(unet, mask, allow_partial=allow_partial)
    if cfg.mixed_precision == "no" and any(p.dtype != torch.float32 for p in unet.parameters()):
        raise ConfigError("the model is in half precision: set train.mixed_precision to fp16 or bf16")
    accelerator = _accelerator(cfg.mixed_precision, cpu=device.type == "cpu")
    noise_scheduler = _noise_scheduler(pipe)
    if noise_scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"the scheduler's prediction_type '{noise_scheduler.config.prediction_type}' cannot be "
                          f"trained; supported: {', '.join(PREDICTION_TYPES)}")
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_scheduler = get_scheduler(SCHEDULES[cfg.schedule], optimizer, num_warmup_steps=cfg.warmup,
                                 num_training_steps=cfg.steps)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    # Batches, noise, timesteps and caption dropout all come from one CPU generator, so a run is reproduced
    # exactly from its seed whatever the device.
    gen = torch.Generator().manual_seed(cfg.seed)
    empty = cached.empty_embed.to(device)
    mitigator = caption_mitigator(cfg.caption_mitigation, pipe, cached, cfg.seed)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    batches = _batch_indices(len(cached), cfg.batch_size, gen)
    losses, status, reason, step = [], "ok", None, 0
    bar = tqdm(total=cfg.steps, desc=f"finetune {mask.family}", unit="step", **({} if progress else
                                                                                 {"disable": True}))
    start = time.perf_counter()
    try:
        while step < cfg.steps:
            idx = next(batches)
            latents, embeds = cached.batch(idx)
            if mitigator is not None:
                embeds = mitigator(embeds, idx, step)
            bsz = latents.shape[0]
            noise = torch.randn(latents.shape, generator=gen).to(device)
            timesteps = torch.randint(0, num_timesteps, (bsz,), generator=gen).to(device)
            drop = (torch.rand(bsz, generator=gen) < cfg.caption_dropout).to(device)
            latents = latents.to(device, torch.float32)
            embeds = torch.where(drop[:, None, None], empty, embeds.to(device))
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = _target(noise_scheduler, latents, noise, timesteps)
            with accelerator.autocast():
                pred = unet(noisy, timesteps, embeds.to(noisy.dtype)).sample
            loss = F.mse_loss(pred.float(), target.float())
            value = loss.item()
            if not math.isfinite(value):
                status, reason = "failed", f"loss is {value} at step {step + 1}"
                break
            accelerator.backward(loss)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step, cfg.steps)
            if callback is not None and callback_every > 0 and step % callback_every == 0:
                unet.eval()
                with torch.no_grad():
                    answer = callback(step, unet)
                unet.train()
                if answer:
                    status, reason = "stopped", str(answer)
                    break
    except torch.cuda.OutOfMemoryError as err:
        status, reason = "failed", f"out of GPU memory at step {step + 1} ({str(err).splitlines()[0]})"
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if cfg.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    unet.eval()
    optimizer.zero_grad(set_to_none=True)
    accelerator.free_memory()
    if status != "ok":
        log.warning("fine-tuning %s: %s", status, reason)
    return TrainResult(status, reason, step, seconds, losses, applied)
