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


def add_arguments(parser) -> None:
    parser.add_argument("--config", type=Path, required=True,
                        help="YAML config with model, data, train and (unless --mask is given) mask sections")
    parser.add_argument("--mask", type=Path, default=None, help="mask.json to train with (overrides the config's)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="apply a mask whose layout or sites do not all match this model; unmatched sites are "
                             "listed and skipped")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the adapter and its card")


def _mask_from(job, option: Path | None):
    from ..errors import ConfigError
    from ..masks import load_mask

    if option is not None:
        return load_mask(option)
    if job.mask is None:
        raise ConfigError("no mask: pass --mask mask.json or give a 'mask' section (inline or a path) in the config")
    return load_mask(job.mask)


def run(args) -> int:
    from ..config import read_config
    from ..config.devices import resolve_device, torch_dtype
    from ..data import load_source, run_salt
    from ..data.duplicates import audit_job_data
    from ..errors import ConfigError, MemcontrolError
    from ..export import METRICS_FILE, export_adapter, is_exported
    from ..models import load_pipeline
    from ..runs import claim_out_dir
    from ..training import cache_training_data, finetune

    job = read_config(args.config)
    mask = _mask_from(job, args.mask)
    if not job.model.path:
        raise ConfigError(f"{args.config}: model.path is missing: a local diffusers pipeline folder")
    if job.data.train is None:
        raise ConfigError(f"{args.config}: data.train is missing: a manifest (CSV/JSONL) or an image folder")
    out = claim_out_dir(args.out, "finetune")
    if is_exported(out):
        raise MemcontrolError(f"{out} already holds a finished fine-tune ({out / METRICS_FILE}); choose another "
                              "--out or remove that folder")
    salt = run_salt(out)
    dataset = load_source(job.data.train.model_dump(), job.data.resolution, job.data.max_train, salt=salt)
    skipped = getattr(dataset, "skipped", [])
    if skipped:
        log.warning("%d training item(s) skipped (first: %s: %s)", len(skipped), *skipped[0])
    heldout = None
    if job.data.heldout is not None and (job.data_audit.on_duplicates != "ignore" or job.data_audit.deduplicate):
        heldout = load_source(job.data.heldout.model_dump(), job.data.resolution, salt=salt)
    dataset, _ = audit_job_data(dataset, heldout, job.data_audit.model_dump(), "finetune",
                                job.data.cache_dir or out / "cache")
    pipe = load_pipeline(job.model.path, device=resolve_device(job.model.device), dtype=torch_dtype(job.model.dtype),
                         option="model.path")
    cached = cache_training_data(pipe, dataset, Path(job.data.cache_dir or out / "cache"))
    print(f"finetune: {len(cached)} training items; mask {mask.describe()}")
    result = finetune(pipe, mask, cached, job.train, allow_partial=args.allow_partial)
    applied = result.applied
    if applied.unmatched:
        print(f"finetune: skipped {len(applied.unmatched)} site(s) that match nothing: {', '.join(applied.unmatched)}")
    if result.status != "ok":
        raise MemcontrolError(f"fine-tuning {result.status} after {result.steps} step(s): {result.reason}")
    metrics = {"final_loss": result.final_loss}
    info = {"base_model": job.model.path, "data_size": len(cached), "train": job.train.to_dict(),
            "result": {"status": result.status, "steps": result.steps, "seconds": round(result.seconds, 2),
                       "final_loss": result.final_loss}}
    export_adapter(pipe, applied, mask, out, metrics=metrics, info=info)
    print(f"finetune: {applied.summary()}; {result.steps} steps in {result.seconds:.1f} s, final loss "
          f"{result.final_loss:.4f}; adapter written to {out}")
    return 0
