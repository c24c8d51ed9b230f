"""The three jobs as Python functions: ``search``, ``audit`` and ``finetune``.

Each takes a config (a YAML path, a mapping shaped like the YAML, or None for the defaults where that makes sense)
and an output folder, writes exactly what its command writes, and returns a result object. The commands in
``memcontrol.commands`` call these functions and only print what they return, so the command line and Python
share one implementation. Heavy libraries are imported inside the functions: ``import memcontrol`` stays fast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """A search run as its run folder holds it. Rows (``memcontrol.search.results.Row``) carry the two objectives
    (``memorization``, ``quality``), the state, the sampled ``params`` and every recorded metric in ``attrs``."""
    out: Path
    storage: str                  # the Optuna storage URL (open it with optuna or optuna-dashboard)
    chosen: object | None        # the Row of the chosen trial, None when no trial finished within the limits
    selection: object | None     # why it was chosen: memcontrol.search.selection.Selection (rule, explanation)
    front: list                   # Rows on the Pareto front, by memorization
    trials: list                  # every trial's Row, in the study's order
    baselines: list               # the baselines' Rows
    base: object | None           # the untuned base model's Row (always a candidate of the selection)
    reevaluation: object | None   # the chosen candidate sampled again on fresh seeds (None before it has run)
    controls: list                # share-matched random masks and LoRA-attention at the chosen learning rate
    counts: dict                  # trials by state
    budget: int                   # the study's trial budget (search.n_trials)
    table: str                    # the comparison table the command prints
    best: Path | None             # OUT/best: the chosen adapter with selection.json
    report: Path                  # OUT/report.html
    trials_csv: Path              # OUT/trials.csv: one line per trial and baseline, every metric
    pareto_csv: Path              # OUT/pareto.csv
    stopped_workers: list = field(default_factory=list)
    first_failure: str | None = None  # "label: reason" of the first failed trial
    claim: str | None = None      # OUT/claim.md: gain recovered, copy rate cut, verdicts against every other row

    @property
    def problem(self) -> str | None:
        """Why the run is not a success (a worker stopped with an error, or no trial completed), else None."""
        if self.stopped_workers:
            return f"{', '.join(self.stopped_workers)} stopped with an error (see above); the study is incomplete"
        if not self.counts.get("complete"):
            return "no trial completed" + (f"; the first failure, {self.first_failure}" if self.first_failure
                                           else "")
        return None


@dataclass
class AuditResult:
    out: Path
    metrics: dict                 # what metrics.json holds (summary, checks, skipped, warnings...)
    report: Path                  # OUT/report.html
    metrics_file: Path            # OUT/metrics.json

    @property
    def summary(self) -> dict:
        """The headline figures, each with ``<name>_ci_low`` / ``<name>_ci_high``: its 95% interval."""
        return self.metrics["summary"]


@dataclass
class FinetuneResult:
    adapter: Path                 # the export folder (load it with memcontrol.export.load_adapter or diffusers)
    metrics: dict                 # metrics.json's "metrics" (final loss)
    status: str                   # "ok"
    steps: int
    seconds: float
    final_loss: float
    training_items: int
    skipped_sites: list           # mask sites that matched nothing (with allow_partial)
    summary: str                  # trainable parameters of the mask, as the command prints it


def search(config, out, *, storage: str | None = None, n_trials: int | None = None, timeout: float | None = None,
           workers: int | None = None, progress: bool = True, check: bool = True) -> SearchResult:
    """Run (or resume) the MemControl search of ``config`` in the run folder ``out``; the same as
    ``memcontrol search``. With ``check`` a run where a worker failed or no trial completed raises
    ``MemcontrolError`` once its outputs are written."""
    from .errors import MemcontrolError
    from .search.run import run_search
    from .search.settings import load_settings

    settings = load_settings(config, out, storage=storage, n_trials=n_trials, timeout=timeout, workers=workers)
    outputs = run_search(settings, progress=progress)
    results = outputs.results
    result = SearchResult(
        out=settings.out_dir, storage=settings.storage_url, chosen=results.chosen, selection=results.selection,
        front=list(results.front), trials=list(results.trials), baselines=list(results.baselines),
        base=results.base, reevaluation=results.reevaluation, controls=list(results.controls),
        counts=results.counts(), budget=settings.n_trials, table=outputs.table, best=outputs.best,
        report=outputs.report,
        trials_csv=settings.out_dir / "trials.csv", pareto_csv=settings.out_dir / "pareto.csv",
        stopped_workers=list(outputs.stopped_workers), first_failure=results.first_failure(),
        claim=outputs.claim)
    if check and result.problem:
        raise MemcontrolError(result.problem)
    return result


def audit(model, out, *, prompts=None, manifest=None, heldout=None, adapter=None, model_config=None, config=None,
          **overrides) -> AuditResult:
    """Audit a checkpoint and write the audit folder ``out``; the same as ``memcontrol audit``. ``model``: a
    diffusers folder or a single-file checkpoint (with ``model_config``); ``adapter``: a LoRA folder or file
    (diffusers or kohya), a peft adapter folder or an export of memcontrol; ``config``: a file or mapping with an
    ``audit`` section; ``overrides``: settings of that section (``device="cuda"``, ``seed=1``)."""
    from .audit import run_audit

    metrics = run_audit(model, out, manifest=manifest, heldout=heldout, prompts=prompts, adapter=adapter,
                        config=config, overrides=overrides, model_config=model_config)
    out = Path(out)
    return AuditResult(out=out, metrics=metrics, report=out / "report.html", metrics_file=out / "metrics.json")


def finetune(config, out, *, mask=None, allow_partial: bool = False) -> FinetuneResult:
    """Fine-tune ``config``'s model with a mask and export the adapter to ``out``; the same as
    ``memcontrol finetune``. ``mask``: a mask.json path, a mapping, or a ``Mask`` (default: the config's)."""
    from .config import read_config
    from .config.devices import resolve_device, torch_dtype
    from .data import load_source, run_salt
    from .data.duplicates import audit_job_data
    from .errors import ConfigError, MemcontrolError
    from .export import METRICS_FILE, export_adapter, is_exported
    from .masks import load_mask
    from .models import load_pipeline
    from .runs import claim_out_dir
    from .training import cache_training_data
    from .training import finetune as train

    where = config if isinstance(config, (str, Path)) else "config"
    job = read_config(config)
    if mask is None and job.mask is None:
        raise ConfigError("no mask: pass --mask mask.json or give a 'mask' section (inline or a path) in the config")
    mask = load_mask(job.mask if mask is None else mask)
    if not job.model.path:
        raise ConfigError(f"{where}: model.path is missing: a local diffusers pipeline folder")
    if job.data.train is None:
        raise ConfigError(f"{where}: data.train is missing: a manifest (CSV/TSV/JSONL) or an image folder")
    out = claim_out_dir(out, "finetune")
    if is_exported(out):
        raise MemcontrolError(f"{out} already holds a finished fine-tune ({out / METRICS_FILE}); choose another "
                              "--out or remove that folder")
    salt = run_salt(out)
    dataset = load_source(job.data.train.model_dump(), job.data.resolution, job.data.max_train, salt=salt)
    skipped = getattr(dataset, "skipped", [])
    if skipped:
        log.warning("%d training item(s) skipped (first: %s: %s)", len(skipped), *skipped[0])
    # The training data are audited before the model is loaded, so that `data_audit.on_duplicates: error` stops the
    # job before any work.
    heldout = None
    if job.data.heldout is not None and (job.data_audit.on_duplicates != "ignore" or job.data_audit.deduplicate):
        heldout = load_source(job.data.heldout.model_dump(), job.data.resolution, salt=salt)
    dataset, _ = audit_job_data(dataset, heldout, job.data_audit.model_dump(), "finetune",
                                job.data.cache_dir or out / "cache")
    pipe = load_pipeline(job.model.path, device=resolve_device(job.model.device), dtype=torch_dtype(job.model.dtype),
                         option="model.path")
    cached = cache_training_data(pipe, dataset, Path(job.data.cache_dir or out / "cache"))
    log.info("finetune: %d training items; mask %s", len(cached), mask.describe())
    result = train(pipe, mask, cached, job.train, allow_partial=allow_partial)
    if result.status != "ok":
        raise MemcontrolError(f"fine-tuning {result.status} after {result.steps} step(s): {result.reason}")
    metrics = {"final_loss": result.final_loss}
    info = {"base_model": job.model.path, "data_size": len(cached), "train": job.train.to_dict(),
            "result": {"status": result.status, "steps": result.steps, "seconds": round(result.seconds, 2),
                       "final_loss": result.final_loss}}
    export_adapter(pipe, result.applied, mask, out, metrics=metrics, info=info)
    return FinetuneResult(adapter=Path(out), metrics=metrics, status=result.status, steps=result.steps,
                          seconds=result.seconds, final_loss=result.final_loss, training_items=len(cached),
                          skipped_sites=list(result.applied.unmatched), summary=result.applied.summary())


def callable_package(module_name: str, function) -> None:
    """Make the package ``module_name`` callable as ``function``. ``memcontrol.search`` and ``memcontrol.audit`` are
    also subpackages, and importing a subpackage rebinds that name on ``memcontrol`` to the module: a callable
    module keeps ``memcontrol.search(...)`` working whichever was imported first."""
    import functools
    import sys
    import types

    class JobPackage(types.ModuleType):
        @functools.wraps(function)
        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    sys.modules[module_name].__class__ = JobPackage
