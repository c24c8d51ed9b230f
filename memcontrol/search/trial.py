"""One candidate, evaluated: mask -> fine-tune (stopped early on the noise-norm signal) -> samples -> metrics.

``evaluate_candidate`` is the small function the search calls for every trial and baseline. It never raises: what
went wrong comes back as the ``Outcome``'s status, decided here in one place (``classify``). A failure of the
candidate itself (a non-finite loss or metric, a diverged run, out of memory, a mask its family cannot train) is
``failed``: recorded, and the study goes on. Any other exception is a configuration or programming error that
would fail every candidate alike: ``error``, on which the worker stops the study. Everything a trial produces goes
to its folder: ``mask.json``, ``metrics.json`` (status, reason, metrics with their 95% intervals, compute),
``samples/`` and ``samples.png`` (the memorization samples, from training captions), ``neighbours.json`` (each
memorization sample's nearest training item), ``quality_features.safetensors`` (the features of the quality
samples, from held-out captions: the images themselves are not kept), ``error.txt`` (the traceback of an
exception) and, when asked, the trained ``adapter/`` in the export format.

Two kinds of candidate skip training: the untuned base model (family ``none``), and a candidate evaluated again
from an exported adapter (``adapter=``, the re-evaluation of the chosen one on fresh sampling seeds).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..errors import MemcontrolError
from .context import SearchContext
from .space import Candidate

log = logging.getLogger(__name__)

OK, STOPPED, FAILED, ERROR = "ok", "stopped", "failed", "error"
NO_TRAINING = "none"  # the family of the base model's candidate: nothing is trained
QUALITY_FEATURES = "quality_features.safetensors"
SCREENED = "screened"  # multi-fidelity: trained at the short budget and scored by the cheap proxies only


@dataclass
class Outcome:
    status: str                    # ok | stopped | failed | error | screened
    reason: str | None = None
    metrics: dict = field(default_factory=dict)    # scalar metrics; "memorization" and "quality" are the objectives
    compute: dict = field(default_factory=dict)    # steps, step_budget, *_seconds, early_stopped
    trainable: int | None = None
    trainable_percent: float | None = None
    signal: list = field(default_factory=list)     # (step, probe noise norm) pairs of the early-stopping check

    @property
    def objectives(self) -> list[float]:
        return [self.metrics["memorization"], self.metrics["quality"]]


class NoiseNormStop:
    """The in-loop check: every K steps, the text-conditional noise norm of the probe prompts; a value above the
    limit stops the run, since a rising noise norm is the signature of prompts being memorized."""

    def __init__(self, ctx: SearchContext):
        es = ctx.settings.early_stop
        self.ctx = ctx
        if es["max_value"] is not None:
            self.limit = float(es["max_value"])
        else:
            self.limit = float(es["max_ratio"]) * ctx.base_noise_norm
        self.history: list[tuple[int, float]] = []

    def __call__(self, step: int, unet) -> str | None:
        from .objectives import probe_signal

        value = probe_signal(self.ctx.settings, unet, self.ctx.pipe.scheduler, self.ctx.probe)
        self.history.append((step, value))
        if not math.isfinite(value) or value > self.limit:
            return f"early stop: probe noise norm {value:.4g} above the limit {self.limit:.4g} at step {step}"
        return None


def classify(err: Exception) -> str:
    """``failed`` when the exception is the candidate's own failure, ``error`` when it is not (a wrong setting, a
    missing file, a bug): such an error would repeat on every candidate, so the study must stop on it."""
    import numpy as np

    from ..errors import MaskError

    out_of_memory = isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())
    # A collapsed model's samples can make the covariance of the quality metric singular.
    degenerate = isinstance(err, (np.linalg.LinAlgError, FloatingPointError))
    return FAILED if out_of_memory or degenerate or isinstance(err, MaskError) else ERROR


def to_mask(candidate: Candidate, adaptable: set[str] | None = None):
    """The candidate's mask. With ``adaptable`` (the sites where its family has something to train), switched-on
    sites where the family trains nothing are left out, rather than failing the trial: a space that offers norms
    switches and LoRA together has candidates with both."""
    from ..errors import MaskError
    from ..masks import Mask

    sites = candidate.sites if adaptable is None else [s for s in candidate.sites if s in adaptable]
    if candidate.sites and not sites:
        raise MaskError(f"none of the candidate's {len(candidate.sites)} site(s) has a layer that "
                        f"{candidate.family} can train")
    return Mask(sites, candidate.family, candidate.family_params)


def evaluate_candidate(ctx: SearchContext, candidate: Candidate, folder: Path, early_stop: bool = True,
                       keep_adapter: bool = True, progress: bool = False, adapter: Path | None = None,
                       sampling_seed: int | None = None, screen: bool = False) -> Outcome:
    """Train, sample and measure one candidate; results in ``folder`` and in the returned ``Outcome``.

    ``adapter``: an exported adapter of this candidate, loaded instead of training (trained again, from the same
    seed, when the folder holds no finished export). ``sampling_seed``: sample from this seed, not
    ``sampling.seed``. ``screen``: the multi-fidelity first rung instead: ``search.fidelity.min_steps`` steps, then
    the cheap proxies (``memcontrol.search.fidelity.screen_scores``), no sampling; the status is then ``screened``."""
    from ..export import is_exported

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "candidate.json").write_text(json.dumps(candidate.to_dict(), indent=2) + "\n")
    start = time.perf_counter()
    try:
        settings = ctx.settings if sampling_seed is None else replace(
            ctx.settings, sampling={**ctx.settings.sampling, "seed": int(sampling_seed)})
        if candidate.family == NO_TRAINING:
            outcome = _measure(ctx, settings, ctx.pipe, folder, Outcome(OK, compute={"steps": 0, "step_budget": 0}))
            outcome.trainable, outcome.trainable_percent = 0, 0.0
        elif adapter is not None and is_exported(adapter):
            outcome = _measure(ctx, settings, _with_adapter(ctx.pipe, adapter), folder, Outcome(OK),
                               candidate.inference)
        else:
            outcome = _evaluate(ctx, settings, candidate, folder, early_stop, keep_adapter, progress, screen)
    except Exception as err:  # noqa: BLE001 - every outcome is mapped here, once; the worker acts on the status
        reason = str(err) if isinstance(err, MemcontrolError) else f"{type(err).__name__}: {err}".strip()
        outcome = Outcome(classify(err), reason)
        (folder / "error.txt").write_text(traceback.format_exc())
        log.error("trial in %s: %s: %s (traceback in error.txt)", folder, outcome.status, outcome.reason)
    finally:
        if torch.cuda.is_available():
            # The trained copy may sit in reference cycles (peft, accelerate): free its GPU memory before the next.
            gc.collect()
            torch.cuda.empty_cache()
    outcome.compute["total_seconds"] = round(time.perf_counter() - start, 3)
    (folder / "metrics.json").write_text(json.dumps(asdict(outcome), indent=2, default=float) + "\n")
    return outcome


def _with_adapter(pipe, adapter: Path):
    """A pipeline sharing ``pipe``'s components but a copy of its UNet, with the exported adapter applied."""
    import copy

    from ..export import load_adapter
    from ..training import pipeline_with_unet

    return load_adapter(pipeline_with_unet(pipe, copy.deepcopy(pipe.unet)), adapter)


def _evaluate(ctx, settings, candidate, folder, early_stop, keep_adapter, progress, screen) -> Outcome:
    from ..training import TrainConfig, finetune, pipeline_with_unet
    from .shared_training import load_shared, save_shared

    mask = to_mask(candidate, ctx.adaptable_sites(candidate.family, candidate.granularity))
    mask.to_json(folder / "mask.json")
    cfg = TrainConfig.from_dict({**settings.train, **candidate.train})
    if screen:
        from .fidelity import screen_train_config

        cfg = screen_train_config(cfg, settings.search["fidelity"])
        early_stop = False  # the probe noise norm at the end of the short run is the screen's own score
    stopper = NoiseNormStop(ctx) if early_stop and settings.early_stop["enabled"] else None
    # Adapter weights are initialised from torch's global generator when the mask is applied: seed it so that a
    # trial trained again (for export on another machine) gives the same adapter.
    torch.manual_seed(cfg.seed)
    reporter = ctx.progress
    if reporter is not None:
        reporter.phase("train", cfg.steps)
    reused = load_shared(ctx, candidate, cfg) if candidate.shared_training else None
    data = ctx.training_data(candidate.deduplicated)
    result = reused or finetune(ctx.pipe, mask, data, cfg, callback=stopper,
                                callback_every=settings.early_stop["every"] if stopper else 0, progress=progress,
                                on_step=reporter.step if reporter is not None else None)
    out = Outcome(OK, compute={"steps": result.steps, "step_budget": cfg.steps,
                               "train_seconds": round(result.seconds, 3), "early_stopped": result.status == STOPPED})
    if candidate.shared_training:
        out.compute["reused_training"] = reused is not None
    if candidate.deduplicated:
        out.compute["train_records"] = len(data)
    out.signal = stopper.history if stopper else []
    if result.applied is not None:
        out.trainable, out.trainable_percent = result.applied.trainable, result.applied.percent
    if result.losses:
        out.metrics["final_loss"] = result.final_loss
    if result.status != OK:
        out.status, out.reason = (STOPPED if result.status == STOPPED else FAILED), result.reason
        return out
    if candidate.shared_training and reused is None:
        save_shared(ctx, candidate, cfg, result)
    if screen:
        from .fidelity import screen_scores

        return screen_scores(ctx, result.applied.unet, out)

    out = _measure(ctx, settings, pipeline_with_unet(ctx.pipe, result.applied.unet), folder, out,
                   candidate.inference)
    if out.status == OK and keep_adapter:
        from ..export import export_adapter

        export_adapter(ctx.pipe, result.applied, mask, folder / "adapter", metrics=out.metrics,
                       info={"base_model": settings.model["path"], "data_size": len(ctx.cached),
                             "train": cfg.to_dict(), "result": {"status": result.status, "steps": result.steps,
                                                                "seconds": result.seconds,
                                                                "final_loss": result.final_loss}})
    return out


def _measure(ctx, settings, tuned, folder: Path, out: Outcome, inference: dict | None = None) -> Outcome:
    """Sample ``tuned`` (the sampling seed of ``settings``; ``inference``: the candidate's inference-time
    mitigation, if any) and measure the samples into ``out``."""
    from .objectives import measure, sample

    reporter = ctx.progress
    if reporter is not None:
        n = (len(ctx.sample_prompts) + len(ctx.quality_prompts)) * settings.sampling["per_prompt"]
        reporter.phase("sample", n)
    t0 = time.perf_counter()
    samples = sample(settings, tuned, ctx.sample_prompts, inference, out.metrics)
    quality_samples = sample(settings, tuned, ctx.quality_prompts, inference)
    out.compute["sample_seconds"] = round(time.perf_counter() - t0, 3)
    save_samples(samples, folder)
    if reporter is not None:
        reporter.phase("metrics")
    t0 = time.perf_counter()
    metrics, neighbours, quality_features = measure(settings, ctx.references, samples, quality_samples)
    out.compute["metric_seconds"] = round(time.perf_counter() - t0, 3)
    out.metrics.update(metrics)
    (folder / "neighbours.json").write_text(json.dumps(neighbours) + "\n")
    save_quality_features(quality_features, ctx.references.quality_embedder.name, folder)
    bad = [k for k in ("memorization", "quality") if not math.isfinite(out.metrics[k])]
    if bad:
        out.status, out.reason = FAILED, f"{' and '.join(bad)} is not finite ({out.metrics[bad[0]]})"
    return out


def save_quality_features(features: torch.Tensor, embedder: str, folder: Path) -> None:
    """The quality samples' features as ``quality_features.safetensors`` (row i: sample j of held-out caption k, in
    the same order for every run of a study), named by their embedder."""
    from safetensors.torch import save_file

    save_file({"features": features.float().contiguous()}, str(folder / QUALITY_FEATURES),
              metadata={"embedder": embedder})


def save_samples(samples: torch.Tensor, folder: Path) -> None:
    """Each sample as ``samples/NNN.png`` and all of them as one grid ``samples.png``."""
    from PIL import Image
    from torchvision.utils import make_grid

    def to_uint8(t: torch.Tensor):
        return ((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()

    (folder / "samples").mkdir(exist_ok=True)
    for i, image in enumerate(samples):
        Image.fromarray(to_uint8(image)).save(folder / "samples" / f"{i:03d}.png")
    grid = make_grid(samples.detach().float().cpu(), nrow=min(8, len(samples)), padding=2, pad_value=1.0)
    Image.fromarray(to_uint8(grid)).save(folder / "samples.png")
