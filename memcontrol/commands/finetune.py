"""`memcontrol finetune`: fine-tune a model with a given mask and export the adapter (the transfer job).

The output folder receives the adapter, ``mask.json``, ``metrics.json``, ``README.md`` and (unless ``data.cache_dir``
says otherwise) the training cache in ``cache/``. A folder that already holds a finished export is refused, so a
re-run never overwrites finished work; an interrupted run is simply run again: the cached latents are reused and
training starts over.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
DATASET_OPTIONS = ("image_column", "text_column", "key_column", "channels", "crop", "on_error", "frame")


def add_arguments(parser) -> None:
    parser.add_argument("--config", type=Path, required=True,
                        help="YAML config with model, data, train and (unless --mask is given) mask sections")
    parser.add_argument("--mask", type=Path, default=None, help="mask.json to train with (overrides the config's)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="apply a mask whose layout or sites do not all match this model; unmatched sites are "
                             "listed and skipped")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the adapter and its card")


def _mask_from(cfg: dict, option: Path | None):
    from ..config import resolve_path
    from ..errors import ConfigError
    from ..masks import load_mask

    if option is not None:
        return load_mask(option)
    spec = cfg.get("mask")
    if spec is None:
        raise ConfigError("no mask: pass --mask mask.json or give a 'mask' section (inline or a path) in the config")
    return load_mask(spec if isinstance(spec, dict) else resolve_path(cfg, spec))


def _device(name: str) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _dataset(cfg: dict, out: Path):
    from ..config import resolve_path, section
    from ..data import ImageCaptionDataset, run_salt
    from ..errors import ConfigError

    data = section(cfg, "data")
    train = data.get("train")
    if train is None:
        raise ConfigError("data.train is missing: a manifest (CSV/JSONL) or an image folder")
    spec = dict(train) if isinstance(train, dict) else {"source": train}
    if "source" not in spec:
        raise ConfigError("data.train needs a 'source' (manifest or folder)")
    unknown = set(spec) - {"source", *DATASET_OPTIONS}
    if unknown:
        raise ConfigError(f"unknown data.train option(s) {sorted(unknown)}; known: {', '.join(DATASET_OPTIONS)}")
    options = {k: v for k, v in spec.items() if k != "source"}
    return ImageCaptionDataset(resolve_path(cfg, spec["source"]), resolution=int(data.get("resolution", 512)),
                               salt=run_salt(out), **options)


def run(args) -> int:
    import torch

    from ..config import load_config, resolve_path, section
    from ..errors import ConfigError, MemcontrolError
    from ..export import METRICS_FILE, export_adapter, is_exported
    from ..models import load_pipeline
    from ..training import TrainConfig, cache_training_data, finetune

    out = Path(args.out)
    if is_exported(out):
        raise MemcontrolError(f"{out} already holds a finished fine-tune ({out / METRICS_FILE}); choose another "
                              "--out or remove that folder")
    cfg = load_config(args.config)
    mask = _mask_from(cfg, args.mask)
    train_cfg = TrainConfig.from_dict(section(cfg, "train"))
    model = section(cfg, "model")
    if not model.get("path"):
        raise ConfigError("model.path is missing: a local diffusers pipeline folder")
    dtype_name = model.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
    device = _device(model.get("device", "auto"))

    pipe = load_pipeline(resolve_path(cfg, model["path"]), device=device, dtype=getattr(torch, dtype_name),
                         option="model.path")
    dataset = _dataset(cfg, out)
    skipped = getattr(dataset, "skipped", [])
    if skipped:
        log.warning("%d training item(s) skipped (first: %s: %s)", len(skipped), *skipped[0])
    cache_dir = resolve_path(cfg, section(cfg, "data").get("cache_dir")) or out / "cache"
    cached = cache_training_data(pipe, dataset, cache_dir)
    print(f"finetune: {len(cached)} training items; mask {mask.describe()}")
    result = finetune(pipe, mask, cached, train_cfg, allow_partial=args.allow_partial)
    applied = result.applied
    if applied.unmatched:
        print(f"finetune: skipped {len(applied.unmatched)} site(s) that match nothing: {', '.join(applied.unmatched)}")
    if result.status != "ok":
        raise MemcontrolError(f"fine-tuning {result.status} after {result.steps} step(s): {result.reason}")
    metrics = {"final_loss": result.final_loss}
    info = {"base_model": model["path"], "data_size": len(cached), "train": train_cfg.to_dict(),
            "result": {"status": result.status, "steps": result.steps, "seconds": round(result.seconds, 2),
                       "final_loss": result.final_loss}}
    export_adapter(pipe, applied, mask, out, metrics=metrics, info=info)
    print(f"finetune: {applied.summary()}; {result.steps} steps in {result.seconds:.1f} s, final loss "
          f"{result.final_loss:.4f}; adapter written to {out}")
    return 0
