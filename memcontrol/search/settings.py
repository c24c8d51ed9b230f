"""The search's configuration, read and checked once (``memcontrol.config.schema``), with the command line's
overrides applied.

Workers receive a ``SearchSettings`` (a plain, picklable object) rather than the YAML, so that all of them run with
exactly what the starting command resolved. Its sections are the validated config sections as mappings (field names
= YAML keys), which is also what the study fingerprints hash. See ``configs/search_reference.yaml`` for the options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import read_config
from ..errors import ConfigError
from .study import Constraint, parse_constraints


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
    controls: dict = field(default_factory=lambda: {"enabled": False})
    data_audit: dict = field(default_factory=lambda: {"on_duplicates": "ignore", "deduplicate": False})

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
    def followup_study_name(self) -> str:
        """The study of what runs after selection: the re-evaluation of the chosen candidate and the controls."""
        return self.search["study_name"] + ".controls"

    @property
    def memorization_metric(self) -> str:
        return self.objectives["memorization"]["metric"]

    @property
    def quality_metric(self) -> str:
        return self.objectives["quality"]["metric"]

    def fingerprint_sections(self) -> dict:
        """What makes two runs' numbers comparable: changing any of these needs a new study."""
        sections = {"model": self.model["path"], "data": self._data_identity(), "train": self.train,
                    "space": self.space, "objectives": self.objectives, "sampling": self.sampling,
                    "early_stop": self.early_stop}
        if self.search["fidelity"]["enabled"]:
            # Only when on, so that studies made before multi-fidelity existed still resume; likewise the screen's
            # schedule and memorization proxy only when they are not what screens had before the options existed
            # (so such a study resumes with memorization_proxy: noise_norm, and is refused with the new default).
            fid = dict(self.search["fidelity"])
            for key, before in (("schedule", "truncated"), ("memorization_proxy", "noise_norm")):
                if fid.get(key) == before:
                    del fid[key]
            if fid.get("quality_proxy") == "heldout_loss":
                # The sampled proxy's settings count only when it is the proxy.
                for key in ("quality_proxy", "quality_samples", "sample_steps"):
                    fid.pop(key, None)
            sections["fidelity"] = fid
        return sections

    def baseline_fingerprint_sections(self) -> dict:
        # Switching baselines on or adding one later is fine; changing how they train is not.
        how = {k: v for k, v in self.baselines.items() if k not in ("enabled", "methods")}
        return {"model": self.model["path"], "data": self._data_identity(), "train": self.train,
                "baselines": how, "objectives": self.objectives, "sampling": self.sampling}

    def _data_identity(self) -> dict:
        # Where the cache lives differs between machines sharing a study; what data it holds does not. Training on
        # the de-duplicated set is other data; the key is absent otherwise, so that earlier studies still match.
        data = {k: v for k, v in self.data.items() if k != "cache_dir"}
        if self.data_audit["deduplicate"]:
            data["deduplicate"] = {k: self.data_audit[k] for k in ("features", "threshold", "shared_patients")}
        return data


def load_settings(cfg, out_dir: str | Path, storage: str | None = None, n_trials: int | None = None,
                  timeout: float | None = None, workers: int | None = None) -> SearchSettings:
    """Settings from a config (a file, a mapping from ``memcontrol.config.load_config`` or a ``JobConfig``) and the
    command-line overrides; every mistake is a ``ConfigError`` raised before any model is loaded."""
    from .space import load_space
    from .study import resolve_storage_url

    job = read_config(cfg).model_copy(deep=True)  # the overrides below must not change the caller's config
    overrides = {k: v for k, v in (("n_trials", n_trials), ("timeout", timeout), ("workers", workers))
                 if v is not None}
    for key, value in overrides.items():
        try:
            setattr(job.search, key, value)
        except ValueError as err:
            raise ConfigError(f"--{key.replace('_', '-')} {value}: {err.errors()[0]['msg']}") from None
    out_dir = Path(out_dir).expanduser().resolve()
    if not job.model.path:
        raise ConfigError("model.path is not set: give the local diffusers folder of the base model")
    for what in ("train", "heldout"):
        if getattr(job.data, what) is None:
            raise ConfigError(f"data.{what} is not set: give the {what} images as {{source: manifest.csv or folder}}")
    data = job.data.model_dump()
    data["cache_dir"] = data["cache_dir"] or str(out_dir / "cache")
    space = job.space if isinstance(job.space, str) else job.space.model_dump(exclude_unset=True)
    load_space(space)  # distributions and family parameters: a mistake here would fail every trial
    search = job.search.model_dump()
    return SearchSettings(
        out_dir=out_dir, storage_url=resolve_storage_url(storage or search["storage"], out_dir),
        model=job.model.model_dump(), data=data, train=job.train.model_dump(exclude_unset=True), space=space,
        objectives=job.objectives.model_dump(), sampling=job.sampling.model_dump(),
        early_stop=job.early_stop.model_dump(), search=search, baselines=job.baselines.model_dump(),
        selection=job.selection.model_dump(), export=job.export.model_dump(), controls=job.controls.model_dump(),
        constraints=parse_constraints(search["constraints"]), data_audit=job.data_audit.model_dump())
