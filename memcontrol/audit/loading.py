"""What an audit reads: the model (with its adapter), the prompts, and the training and held-out images at the
analysis resolution."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import DataError, MissingWeightsError


@dataclass
class ImageSet:
    images: torch.Tensor  # N x 3 x R x R in [-1, 1], at the analysis resolution
    captions: list[str]
    keys: list[str]
    skipped: list = field(default_factory=list)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt file (one per line, '#' comments) or a CSV/TSV/JSONL with a prompt/text/caption column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "prompts file not found")
    if path.suffix in (".csv", ".tsv", ".jsonl", ".ndjson"):
        if path.suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ","))
        else:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        column = next((c for c in ("prompt", "text", "caption") if rows and c in rows[0]), None)
        if column is None:
            raise DataError(path, "no 'prompt', 'text' or 'caption' column")
        prompts = [str(r[column]).strip() for r in rows if str(r.get(column) or "").strip()]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DataError(path, "no prompts in the file")
    return prompts


def load_image_set(source, resolution: int, on_error: str, what: str, salt: str) -> ImageSet:
    from ..data import load_source

    ds = load_source({"source": str(source), "on_error": on_error}, resolution, salt=salt)
    images = torch.stack([ds[i]["pixel_values"] for i in tqdm(range(len(ds)), desc=f"reading {what}",
                                                              unit="img", leave=False)])
    return ImageSet(images.float(), list(ds.captions), list(ds.keys), list(ds.skipped))


def resized(images: torch.Tensor, size: int | None) -> torch.Tensor:
    if not size or images.shape[-1] == size:
        return images
    mode = "area" if images.shape[-1] > size else "bilinear"
    return F.interpolate(images, size=(size, size), mode=mode)


# What ``--adapter`` accepts, by the name ``adapter_kind`` gives it.
ADAPTER_KINDS = {
    "memcontrol": "an export folder of memcontrol (with mask.json; any family)",
    "lora": "a LoRA that diffusers' load_lora_weights reads: diffusers, kohya or peft key names, a folder or a "
            "single .safetensors (.bin/.pt/.ckpt read with weights_only) file",
    "peft": "a peft adapter folder (adapter_config.json + adapter_model.safetensors), for the UNet or the text "
            "encoder, or a folder with unet/ and/or text_encoder/ peft subfolders",
    "unet_params": "a .safetensors file (or a folder holding adapter.safetensors) of UNet parameters by their "
                   "state-dict names (a partial fine-tune)",
}
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}
SINGLE_FILE_PREFIX = "model.diffusion_model."  # the original (LDM) layout's UNet keys


def _weight_keys(path: Path) -> list[str]:
    """The tensor names of a weight file; safetensors headers are read without loading the tensors."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return list(fh.keys())
        except Exception as err:  # safetensors raises its own error types for truncated headers
            raise DataError(path, f"not a readable safetensors file ({err})") from None
    from ..weights import load_state_dict

    return list(load_state_dict(path, "adapter weights", "--adapter"))


def _is_lora(keys: list[str]) -> bool:
    return any(("lora" in k.lower()) for k in keys)


def _refuse(path: Path, found: str):
    kinds = "; ".join(f"({i}) {v}" for i, v in enumerate(ADAPTER_KINDS.values(), 1))
    raise DataError(path, f"{found}. --adapter takes {kinds}")


def _file_kind(path: Path) -> str:
    keys = _weight_keys(path)
    if any(k.startswith(SINGLE_FILE_PREFIX) for k in keys):
        _refuse(path, "this is a whole single-file checkpoint, not an adapter: pass it as --model "
                      "(with --model-config)")
    if _is_lora(keys):
        return "lora"
    if keys and all(k.startswith(("down_blocks.", "up_blocks.", "mid_block.", "conv_", "time_embedding."))
                    for k in keys):
        return "unet_params"
    _refuse(path, f"no LoRA keys and no UNet parameter names among its {len(keys)} tensors "
                  f"(first: {', '.join(keys[:3]) or 'none'})")


def _lora_file_in(folder: Path) -> Path | None:
    """The LoRA weight file of a folder: diffusers' default name first, else the only weight file with LoRA keys."""
    from ..export import LORA_FILE

    if (folder / LORA_FILE).is_file():
        return folder / LORA_FILE
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    loras = [f for f in files if _is_lora(_weight_keys(f))]
    if len(loras) > 1:
        raise DataError(folder, f"{len(loras)} LoRA weight files ({', '.join(f.name for f in loras)}): pass the "
                                "one to audit as --adapter FILE")
    return loras[0] if loras else None


def adapter_kind(path: str | Path) -> tuple[str, Path]:
    """What ``path`` holds (a key of ``ADAPTER_KINDS``) and the file or folder to load; a clear error naming the
    path and listing the accepted kinds when it is none of them. Only headers and key names are read."""
    from ..export import MASK_FILE, PARAMS_FILE, PEFT_CONFIG_FILE

    path = Path(path).expanduser()
    if not path.exists():
        raise MissingWeightsError("adapter", path, "--adapter")
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            _refuse(path, f"unknown weight file type '{path.suffix}'")
        return _file_kind(path), path
    if (path / MASK_FILE).is_file():
        return "memcontrol", path
    if any((path / sub / PEFT_CONFIG_FILE).is_file() for sub in ("", "unet", "text_encoder")):
        return "peft", path
    if (path / "model_index.json").is_file():
        _refuse(path, "this is a whole diffusers pipeline, not an adapter: pass it as --model")
    lora = _lora_file_in(path)
    if lora is not None:
        return "lora", lora
    if (path / PARAMS_FILE).is_file():
        return _file_kind(path / PARAMS_FILE), path / PARAMS_FILE
    _refuse(path, "no mask.json, adapter_config.json or LoRA weight file in this folder")


def _peft_targets(pipe, folder: Path) -> list[tuple[str, Path]]:
    """(component, folder) pairs of a peft adapter: subfolders named after the component, else the component
    whose modules the saved keys name."""
    from ..export import PEFT_CONFIG_FILE, PEFT_PREFIX, PEFT_WEIGHTS_FILE

    subs = [(c, folder / c) for c in ("unet", "text_encoder") if (folder / c / PEFT_CONFIG_FILE).is_file()]
    if subs:
        return subs
    weights = folder / PEFT_WEIGHTS_FILE
    keys = _weight_keys(weights if weights.is_file() else folder / "adapter_model.bin")
    names = [(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k).split(".") for k in keys]
    for component in ("unet", "text_encoder"):
        modules = {name for name, _ in getattr(pipe, component).named_modules()}
        # A saved key is the adapted module's name, then the adapter's own parameter ("lora_A.weight", "hada_w1_a").
        if names and all(".".join(n[:-1]) in modules or ".".join(n[:-2]) in modules for n in names):
            return [(component, folder)]
    _refuse(folder, "a peft adapter whose weights name modules of neither the UNet nor the text encoder of this "
                    "model (another base model?)")


def _adapter_names(pipe) -> set:
    return {(c, n) for c in ("unet", "text_encoder") for n in (getattr(getattr(pipe, c), "peft_config", None) or {})}


def load_any_adapter(pipe, path: str | Path) -> str:
    """Apply the adapter at ``path`` to ``pipe`` in place, whatever kind it is (see ``ADAPTER_KINDS``); returns
    the kind. A LoRA none of whose layers found a place in the model is an error, never a silent no-op."""
    from ..errors import MaskError
    from ..export import load_adapter, load_peft_adapter, load_unet_params

    kind, where = adapter_kind(path)
    if kind == "memcontrol":
        load_adapter(pipe, where)
    elif kind == "peft":
        for component, folder in _peft_targets(pipe, where):
            load_peft_adapter(getattr(pipe, component), folder, "--adapter")
    elif kind == "unet_params":
        load_unet_params(pipe.unet, where)
    else:
        before = _adapter_names(pipe)
        try:
            if where.suffix == ".safetensors":
                # diffusers reads the file itself, so that the peft metadata in its header (alpha) is kept.
                pipe.load_lora_weights(str(where.parent), weight_name=where.name)
            else:
                from ..weights import load_state_dict

                pipe.load_lora_weights(load_state_dict(where, "LoRA weights", "--adapter"))
        except ValueError as err:
            if "version of PEFT" not in str(err):
                raise MaskError(f"{where}: diffusers could not load this LoRA ({str(err).splitlines()[0]})") from None
            raise MaskError(f"{where}: this LoRA has text-encoder layers, which diffusers loads through "
                            f"transformers, and the installed transformers refuses the installed peft "
                            f"({str(err).splitlines()[0]}). Install the peft version it asks for, or audit a "
                            "UNet-only LoRA") from None
        if _adapter_names(pipe) == before:
            raise MaskError(f"{where}: no layer of this model matched the LoRA's keys (another base model?)")
    return kind


def load_model(model, adapter, device, dtype, model_config=None):
    """The audited pipeline: ``model`` a diffusers folder or a single-file checkpoint (with ``model_config``, a
    diffusers folder of its architecture), with the adapter at ``adapter`` (any of ``ADAPTER_KINDS``) applied;
    returns the pipeline and the adapter's kind (None without one)."""
    from ..models import load_pipeline

    pipe = load_pipeline(model, device="cpu", dtype=dtype, config=model_config)
    kind = load_any_adapter(pipe, adapter) if adapter else None
    return pipe.to(device), kind


def choose_prompts(prompts: list[str], limit: int | None, seed: int) -> list[str]:
    """Distinct prompts in first-seen order; a seeded subset of ``limit`` when there are more."""
    unique = list(dict.fromkeys(prompts))
    if limit and len(unique) > limit:
        keep = sorted(np.random.default_rng(seed).choice(len(unique), limit, replace=False).tolist())
        unique = [unique[i] for i in keep]
    return unique
