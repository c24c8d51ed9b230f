"""The audit job: how much of its training data does a checkpoint reproduce?

``run_audit`` loads a local diffusers pipeline (optionally with an adapter), generates seeded samples for the training
prompts (or for given prompts), runs the configured metrics and writes one folder:

  metrics.json   every number, with a ``schema_version`` (see ``SCHEMA`` below)
  prompts.csv    one row per prompt: noise norm and the worst sample's scores
  samples.csv    one row per generated sample: nearest training key and score of each check
  figures/*.png  generated images beside their nearest training image, histograms against the held-out baseline,
                 the noise-norm distribution
  report.html    one self-contained page with the tables and figures embedded

Checks that need training images (copy detection, distance ratio, tiled L2, extraction) run only with a training
manifest; quality (FD, KID) and the calibrated thresholds need held-out images. The noise norm needs neither. What is
skipped, and why, is recorded in metrics.json and in the report. Items are named by their pseudonymous key (manifest
``subject`` or file stem); nothing read from a DICOM header other than pixels reaches any output.
"""

from __future__ import annotations

import csv
import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__
from .config import load_config, merge, resolve_path, resolve_spec_paths, section
from .errors import ConfigError, DataError, MissingWeightsError
from .metrics import (build_embedder, cached_embed, copy_detection, distance_ratio, extraction,
                      noise_norm, quality_report, tiled_l2)
from .metrics.intervals import bootstrap_indices, format_interval, interval, resampled_mean
from .metrics.memorization import DEFAULT_DELTA, DEFAULT_TAU, RATIO_THRESHOLD, calibrate_tau
from .report import HtmlReport, histogram_figure, pairs_figure, save_figure
from .sampling import generate_samples

SCHEMA_VERSION = 1

# What metrics.json holds (schema_version 1); the README documents each field.
SCHEMA = {
    "schema_version": "int: 1",
    "tool": "'memcontrol audit' and the package version",
    "created": "UTC time, ISO 8601",
    "inputs": "model, adapter, manifest, heldout, prompts file (paths as given)",
    "config": "the audit settings in effect (defaults merged with the config file)",
    "counts": "prompts, samples, training_images, heldout_images",
    "summary": "headline numbers: copy fraction and mean similarity per feature space, distance-ratio and "
               "tiled-L2 fractions, extraction fraction, mean noise norm, FD/FID and KID; each with its 95% interval "
               "as <name>_ci_low and <name>_ci_high (Wilson for fractions, bootstrap over generated samples else)",
    "checks": "one entry per check that ran: noise_norm, copy_detection (per feature space), distance_ratio, "
              "tiled_l2, extraction, quality (per-sample lists are in samples.csv, not here)",
    "skipped": "list of {check, reason}",
    "warnings": "list of strings",
    "files": "names of the files written, relative to the output folder",
}

DEFAULTS = {
    "seed": 0,
    "device": "auto",
    "dtype": "float32",
    "analysis_resolution": 256,
    "max_prompts": 200,
    "on_error": "fail",
    "cache_dir": None,
    "generation": {"n_per_prompt": 1, "steps": 25, "guidance_scale": 7.5, "sampler": "dpm", "batch_size": 8},
    "features": [{"type": "vae", "tau": "heldout"}],
    "heldout_false_positive_rate": 0.0,
    "distance_ratio": {"enabled": True, "threshold": RATIO_THRESHOLD, "distinct_by": "pixels", "size": 64},
    "tiled_l2": {"enabled": True, "delta": DEFAULT_DELTA, "grid": 4, "size": 64},
    "extraction": {"enabled": False, "n_per_prompt": 16, "max_prompts": 10, "delta": DEFAULT_DELTA,
                   "min_clique": 5, "grid": 4, "size": 64},
    "noise_norm": {"enabled": True, "steps": 1, "num_inference_steps": 50, "samples_per_prompt": 1,
                   "guidance_scale": 7.5},
    "quality": {"enabled": True, "features": None, "kid_subsets": 50, "kid_subset_size": 100},
    "report": {"pairs": 16},
}


@dataclass
class ImageSet:
    images: torch.Tensor  # N x 3 x R x R in [-1, 1], at the analysis resolution
    captions: list[str]
    keys: list[str]
    skipped: list = field(default_factory=list)


@dataclass
class AuditState:
    """What the checks produce, gathered for the files and the report."""

    metrics: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    sample_columns: dict = field(default_factory=dict)
    prompt_columns: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)  # (section, caption, path)
    tables: dict = field(default_factory=dict)

    def skip(self, check: str, reason: str) -> None:
        self.skipped.append({"check": check, "reason": reason})


def audit_settings(config: dict | str | Path | None) -> dict:
    """The audit section of a config (file or mapping) merged over the defaults; paths stay as written."""
    cfg = load_config(config) if isinstance(config, (str, Path)) else dict(config or {})
    audit = section(cfg, "audit") if "audit" in cfg else {k: v for k, v in cfg.items() if k != "_dir"}
    _check_keys(audit, DEFAULTS, "audit")
    settings = merge(DEFAULTS, audit)
    settings["_dir"] = cfg.get("_dir", ".")
    if not isinstance(settings["features"], list) or not settings["features"]:
        raise ConfigError("audit.features must be a non-empty list of feature specs (e.g. [{type: vae}])")
    return settings


def _check_keys(given: dict, known: dict, where: str) -> None:
    """A misspelt key would otherwise be ignored in silence and its default used."""
    for key, value in given.items():
        if key not in known:
            raise ConfigError(f"unknown setting '{where}.{key}' (known: {', '.join(sorted(known))})")
        if isinstance(known[key], dict) and isinstance(value, dict):
            _check_keys(value, known[key], f"{where}.{key}")


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
    from .data import ImageCaptionDataset

    ds = ImageCaptionDataset(source, resolution=resolution, channels=3, on_error=on_error, salt=salt)
    images = torch.stack([ds[i]["pixel_values"] for i in tqdm(range(len(ds)), desc=f"reading {what}",
                                                              unit="img", leave=False)])
    return ImageSet(images.float(), list(ds.captions), list(ds.keys), list(ds.skipped))


def resized(images: torch.Tensor, size: int | None) -> torch.Tensor:
    if not size or images.shape[-1] == size:
        return images
    mode = "area" if images.shape[-1] > size else "bilinear"
    return F.interpolate(images, size=(size, size), mode=mode)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ConfigError(f"audit.dtype must be one of {', '.join(table)}, not '{name}'")
    return table[name]


def load_model(model, adapter, device, dtype):
    from .models import load_pipeline

    pipe = load_pipeline(model, device=device, dtype=dtype)
    if adapter:
        folder = Path(adapter)
        if not folder.is_dir():
            raise MissingWeightsError("adapter folder", folder, "--adapter")
        from .export import load_adapter

        load_adapter(pipe, folder)
    return pipe


def choose_prompts(prompts: list[str], limit: int | None, seed: int) -> list[str]:
    """Distinct prompts in first-seen order; a seeded subset of ``limit`` when there are more."""
    unique = list(dict.fromkeys(prompts))
    if limit and len(unique) > limit:
        keep = sorted(np.random.default_rng(seed).choice(len(unique), limit, replace=False).tolist())
        unique = [unique[i] for i in keep]
    return unique


def _auc(positive, negative) -> float | None:
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def _strip_samples(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("samples", "per_prompt")}


class Audit:
    """One audit run: ``run_audit`` calls the steps in order, then ``write`` produces the output folder."""

    def __init__(self, settings: dict, out_dir: Path, pipe, prompts: list[str], train: ImageSet | None,
                 heldout: ImageSet | None, inputs: dict, size: int):
        self.s = settings
        self.size = size  # the analysis resolution: every image set is compared at this size
        self.out = out_dir
        self.pipe = pipe
        self.prompts = prompts
        self.train = train
        self.heldout = heldout
        self.inputs = inputs
        self.state = AuditState()
        gen = settings["generation"]
        self.n_per_prompt = int(gen["n_per_prompt"])
        self.prompt_of_sample = np.repeat(np.arange(len(prompts)), self.n_per_prompt)
        self.generated: torch.Tensor | None = None
        self.resamples: np.ndarray | None = None  # the bootstrap's resamples of the generated samples, shared
        self.features: dict[str, dict] = {}  # feature space -> embedder and features, reused by the quality check

    # --- steps -------------------------------------------------------------------------------------------------

    def generate(self) -> None:
        gen = self.s["generation"]
        images = generate_samples(self.pipe, self.prompts, n_per_prompt=self.n_per_prompt, steps=int(gen["steps"]),
                                  seed=int(self.s["seed"]), guidance_scale=float(gen["guidance_scale"]),
                                  batch_size=int(gen["batch_size"]), sampler=gen.get("sampler"))
        self.generated = resized(images, self.size)
        self.state.sample_columns["prompt_index"] = self.prompt_of_sample.tolist()
        seeds = [int(self.s["seed"]) + j for _ in self.prompts for j in range(self.n_per_prompt)]
        self.state.sample_columns["seed"] = seeds
        # One resample matrix for every figure of the generated samples: sampling seeds first, then samples within
        # each drawn seed, so that the intervals carry the seed-to-seed variation too.
        self.resamples = bootstrap_indices(len(seeds), seed=int(self.s["seed"]), groups=seeds)

    def run_noise_norm(self) -> None:
        cfg = self.s["noise_norm"]
        if not cfg.get("enabled", True):
            self.state.skip("noise_norm", "disabled in the config")
            return
        kw = dict(steps=int(cfg["steps"]), seed=int(self.s["seed"]),
                  num_inference_steps=int(cfg["num_inference_steps"]), guidance_scale=float(cfg["guidance_scale"]),
                  samples_per_prompt=int(cfg["samples_per_prompt"]))
        values = noise_norm(self.pipe, self.prompts, **kw).numpy().astype(float)
        by_prompt = bootstrap_indices(len(values), seed=int(self.s["seed"]))
        result = {"steps": kw["steps"], "num_inference_steps": kw["num_inference_steps"],
                  "samples_per_prompt": kw["samples_per_prompt"], "n": len(values),
                  **interval(resampled_mean(values), by_prompt).fields("mean"),
                  "p95": float(np.percentile(values, 95)), "max": float(values.max())}
        series = {"audited prompts": values}
        if self.heldout is not None:
            held_prompts = choose_prompts(self.heldout.captions, self.s["max_prompts"], int(self.s["seed"]))
            held_prompts = [p for p in held_prompts if p not in set(self.prompts)]
            if held_prompts:
                held = noise_norm(self.pipe, held_prompts, **kw).numpy().astype(float)
                series["held-out captions"] = held
                result["heldout_baseline"] = {"n": len(held), "mean": float(held.mean()),
                                              "p95": float(np.percentile(held, 95))}
                # Training prompts scoring above unseen ones is what memorization of the prompts looks like.
                result["auc_audited_vs_heldout"] = _auc(values, held)
        self.state.metrics["noise_norm"] = result
        self.state.prompt_columns["noise_norm"] = values.tolist()
        fig = histogram_figure(series, xlabel=f"noise norm (mean of first {kw['steps']} step(s))",
                               title="Text-conditional noise norm per prompt")
        self._figure("noise_norm", "noise_norm.png", fig, "Noise norm per prompt (higher = more likely memorized)")

    def run_copy_detection(self) -> None:
        if self.train is None:
            self.state.skip("copy_detection", "no training manifest (--manifest)")
            return
        cache = resolve_path(self.s, self.s["cache_dir"]) if self.s["cache_dir"] else self.out / "cache"
        for spec in self.s["features"]:
            spec = resolve_spec_paths(self.s, spec)
            embedder = build_embedder({k: v for k, v in spec.items() if k != "tau"}, pipe=self.pipe,
                                      device=self.pipe.unet.device)
            name = embedder.name
            train_feats = cached_embed(embedder, self.train.images, cache, desc=f"training features [{name}]")
            gen_feats = embedder.embed(self.generated, desc=f"generated features [{name}]")
            self.features[name] = {"embedder": embedder, "generated": gen_feats}
            held_sims, calibrated = None, None
            rate = float(self.s["heldout_false_positive_rate"])
            if self.heldout is not None:
                held_feats = embedder.embed(self.heldout.images, desc=f"held-out features [{name}]")
                self.features[name]["heldout"] = held_feats
                calibrated, held_sims = calibrate_tau(held_feats, train_feats, rate)
            tau, source = spec.get("tau", DEFAULT_TAU), "config"
            if tau == "heldout":
                source = f"held-out false-positive rate {rate:g}"
                tau = calibrated
                if tau is None:
                    self.state.skip(f"copy_detection[{name}] copy decision",
                                    "tau: heldout needs held-out images (--heldout); similarities are reported")
            result = copy_detection(gen_feats, train_feats, self.train.keys, tau=float("inf") if tau is None
                                    else float(tau), indices=self.resamples)
            if tau is None:
                result.update(tau=None, copies=None, fraction=None, fraction_ci_low=None, fraction_ci_high=None,
                              attribution=[])
            result["tau_source"] = source
            self._record_copies(name, result, held_sims)

    def _record_copies(self, name: str, result: dict, held_sims) -> None:
        tau = result["tau"]
        if held_sims is not None:
            result["heldout_baseline"] = {
                "n": len(held_sims), "mean": float(held_sims.mean()), "p95": float(np.percentile(held_sims, 95)),
                "max": float(held_sims.max()),
                "fraction_above_tau": None if tau is None else float((held_sims > tau).mean())}
            if tau is not None and (held_sims > tau).mean() > 0.05:
                self.state.warnings.append(
                    f"copy_detection[{name}]: {100 * (held_sims > tau).mean():.0f}% of held-out real images exceed "
                    f"tau={tau:.3g}; the threshold is not calibrated for this feature space")
        samples = result["samples"]
        self.state.metrics.setdefault("copy_detection", {})[name] = _strip_samples(result)
        cols = self.state.sample_columns
        cols[f"similarity[{name}]"] = samples["similarity"]
        cols[f"nearest_key[{name}]"] = samples["nn_key"]
        if tau is not None:
            cols[f"copy[{name}]"] = samples["is_copy"]
        sims = np.asarray(samples["similarity"])
        self.state.prompt_columns[f"max_similarity[{name}]"] = self._per_prompt(sims, np.max)
        if tau is not None:
            self.state.prompt_columns[f"copies[{name}]"] = self._per_prompt(np.asarray(samples["is_copy"]), np.sum)
        series = {"generated vs training": sims}
        if held_sims is not None:
            series["held-out real vs training"] = held_sims
        fig = histogram_figure(series, xlabel=f"cosine similarity to nearest training image [{name}]", threshold=tau,
                               threshold_label="tau", title=f"Nearest-neighbour similarity [{name}]")
        self._figure("copy_detection", f"similarity_{_slug(name)}.png", fig,
                     f"Nearest-training-image similarity [{name}]: generated samples against the held-out baseline")
        order = np.argsort(-sims)[: int(self.s["report"]["pairs"])]
        nn_index = samples["nn_index"]
        labels = [f"{sims[i]:.3f} · {samples['nn_key'][i]}" for i in order]
        fig = pairs_figure(self.generated[order], self.train.images[[nn_index[i] for i in order]], labels)
        self._figure("copy_detection", f"pairs_{_slug(name)}.png", fig,
                     f"Most similar generated samples beside their nearest training image [{name}] "
                     "(label: similarity · training key)")
        self.state.tables[f"attribution[{name}]"] = result["attribution"]

    def run_pixel_checks(self) -> None:
        for check, func in (("distance_ratio", self._distance_ratio), ("tiled_l2", self._tiled_l2)):
            cfg = self.s[check]
            if not cfg.get("enabled", True):
                self.state.skip(check, "disabled in the config")
            elif self.train is None:
                self.state.skip(check, "no training manifest (--manifest)")
            else:
                func(cfg)

    def _distance_ratio(self, cfg) -> None:
        size = cfg.get("size")
        train = resized(self.train.images, size)
        kw = dict(threshold=float(cfg["threshold"]), distinct_by=cfg.get("distinct_by", "pixels"))
        result = distance_ratio(resized(self.generated, size), train, self.train.keys, **kw)
        series = {"generated": result["samples"]["ratio"]}
        if self.heldout is not None:
            held = distance_ratio(resized(self.heldout.images, size), train, self.train.keys, **kw)
            result["heldout_baseline"] = {"n": held["n"], "fraction": held["fraction"],
                                          "mean_ratio": held["mean_ratio"]}
            series["held-out real"] = held["samples"]["ratio"]
        self.state.metrics["distance_ratio"] = _strip_samples(result)
        cols = self.state.sample_columns
        cols["distance_ratio"] = result["samples"]["ratio"]
        cols["distance_ratio_nearest_key"] = result["samples"]["nn_key"]
        cols["distance_ratio_memorized"] = result["samples"]["is_memorized"]
        ratios = np.asarray([np.inf if r is None else r for r in result["samples"]["ratio"]])
        self.state.prompt_columns["min_distance_ratio"] = self._per_prompt(ratios, np.min)
        self.state.tables["attribution[distance_ratio]"] = result["attribution"]
        fig = histogram_figure(series, xlabel="d(x, NN1) / d(x, NN2), pixel L2", threshold=kw["threshold"],
                               threshold_label="memorized below", title="Distance-ratio test")
        self._figure("distance_ratio", "distance_ratio.png", fig, "Distance ratio of generated samples and of "
                     "held-out real images (below the line: memorized)")

    def _tiled_l2(self, cfg) -> None:
        size = cfg.get("size")
        train = resized(self.train.images, size)
        kw = dict(delta=float(cfg["delta"]), grid=int(cfg["grid"]))
        result = tiled_l2(resized(self.generated, size), train, self.train.keys, indices=self.resamples, **kw)
        series = {"generated": result["samples"]["distance"]}
        if self.heldout is not None:
            held = tiled_l2(resized(self.heldout.images, size), train, self.train.keys, **kw)
            result["heldout_baseline"] = {"n": held["n"], "fraction": held["fraction"], "mean": held["mean"]}
            series["held-out real"] = held["samples"]["distance"]
        self.state.metrics["tiled_l2"] = _strip_samples(result)
        cols = self.state.sample_columns
        cols["tiled_l2"] = result["samples"]["distance"]
        cols["tiled_l2_nearest_key"] = result["samples"]["nn_key"]
        cols["tiled_l2_copy"] = result["samples"]["is_copy"]
        self.state.prompt_columns["min_tiled_l2"] = self._per_prompt(np.asarray(result["samples"]["distance"]),
                                                                     np.min)
        self.state.tables["attribution[tiled_l2]"] = result["attribution"]
        fig = histogram_figure(series, xlabel=f"tiled L2 ({kw['grid']}x{kw['grid']} tiles, max tile RMS in [0, 1])",
                               threshold=kw["delta"], threshold_label="copy below", title="Tiled L2")
        self._figure("tiled_l2", "tiled_l2.png", fig, "Tiled L2 to the nearest training image (below the line: copy)")

    def run_extraction(self) -> None:
        cfg = self.s["extraction"]
        if not cfg.get("enabled", False):
            self.state.skip("extraction", "disabled in the config (extraction.enabled: true to run it)")
            return
        if self.train is None:
            self.state.skip("extraction", "no training manifest (--manifest)")
            return
        gen = self.s["generation"]
        prompts = self.prompts[: int(cfg["max_prompts"])]
        n = int(cfg["n_per_prompt"])
        images = generate_samples(self.pipe, prompts, n_per_prompt=n, steps=int(gen["steps"]),
                                  seed=int(self.s["seed"]) + 10_000, guidance_scale=float(gen["guidance_scale"]),
                                  batch_size=int(gen["batch_size"]), sampler=gen.get("sampler"))
        size = cfg.get("size")
        images = resized(images, size)
        result = extraction(images.view(len(prompts), n, *images.shape[1:]), resized(self.train.images, size),
                            self.train.keys, delta=float(cfg["delta"]), min_clique=int(cfg["min_clique"]),
                            grid=int(cfg["grid"]), prompts=prompts)
        result["n_per_prompt"] = n
        self.state.metrics["extraction"] = _strip_samples(result)
        self.state.tables["extraction"] = result["per_prompt"]
        by_prompt = {r["prompt"]: r for r in result["per_prompt"]}
        self.state.prompt_columns["extraction_clique"] = [by_prompt[p]["clique_size"] if p in by_prompt else None
                                                          for p in self.prompts]
        self.state.prompt_columns["extracted"] = [by_prompt[p]["extracted"] if p in by_prompt else None
                                                  for p in self.prompts]

    def run_quality(self) -> None:
        cfg = self.s["quality"]
        if not cfg.get("enabled", True):
            self.state.skip("quality", "disabled in the config")
            return
        if self.heldout is None:
            self.state.skip("quality", "no held-out images (--heldout) to compare generated images with")
            return
        features = self.features
        wanted = cfg.get("features")
        if wanted is None and features:
            wanted = next(iter(features))
        if wanted in features:
            embedder = features[wanted]["embedder"]
            real, fake = features[wanted]["heldout"], features[wanted]["generated"]
        else:
            spec = resolve_spec_paths(self.s, wanted if isinstance(wanted, dict) else {"type": wanted or "vae"})
            embedder = build_embedder({k: v for k, v in spec.items() if k != "tau"}, pipe=self.pipe,
                                      device=self.pipe.unet.device)
            real, fake = embedder.embed(self.heldout.images), embedder.embed(self.generated)
        if min(len(real), len(fake)) < 2:
            self.state.skip("quality", "fewer than 2 held-out or generated images")
            return
        result = quality_report(real, fake, embedder.name, int(cfg["kid_subsets"]), int(cfg["kid_subset_size"]),
                                int(self.s["seed"]), self.resamples)
        self.state.warnings.extend(result["warnings"])
        self.state.metrics["quality"] = result

    # --- helpers -----------------------------------------------------------------------------------------------

    def _per_prompt(self, values: np.ndarray, reduce) -> list:
        return [float(reduce(values[self.prompt_of_sample == p])) for p in range(len(self.prompts))]

    def _figure(self, section_name: str, filename: str, fig, caption: str) -> None:
        path = save_figure(fig, self.out / "figures" / filename)
        self.state.figures.append((section_name, caption, path))

    # --- outputs -----------------------------------------------------------------------------------------------

    def summary(self) -> dict:
        """Headline numbers, each with its 95% interval (``<name>_ci_low``, ``<name>_ci_high``) where it has one."""
        m = self.state.metrics
        out = {}

        def put(name: str, result: dict, key: str) -> None:
            out[name] = result[key]
            for suffix in ("_ci_low", "_ci_high"):
                if key + suffix in result:
                    out[name + suffix] = result[key + suffix]

        for name, r in m.get("copy_detection", {}).items():
            put(f"copy_fraction[{name}]", r, "fraction")
            put(f"mean_similarity[{name}]", r, "mean")
        for check in ("distance_ratio", "tiled_l2", "extraction"):
            if check in m:
                put(f"{check}_fraction", m[check], "fraction")
        if "noise_norm" in m:
            put("mean_noise_norm", m["noise_norm"], "mean")
        if "quality" in m:
            put(m["quality"]["fd_name"], m["quality"], "fd")
            put("KID", m["quality"], "kid")
        return out

    def write(self) -> dict:
        files = {"metrics": "metrics.json", "per_prompt": "prompts.csv", "per_sample": "samples.csv",
                 "report": "report.html",
                 "figures": [str(p.relative_to(self.out)) for _, _, p in self.state.figures]}
        settings = {k: v for k, v in self.s.items() if k != "_dir"}
        metrics = {
            "schema_version": SCHEMA_VERSION,
            "tool": f"memcontrol audit {__version__}",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "platform": {"python": platform.python_version(), "torch": torch.__version__},
            "inputs": self.inputs,
            "config": settings,
            "counts": {"prompts": len(self.prompts), "samples": len(self.prompt_of_sample),
                       "training_images": len(self.train.images) if self.train else 0,
                       "heldout_images": len(self.heldout.images) if self.heldout else 0},
            "summary": self.summary(),
            "checks": self.state.metrics,
            "skipped": self.state.skipped,
            "warnings": self.state.warnings,
            "files": files,
        }
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n",
                                               encoding="utf-8")
        self._write_csv("prompts.csv", {"prompt_index": list(range(len(self.prompts))), "prompt": self.prompts,
                                        **self.state.prompt_columns})
        self._write_csv("samples.csv", {"sample_index": list(range(len(self.prompt_of_sample))),
                                        **self.state.sample_columns})
        self._write_report(metrics)
        return metrics

    def _write_csv(self, name: str, columns: dict) -> None:
        with open(self.out / name, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(list(columns))
            for row in zip(*columns.values()):
                writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])

    def _write_report(self, metrics: dict) -> None:
        r = HtmlReport("Memorization audit")
        inputs = metrics["inputs"]
        r.add_text(f"Model: {inputs['model']}" + (f" with adapter {inputs['adapter']}" if inputs["adapter"] else "")
                   + f". {metrics['counts']['prompts']} prompts, {metrics['counts']['samples']} generated samples, "
                   f"{metrics['counts']['training_images']} training images, "
                   f"{metrics['counts']['heldout_images']} held-out images. Created {metrics['created']}.")
        r.add_heading("Summary")
        summary = metrics["summary"]
        r.add_table([{"measure": k, "value [95% interval]": format_interval(
            v, summary.get(f"{k}_ci_low"), summary.get(f"{k}_ci_high"))}
            for k, v in summary.items() if not k.endswith(("_ci_low", "_ci_high"))])
        r.add_text("95% intervals: Wilson intervals for fractions; for the other figures, a bootstrap over the "
                   "generated samples (over sampling seeds, then samples within them), the training and held-out "
                   "images fixed. Two audits whose intervals overlap are not shown apart by these samples.")
        for w in metrics["warnings"]:
            r.add_text(w, note=True)
        if metrics["skipped"]:
            r.add_heading("Checks not run")
            r.add_table(metrics["skipped"])
        explanations = {
            "noise_norm": "Text-conditional noise norm (Wen et al., ICLR 2024): how far the prompt pulls the first "
                          "denoising step away from the unconditional one. Needs no training data; high values "
                          "flag prompts the model may reproduce.",
            "copy_detection": "Each generated image's cosine similarity to its nearest training image in a feature "
                              "space; above tau it counts as a copy. The held-out baseline shows how similar real "
                              "unseen images are to the training set.",
            "distance_ratio": "Pixel-space test: a sample is memorized when its nearest training image is more "
                              "than 3 times closer than the second nearest (identical training records collapsed).",
            "tiled_l2": "The image is cut into tiles; the largest per-tile RMS difference to the nearest training "
                        "image. Below delta the sample is a near-exact copy everywhere.",
        }
        for name in ("noise_norm", "copy_detection", "distance_ratio", "tiled_l2", "extraction", "quality"):
            if name not in metrics["checks"]:
                continue
            r.add_heading(name.replace("_", " ").capitalize())
            if name in explanations:
                r.add_text(explanations[name])
            result = metrics["checks"][name]
            if name == "copy_detection":
                for feat, res in result.items():
                    r.add_heading(f"Feature space: {feat}", level=3)
                    r.add_table(_flat_rows(res, skip=("attribution",)))
                    r.add_table(self.state.tables.get(f"attribution[{feat}]", []), columns=["key", "copies"],
                                caption="Training items copied, and how often", max_rows=30)
            else:
                r.add_table(_flat_rows(result, skip=("attribution",)))
                for table_name in (f"attribution[{name}]", name):
                    rows = self.state.tables.get(table_name)
                    if rows:
                        r.add_table(rows, max_rows=30)
            for sec, caption, path in self.state.figures:
                if sec == name:
                    r.add_figure(path, caption=caption)
        r.add_heading("Settings")
        r.add_table(_flat_rows(metrics["config"]))
        r.write(self.out / "report.html")


def _flat_rows(d: dict, prefix: str = "", skip=()) -> list[dict]:
    """A nested mapping as (field, value) rows; ``skip`` leaves out keys shown as tables of their own."""
    rows = []
    for k, v in d.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            rows.extend(_flat_rows(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            rows.append({"field": f"{prefix}{k}", "value": json.dumps(v, default=_json_default)})
        else:
            rows.append({"field": f"{prefix}{k}", "value": v if not isinstance(v, list) else ", ".join(map(str, v))})
    return rows


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def run_audit(model, out_dir, manifest=None, heldout=None, prompts=None, adapter=None, config=None,
              overrides: dict | None = None) -> dict:
    """Audit a checkpoint and write the output folder; returns what metrics.json holds."""
    settings = audit_settings(config)
    if overrides:
        settings = merge(settings, overrides)
    if manifest is None and prompts is None:
        raise ConfigError("nothing to audit: give the training manifest (--manifest) or a prompts file (--prompts)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(settings["seed"]))
    device, dtype = _device(settings["device"]), _dtype(settings["dtype"])
    pipe = load_model(model, adapter, device, dtype)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    size = min(native, int(settings["analysis_resolution"] or native))
    from .data import run_salt

    salt = run_salt(out)
    train = load_image_set(manifest, size, settings["on_error"], "training images", salt) if manifest else None
    held = load_image_set(heldout, size, settings["on_error"], "held-out images", salt) if heldout else None
    prompt_list = read_prompts(prompts) if prompts else train.captions
    chosen = choose_prompts(prompt_list, settings["max_prompts"], int(settings["seed"]))
    inputs = {"model": str(model), "adapter": str(adapter) if adapter else None,
              "manifest": str(manifest) if manifest else None, "heldout": str(heldout) if heldout else None,
              "prompts": str(prompts) if prompts else None}
    audit = Audit(settings, out, pipe, chosen, train, held, inputs, size)
    for skipped_set in (train, held):
        for path, problem in (skipped_set.skipped if skipped_set else []):
            audit.state.warnings.append(f"skipped unreadable item: {path}: {problem}")
    audit.generate()
    audit.run_noise_norm()
    audit.run_copy_detection()
    audit.run_pixel_checks()
    audit.run_extraction()
    audit.run_quality()
    return audit.write()

