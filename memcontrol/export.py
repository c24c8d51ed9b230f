"""Exporting a fine-tuned adapter, and loading one back.

An export folder holds the adapter, ``mask.json``, ``metrics.json`` and a ``README.md`` model card:

- LoRA: ``pytorch_lora_weights.safetensors`` in diffusers' format (with the peft config as metadata, so that
  alpha is restored exactly): plain ``diffusers`` loads it with ``pipe.load_lora_weights(folder)``.
- LoHa, LoKr, OFT: peft's adapter format, ``adapter_config.json`` + ``adapter_model.safetensors`` (keys as
  ``PeftModel.save_pretrained`` writes them).
- bitfit_norm, unfreeze: ``adapter.safetensors`` with the fine-tuned values of exactly the trained parameters,
  named as in the UNet's state dict.

``load_adapter`` applies any of these to a pipeline's UNet in place. ``metrics.json`` is written last: a folder
that has it holds a finished export.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch

from .errors import MaskError, MissingWeightsError
from .masks import ADAPTER_NAME, AppliedMask, Mask
from .masks.spec import PEFT_FAMILIES

LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PARAMS_FILE = "adapter.safetensors"
MASK_FILE = "mask.json"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
PEFT_PREFIX = "base_model.model."


def _write_lora(pipe, unet, out_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    # Keys stay in peft's naming (``...lora_A.weight``), which diffusers reads as it is. diffusers'
    # ``convert_state_dict_to_diffusers`` renames only attention projections (to ``lora.down``/``lora.up``); with
    # a mask that also covers feed-forward or resnet layers the file would mix both namings, and the loader, seeing
    # peft keys, would silently drop the renamed ones.
    layers = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    layers = {k: v.detach().float().contiguous().cpu() for k, v in layers.items()}
    saver = getattr(type(pipe), "save_lora_weights", StableDiffusionPipeline.save_lora_weights)
    # The peft config travels as metadata: without it diffusers would assume alpha = rank.
    saver(str(out_dir), unet_lora_layers=layers, safe_serialization=True,
          unet_lora_adapter_metadata=unet.peft_config[ADAPTER_NAME].to_dict())


def _write_peft(unet, out_dir: Path) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    unet.peft_config[ADAPTER_NAME].save_pretrained(str(out_dir))
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    save_file({PEFT_PREFIX + k: v.detach().float().contiguous().cpu() for k, v in state.items()},
              str(out_dir / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})


def _write_params(applied: AppliedMask, out_dir: Path) -> None:
    from safetensors.torch import save_file

    state = applied.unet.state_dict()
    save_file({name: state[name].detach().contiguous().cpu() for name in applied.targets},
              str(out_dir / PARAMS_FILE), metadata={"format": "pt"})


def _scalars(metrics: dict) -> dict:
    """The numeric entries of a metrics mapping (nested keys joined by '.'), for the model card: lists, such as
    which training items were copied, stay in metrics.json only."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _scalars(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _card(mask: Mask, applied: AppliedMask, metrics: dict, info: dict) -> str:
    base = info.get("base_model")
    base_name = Path(str(base)).name if base else "unknown"
    lines = ["---", f"library_name: {'diffusers' if mask.family == 'lora' else 'peft'}",
             f"tags: [memcontrol, stable-diffusion, {mask.family}]", "---", "",
             f"# {mask.family} adapter fine-tuned with memcontrol", "",
             f"- Base model: `{base_name}` (not included; the adapter is applied on top of it)"]
    if "data_size" in info:
        lines.append(f"- Training data: {info['data_size']} image-caption pairs (no images, captions or "
                     "identifiers are stored in this folder)")
    lines += [f"- Trainable parameters: {applied.trainable:,} of {applied.total:,} UNet parameters "
              f"({applied.percent:.3f}%)", "", "## Mask", "",
              f"Family `{mask.family}`, " + (", ".join(f"{k}={v}" for k, v in mask.params.items()) or
                                             "no hyperparameters") + f"; {len(mask.sites)} site(s):", ""]
    lines += [f"- `{site}`" for site in mask.sites]
    if applied.unmatched:
        lines += ["", "Sites that matched nothing in the base model (skipped): "
                  + ", ".join(f"`{s}`" for s in applied.unmatched)]
    train = info.get("train") or {}
    if train:
        lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in train.items()]
    result = info.get("result") or {}
    if result:
        lines += ["", "Run: " + ", ".join(f"{k} {v}" for k, v in result.items() if v is not None)]
    scalars = _scalars(metrics)
    if scalars:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in scalars.items()]
    lines += ["", "## Loading", "", "```python"]
    if mask.family == "lora":
        lines += ["pipe.load_lora_weights(folder)  # plain diffusers"]
    else:
        lines += ["from memcontrol.export import load_adapter", "load_adapter(pipe, folder)"]
    lines += ["```", ""]
    return "\n".join(lines)


def export_adapter(pipe, applied: AppliedMask, mask: Mask, out_dir: str | Path, metrics: dict | None = None,
                   info: dict | None = None) -> Path:
    """Write the trained adapter of ``applied`` with ``mask.json``, ``metrics.json`` and a model card.

    ``pipe`` is the base pipeline (its class picks the LoRA writer); ``info`` may hold ``base_model`` (a path: only
    its last component is written), ``data_size``, ``train`` (the training settings) and ``result`` (status,
    steps, seconds, final loss)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics, info = dict(metrics or {}), dict(info or {})
    unet = applied.unet
    if mask.family == "lora":
        _write_lora(pipe, unet, out_dir)
    elif mask.family in PEFT_FAMILIES:
        _write_peft(unet, out_dir)
    else:
        _write_params(applied, out_dir)
    dataclasses.replace(mask, layout=mask.layout or applied.layout).to_json(out_dir / MASK_FILE)
    (out_dir / CARD_FILE).write_text(_card(mask, applied, metrics, info), encoding="utf-8")
    record = {"metrics": metrics,
              "adapter": {"family": mask.family, "trainable": applied.trainable, "total": applied.total,
                          "trainable_percent": applied.percent, "unmatched_sites": list(applied.unmatched)},
              "base_model": Path(str(info["base_model"])).name if info.get("base_model") else None,
              **{k: v for k, v in info.items() if k != "base_model"}}
    (out_dir / METRICS_FILE).write_text(json.dumps(_jsonable(record), indent=2) + "\n", encoding="utf-8")
    return out_dir


def is_exported(folder: str | Path) -> bool:
    """Whether ``folder`` holds a finished export."""
    return (Path(folder) / METRICS_FILE).is_file()


def _free_adapter_name(unet) -> str:
    taken = set(getattr(unet, "peft_config", {}) or {})
    name, i = ADAPTER_NAME, 1
    while name in taken:
        name, i = f"{ADAPTER_NAME}_{i}", i + 1
    return name


def load_peft_adapter(module, folder: str | Path, option: str = "an export folder of memcontrol") -> str:
    """Add the peft adapter saved in ``folder`` (``adapter_config.json`` + ``adapter_model.safetensors``, as
    ``PeftModel.save_pretrained`` writes them; any peft type) to ``module`` (a UNet or a text encoder) in place;
    returns the adapter's name on the module."""
    from diffusers import ModelMixin
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict

    from .weights import load_state_dict

    folder = Path(folder)
    config_path = folder / PEFT_CONFIG_FILE
    if not config_path.is_file():
        raise MissingWeightsError("peft adapter config", config_path, option)
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, KeyError) as err:
        raise MaskError(f"{config_path}: not a peft adapter config ({str(err).splitlines()[0]})") from None
    weights = folder / PEFT_WEIGHTS_FILE
    if not weights.is_file() and (folder / "adapter_model.bin").is_file():
        weights = folder / "adapter_model.bin"  # older peft; read with torch.load(weights_only=True)
    state = load_state_dict(weights, "peft adapter weights", option)
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    name = _free_adapter_name(module)
    try:
        if isinstance(module, ModelMixin):
            module.add_adapter(config, adapter_name=name)
        else:
            # peft directly: transformers' own add_adapter demands a newer peft than diffusers does.
            inject_adapter_in_model(config, module, adapter_name=name)
    except ValueError as err:
        raise MaskError(f"{folder}: the adapter does not fit this model ({str(err).splitlines()[0]})") from None
    result = set_peft_model_state_dict(module, state, adapter_name=name)
    if result.unexpected_keys:
        extra = ", ".join(result.unexpected_keys[:5])
        raise MaskError(f"{folder}: adapter weights with no place in this model: {extra}")
    missing = [k for k in result.missing_keys if re.search(rf"\.{re.escape(name)}(\.|$)", k)]
    if missing:
        raise MaskError(f"{folder}: adapter weights missing for {', '.join(missing[:5])}")
    module.requires_grad_(False)
    return name


def load_unet_params(unet, path: Path) -> None:
    """Copy the tensors of a safetensors file of UNet state-dict entries (a subset) into ``unet``, after checking
    every name and shape."""
    from .weights import load_state_dict

    state = load_state_dict(path, "fine-tuned parameters", "an export folder of memcontrol")
    params = dict(unet.named_parameters())
    for name, value in state.items():
        if name not in params:
            raise MaskError(f"{path}: parameter '{name}' does not exist in this UNet")
        if params[name].shape != value.shape:
            raise MaskError(f"{path}: parameter '{name}' has shape {tuple(value.shape)}, the UNet's "
                            f"has {tuple(params[name].shape)}: another model size")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))


def load_adapter(pipe, folder: str | Path):
    """Apply an exported adapter to ``pipe.unet`` in place (deep-copy the UNet first to keep the base model) and
    return ``pipe``. LoRA goes through diffusers' ``load_lora_weights``."""
    folder = Path(folder)
    mask = Mask.from_json(folder / MASK_FILE)
    if mask.family == "lora":
        if not (folder / LORA_FILE).is_file():
            raise MissingWeightsError("LoRA weights", folder / LORA_FILE, "an export folder of memcontrol")
        pipe.load_lora_weights(str(folder), weight_name=LORA_FILE)
    elif mask.family in PEFT_FAMILIES:
        load_peft_adapter(pipe.unet, folder)
    else:
        load_unet_params(pipe.unet, folder / PARAMS_FILE)
    return pipe
