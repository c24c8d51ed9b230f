"""The search's configuration, read and checked once: every section of a search config, with its defaults.

Workers receive a ``SearchSettings`` (a plain, picklable object) rather than the YAML, so that all of them run with
exactly what the starting command resolved. See ``configs/search_reference.yaml`` for the documented options.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import resolve_path, resolve_spec_paths, section
from ..errors import ConfigError
from .selection import RULES
from .space import as_number
from .study import Constraint, parse_constraints

log = logging.getLogger(__name__)

MEMORIZATION_METRICS = ("mean_similarity", "p95_similarity", "copy_fraction", "distance_ratio_fraction")
QUALITY_METRICS = ("fd", "kid")
BASELINES = ("full_ft", "lora_attention", "bitfit_norm")
DTYPES = ("float32", "float16", "bfloat16")

DEFAULTS = {
    "model": {"path": None, "device": "auto", "dtype": "float32"},
    "data": {"train": None, "heldout": None, "resolution": 512, "max_train": None, "cache_dir": None},
    "objectives": {"memorization": {"metric": "mean_similarity", "features": {"type": "vae"}, "tau": 0.5},
                   "quality": {"metric": "fd", "features": {"type": "vae"}, "kid_subsets": 10,
                               "kid_subset_size": 1000},
                   "bootstrap_resamples": 1000},
    "sampling": {"prompts": 16, "quality_prompts": 64, "per_prompt": 1, "steps": 20, "guidance_scale": 7.5, "seed": 0,
                 "sampler": "dpm"},
    "early_stop": {"enabled": True, "every": 50, "probe_prompts": 8, "noise_steps": 1, "max_ratio": 3.0,
                   "max_value": None},
    "search": {"n_trials": 40, "timeout": None, "sampler": "nsga2", "population_size": None, "seed": 0,
               "study_name": "memcontrol", "storage": None, "constraints": [], "enqueue": [], "heartbeat_s": 30,
               "grace_s": 300, "max_attempts": 2, "workers": 1},
    "baselines": {"enabled": True, "methods": list(BASELINES), "lora_rank": 4,
                  "lr": {"full_ft": 1e-5, "lora_attention": 1e-4, "bitfit_norm": 1e-4}},
    "selection": {"rule": "margin", "margin": 0.1, "relative": True, "weights": [0.5, 0.5]},
    "export": {"keep_adapters": "pareto"},
}


def _merged(cfg: dict, name: str) -> dict:
    values = section(cfg, name)
    defaults = DEFAULTS[name]
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ConfigError(f"config section '{name}': unknown keys {unknown} (known: {sorted(defaults)})")
    out = dict(defaults)
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            out[key] = {**defaults[key], **value}
        else:
            out[key] = value
    return out


def _data_source(cfg: dict, value, what: str) -> dict:
    if value is None:
        raise ConfigError(f"data.{what} is not set: give the {what} images as {{source: manifest.csv or folder}}")
    spec = {"source": value} if isinstance(value, (str, Path)) else dict(value)
    if "source" not in spec:
        raise ConfigError(f"data.{what} needs 'source' (a manifest CSV/JSONL or an image folder)")
    spec["source"] = str(resolve_path(cfg, spec["source"]))
    return spec


def _positive_int(value, where: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass
class SearchSettings:
    out_dir: Path
    storage_url: str
    model: dict
    data: dict
    train: dict
    space: dict | str
    objectives: dict
    sampling: dict
    early_stop: dict
    search: dict
    baselines: dict
    selection: dict
    export: dict
    constraints: list[Constraint] = field(default_factory=list)

    @property
    def n_trials(self) -> int:
        return self.search["n_trials"]

    @property
    def study_name(self) -> str:
        return self.search["study_name"]

    @property
    def baseline_study_name(self) -> str:
        return self.search["study_name"] + ".baselines"

    @property
    def memorization_metric(self) -> str:
        return self.objectives["memorization"]["metric"]

    @property
    def quality_metric(self) -> str:
        return self.objectives["quality"]["metric"]

    def fingerprint_sections(self) -> dict:
        """What makes two runs' numbers comparable: changing any of these needs a new study."""
        return {"model": self.model["path"], "data": self._data_identity(), "train": self.train, "space": self.space,
                "objectives": self.objectives, "sampling": self.sampling, "early_stop": self.early_stop}

    def baseline_fingerprint_sections(self) -> dict:
        # Switching baselines on or adding one later is fine; changing how they train is not.
        how = {k: v for k, v in self.baselines.items() if k not in ("enabled", "methods")}
        return {"model": self.model["path"], "data": self._data_identity(), "train": self.train,
                "baselines": how, "objectives": self.objectives, "sampling": self.sampling}

    def _data_identity(self) -> dict:
        # Where the cache lives differs between machines sharing a study; what data it holds does not.
        return {k: v for k, v in self.data.items() if k != "cache_dir"}


def load_settings(cfg: dict, out_dir: str | Path, storage: str | None = None, n_trials: int | None = None,
                  timeout: float | None = None, workers: int | None = None) -> SearchSettings:
    """Settings from a loaded config (``memcontrol.config.load_config``) and the command-line overrides."""
    from .study import resolve_storage_url

    ignored = sorted(set(cfg) - set(DEFAULTS) - {"train", "space", "_dir"})
    if ignored:
        # Other commands may share the file (make-phantoms, audit): their sections are not an error here.
        log.info("config sections not used by the search: %s", ", ".join(ignored))
    out_dir = Path(out_dir).expanduser().resolve()
    model = _merged(cfg, "model")
    if not model["path"]:
        raise ConfigError("model.path is not set: give the local diffusers folder of the base model")
    model["path"] = str(resolve_path(cfg, model["path"]))
    if model["dtype"] not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, got {model['dtype']!r}")
    data = _merged(cfg, "data")
    data["train"] = _data_source(cfg, data["train"], "train")
    data["heldout"] = _data_source(cfg, data["heldout"], "heldout")
    data["resolution"] = _positive_int(data["resolution"], "data.resolution", 8)
    if data["max_train"] is not None:
        _positive_int(data["max_train"], "data.max_train")
    data["cache_dir"] = str(resolve_path(cfg, data["cache_dir"]) if data["cache_dir"] else out_dir / "cache")

    objectives = _merged(cfg, "objectives")
    if objectives["memorization"]["metric"] not in MEMORIZATION_METRICS:
        raise ConfigError(f"objectives.memorization.metric '{objectives['memorization']['metric']}': choose one of "
                          f"{', '.join(MEMORIZATION_METRICS)}")
    if objectives["quality"]["metric"] not in QUALITY_METRICS:
        raise ConfigError(f"objectives.quality.metric '{objectives['quality']['metric']}': choose one of "
                          f"{', '.join(QUALITY_METRICS)}")
    for key in ("kid_subsets", "kid_subset_size"):
        _positive_int(objectives["quality"][key], f"objectives.quality.{key}", 2 if key == "kid_subset_size" else 1)
    _positive_int(objectives["bootstrap_resamples"], "objectives.bootstrap_resamples", 100)
    for name in ("memorization", "quality"):
        if isinstance(objectives[name].get("features"), dict):
            objectives[name]["features"] = resolve_spec_paths(cfg, objectives[name]["features"])
    sampling = _merged(cfg, "sampling")
    for key in ("prompts", "quality_prompts", "per_prompt", "steps"):
        _positive_int(sampling[key], f"sampling.{key}")
    if sampling["quality_prompts"] * sampling["per_prompt"] < 2:
        raise ConfigError("sampling: at least two quality samples per trial are needed to measure quality")
    early_stop = _merged(cfg, "early_stop")
    if early_stop["enabled"]:
        _positive_int(early_stop["every"], "early_stop.every")
        _positive_int(early_stop["probe_prompts"], "early_stop.probe_prompts")
        if early_stop["max_ratio"] is None and early_stop["max_value"] is None:
            raise ConfigError("early_stop: set max_ratio or max_value (or enabled: false)")

    search = _merged(cfg, "search")
    if n_trials is not None:
        search["n_trials"] = n_trials
    if timeout is not None:
        search["timeout"] = timeout
    if workers is not None:
        search["workers"] = workers
    _positive_int(search["n_trials"], "search.n_trials")
    _positive_int(search["workers"], "search.workers")
    for key in ("heartbeat_s", "grace_s"):
        if not isinstance(search[key], (int, float)) or search[key] <= 0:
            raise ConfigError(f"search.{key} must be a positive number of seconds")
    if search["grace_s"] <= 2 * search["heartbeat_s"]:
        raise ConfigError("search.grace_s must be more than twice search.heartbeat_s, or live trials would be "
                          "taken for interrupted ones")
    _positive_int(search["max_attempts"], "search.max_attempts")
    if not isinstance(search["enqueue"] or [], list) or not all(isinstance(p, dict) for p in search["enqueue"] or []):
        raise ConfigError("search.enqueue must be a list of mappings of Optuna parameters")
    search["enqueue"] = [{k: as_number(v) for k, v in p.items()} for p in search["enqueue"] or []]
    storage_url = resolve_storage_url(storage or search["storage"], out_dir)

    baselines = _merged(cfg, "baselines")
    bad = [m for m in baselines["methods"] or [] if m not in BASELINES]
    if bad:
        raise ConfigError(f"baselines.methods: unknown {bad}; choose from {', '.join(BASELINES)}")
    selection = _merged(cfg, "selection")
    if selection["rule"] not in RULES:
        raise ConfigError(f"selection.rule '{selection['rule']}': choose one of {', '.join(RULES)}")
    export = _merged(cfg, "export")
    if export["keep_adapters"] not in ("pareto", "all"):
        raise ConfigError("export.keep_adapters must be 'pareto' or 'all'")
    # Mistakes that would fail every trial are reported now, before any model is loaded.
    from ..training import TrainConfig
    from .space import load_space

    TrainConfig.from_dict(section(cfg, "train"))
    load_space(cfg.get("space", "reference"))
    return SearchSettings(
        out_dir=out_dir, storage_url=storage_url, model=model, data=data, train=dict(section(cfg, "train")),
        space=cfg.get("space", "reference"), objectives=objectives, sampling=sampling, early_stop=early_stop,
        search=search, baselines=baselines, selection=selection, export=export,
        constraints=parse_constraints(search["constraints"]))
