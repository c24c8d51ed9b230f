"""Configuration files: YAML loading with ``base:`` presets (``files``), the typed sections every job reads
(``schema``), the checks and their messages (``base``), device and dtype (``devices``).

``read_config(path)`` is the one entry point of the commands and of the Python API: it returns a ``JobConfig`` with
every default filled in and every path made absolute against the config file's folder, or raises a
``ConfigError`` naming the file, the key and the problem. Nothing heavy is imported here.
"""

from __future__ import annotations

from pathlib import Path

from .files import load_config, merge

__all__ = ["feature_spec", "load_config", "merge", "read_config"]


def read_config(config, where: str | None = None):
    """A ``JobConfig`` from a file, from a mapping already loaded (whose ``_dir`` key, if any, is the folder its
    relative paths start from), or a ``JobConfig`` (returned as it is); None gives the defaults."""
    from .base import validated
    from .schema import JobConfig

    if isinstance(config, JobConfig):
        return config
    if config is None:
        return JobConfig()
    if isinstance(config, (str, Path)):
        cfg, where = load_config(config), str(config)
    else:
        cfg = dict(config)
    folder = cfg.pop("_dir", None)
    return validated(JobConfig, cfg, where, folder)


def feature_spec(spec: dict, folder: str | Path) -> dict:
    """An embedder spec given on its own (a script's option), checked as a config's ``features`` are, with its paths
    made absolute against ``folder``."""
    from .base import validated
    from .schema import FeatureOption

    return validated(FeatureOption, {"features": spec}, folder=folder).features.model_dump()
