"""Stable Diffusion pipelines from local folders, and tiny presets of the same architecture.

Only local folders are accepted: model weights are never downloaded. The tiny preset keeps Stable Diffusion 1.x's
block layout (4 down blocks, 3 of them with cross-attention, a cross-attention mid block, 4 up blocks, 2 layers per
down block) with small widths, so that every mask site of SD 1.5 exists in it and a mask moves between the two.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from .errors import ConfigError, DataError, MissingWeightsError, UnsafeCheckpointError

log = logging.getLogger(__name__)

# Stable Diffusion 1.5's published UNet config (runwayml/stable-diffusion-v1-5, unet/config.json).
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)

TINY_UNET_CONFIG = dict(SD15_UNET_CONFIG, sample_size=16, block_out_channels=(32, 32, 64, 64), norm_num_groups=8,
                        cross_attention_dim=64, attention_head_dim=4)

TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1, norm_num_groups=16,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64), act_fn="silu", scaling_factor=1.0,
)

TINY_TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64)

# Stable Diffusion's noise schedule.
SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

MODEL_INDEX = "model_index.json"


def check_local_folder(path: str | Path, option: str = "--model") -> Path:
    """The folder of a diffusers pipeline, or a clear error (hub ids are refused: nothing is downloaded)."""
    p = Path(path).expanduser()
    if not p.exists():
        hint = (" It looks like a Hugging Face hub id; download the pipeline once elsewhere "
                "(`huggingface-cli download ID --local-dir DIR`) and pass the folder."
                if "/" in str(path) and not str(path).startswith(("/", ".", "~")) and str(path).count("/") == 1 else "")
        raise MissingWeightsError("diffusers pipeline folder", p, option + "; a local folder is needed." + hint)
    if not (p / MODEL_INDEX).is_file():
        raise MissingWeightsError(f"'{MODEL_INDEX}' of a diffusers pipeline", p / MODEL_INDEX,
                                  option + " (a folder written by save_pretrained)")
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (p / sub).is_dir():
            raise MissingWeightsError(f"pipeline component '{sub}'", p / sub, option)
    for sub in ("unet", "vae", "text_encoder"):
        files = list((p / sub).glob("*"))
        if not any(f.name.endswith(".safetensors") or f.name.endswith(".safetensors.index.json") for f in files):
            pickles = [f.name for f in files if f.suffix in {".bin", ".pt", ".ckpt", ".pth"}]
            if pickles:
                raise UnsafeCheckpointError(
                    f"{p / sub}: only pickle weights ({', '.join(pickles)}) found; they can run code when loaded. "
                    "Convert the pipeline to safetensors (save_pretrained(..., safe_serialization=True)) from a "
                    "trusted environment.")
            raise MissingWeightsError(f"'{sub}' weights (*.safetensors)", p / sub, option)
    return p


SINGLE_FILE_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin"}


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  option: str = "--model", config: str | Path | None = None):
    """A ``StableDiffusionPipeline`` from a local folder, safety checker off, weights from safetensors only; or
    from a single-file checkpoint in the original layout (``.safetensors``, or ``.ckpt``/``.pt`` read with
    ``weights_only``), whose architecture ``config`` (a local diffusers pipeline folder) describes."""
    from diffusers import StableDiffusionPipeline

    if Path(path).expanduser().is_file() and Path(path).suffix in SINGLE_FILE_SUFFIXES:
        pipe = _load_single_file(Path(path).expanduser(), config, dtype)
    else:
        folder = check_local_folder(path, option)
        pipe = StableDiffusionPipeline.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False, dtype=dtype)
        check_text_encoder_loaded(pipe.text_encoder, folder / "text_encoder")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_text_encoder_loaded(text_encoder, folder: Path) -> None:
    """Refuse a text encoder that did not take the weights in its files. transformers reports weights it cannot place
    (a key layout written by a later release: 5.5 and older ignore the bundled model's, saved by 5.17) and goes on
    with random ones, so every sample would be conditioned on noise without an error."""
    from safetensors import safe_open

    if text_encoder is None:
        return
    loaded = text_encoder.state_dict()
    # The files a plain load reads: one file or its shards (a variant such as model.fp16.safetensors is not read).
    files = [f for f in sorted(Path(folder).glob("model*.safetensors"))
             if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", f.name)]
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                # The same tensor under the model's name for it, with or without the wrapper's prefix; keys the
                # model does not keep (older files' position_ids buffers) are not weights it could have lost.
                target = loaded.get(key, loaded.get(f"text_model.{key}"))
                if target is not None and not torch.equal(f.get_tensor(key).to(target.dtype), target.cpu()):
                    import transformers

                    raise DataError(file, f"the text encoder's weight '{key}' was not loaded from this file by "
                                          f"transformers {transformers.__version__} (random weights in its place): "
                                          "the file's layout needs a later transformers release")


def _load_single_file(path: Path, config, dtype):
    """diffusers' ``from_single_file`` kept offline: the configs (and tokenizer) come from the local folder
    ``config``, since guessing them would mean fetching them from the hub."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    if config is None:
        raise ConfigError(f"{path}: a single-file checkpoint needs the diffusers folder of its architecture to load "
                          "without downloading: pass --model-config DIR, a local diffusers pipeline of the same "
                          "model family (e.g. the base model it was fine-tuned from; only its configs and tokenizer "
                          "are read)")
    folder = Path(config).expanduser()
    if not (folder / MODEL_INDEX).is_file():
        raise MissingWeightsError(f"'{MODEL_INDEX}' of a diffusers pipeline", folder / MODEL_INDEX,
                                  "--model-config (the diffusers folder describing the single-file checkpoint)")
    try:
        # diffusers reads .ckpt/.pt with torch.load(weights_only=True), and safetensors as they are.
        return StableDiffusionPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, dtype=dtype)
    except (pickle.UnpicklingError, ValueError, KeyError, RuntimeError, OSError, SingleFileComponentError) as err:
        cause = err
        while cause is not None and not isinstance(cause, pickle.UnpicklingError):
            cause = cause.__cause__ or cause.__context__  # diffusers re-raises a refused pickle as an OSError
        if cause is not None:
            raise UnsafeCheckpointError(f"{path}: refused to load: the file needs to run code to unpickle "
                                        f"({str(cause).splitlines()[0]}). Convert it to safetensors from a trusted "
                                        "environment.") from None
        raise DataError(path, f"not a Stable Diffusion single-file checkpoint matching {folder} "
                              f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def sd15_unet_meta():
    """A UNet of SD 1.5's exact layout on the meta device: the module tree without allocating 3.4 GB."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


def tiny_pipeline(seed: int = 0, words: list[str] | None = None, tokenizer_dir: str | Path | None = None,
                  resolution: int = 64):
    """A tiny Stable Diffusion pipeline with random weights (seeded). Its tokenizer is written to
    ``tokenizer_dir`` and loaded from there; without one, through a temporary folder removed once it is loaded (the
    tokenizer keeps its vocabulary in memory)."""
    import contextlib
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .tokenizer import write_tokenizer

    folder = (contextlib.nullcontext(tokenizer_dir) if tokenizer_dir
              else tempfile.TemporaryDirectory(prefix="memcontrol-tok-"))
    with folder as tok_dir:
        write_tokenizer(Path(tok_dir), words)
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    vae = AutoencoderKL(**dict(TINY_VAE_CONFIG, sample_size=resolution))
    text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              **TINY_TEXT_CONFIG)
    text_encoder = CLIPTextModel(text_cfg)
    factor = 2 ** (len(TINY_VAE_CONFIG["block_out_channels"]) - 1)
    unet = UNet2DConditionModel(**dict(TINY_UNET_CONFIG, sample_size=resolution // factor))
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, folder: str | Path) -> Path:
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
