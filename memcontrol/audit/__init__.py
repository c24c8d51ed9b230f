"""The audit job: how much of its training data does a checkpoint reproduce?

``run_audit`` loads a local diffusers pipeline or single-file checkpoint (optionally with an adapter of any
kind that the ecosystem writes: see ``loading.ADAPTER_KINDS``), generates seeded samples for the training
prompts (or for given prompts), runs the configured checks and writes one folder:

  metrics.json   every number, with a ``schema_version`` (see ``outputs.SCHEMA``)
  prompts.csv    one row per prompt: noise norm and the worst sample's scores
  samples.csv    one row per generated sample: nearest training key and score of each check
  figures/*.png  generated images beside their nearest training image, histograms against the held-out baseline,
                 the noise-norm distribution
  report.html    one self-contained page with the tables and figures embedded

Checks that need training images (copy detection, distance ratio, tiled L2, extraction) run only with a training
manifest; quality (FD, KID) and the calibrated thresholds need held-out images. The noise norm needs neither. What is
skipped, and why, is recorded in metrics.json and in the report. Items are named by their pseudonymous key (manifest
``subject`` or file stem); nothing read from a DICOM header other than pixels reaches any output.

Modules: ``loading`` (model, prompts, images), ``checks`` (the measures and the table of what each needs),
``outputs`` (files and report). The settings are the ``audit`` section of ``memcontrol.config.schema``.
"""

from __future__ import annotations

from pathlib import Path

from .loading import read_prompts
from .outputs import SCHEMA, SCHEMA_VERSION

__all__ = ["SCHEMA", "SCHEMA_VERSION", "audit_settings", "read_prompts", "run_audit"]


def audit_settings(config=None, overrides: dict | None = None):
    """The ``AuditSection`` of a config (a file, a mapping, or None for the defaults); ``overrides`` (``device``,
    ``seed``...) are checked like the file's values."""
    from ..config import read_config
    from ..errors import ConfigError

    settings = read_config(config).audit.model_copy(deep=True)  # overrides must not change the caller's config
    for key, value in (overrides or {}).items():
        try:
            setattr(settings, key, value)
        except ValueError as err:
            raise ConfigError(f"--{key} {value}: {err.errors()[0]['msg']}") from None
    return settings


def run_audit(model, out_dir, manifest=None, heldout=None, prompts=None, adapter=None, config=None,
              overrides: dict | None = None, model_config=None) -> dict:
    """Audit a checkpoint and write the output folder; returns what metrics.json holds. ``model``: a diffusers
    folder, or a single-file checkpoint with ``model_config`` (a diffusers folder of its architecture);
    ``adapter``: any kind in ``loading.ADAPTER_KINDS``."""
    import torch

    from ..config.devices import resolve_device, torch_dtype
    from ..data import run_salt
    from ..errors import ConfigError
    from ..runs import claim_out_dir
    from .checks import AuditRun, generate, run_checks
    from .loading import choose_prompts, load_image_set, load_model
    from .outputs import write_outputs

    settings = audit_settings(config, overrides)
    if manifest is None and prompts is None:
        raise ConfigError("nothing to audit: give the training manifest (--manifest) or a prompts file (--prompts)")
    out = claim_out_dir(out_dir, "audit")
    torch.manual_seed(settings.seed)
    pipe, kind = load_model(model, adapter, resolve_device(settings.device), torch_dtype(settings.dtype), model_config)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    size = min(native, settings.analysis_resolution or native)
    salt = run_salt(out)
    train = load_image_set(manifest, size, settings.on_error, "training images", salt) if manifest else None
    held = load_image_set(heldout, size, settings.on_error, "held-out images", salt) if heldout else None
    prompt_list = read_prompts(prompts) if prompts else train.captions
    chosen = choose_prompts(prompt_list, settings.max_prompts, settings.seed)
    inputs = {"model": str(model), "model_config": str(model_config) if model_config else None,
              "adapter": str(adapter) if adapter else None, "adapter_kind": kind,
              "manifest": str(manifest) if manifest else None, "heldout": str(heldout) if heldout else None,
              "prompts": str(prompts) if prompts else None}
    run = AuditRun(settings, out, pipe, chosen, train, held, inputs, size, Path(settings.cache_dir or out / "cache"))
    for skipped_set in (train, held):
        for path, problem in (skipped_set.skipped if skipped_set else []):
            run.state.warnings.append(f"skipped unreadable item: {path}: {problem}")
    generate(run)
    run_checks(run)
    return write_outputs(run)


from ..api import audit, callable_package  # noqa: E402  (the functions above must exist first)

callable_package(__name__, audit)  # memcontrol.audit(model, out=...) runs an audit (memcontrol.api)
