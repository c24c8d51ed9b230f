"""YAML configuration files: loading, with `base:` presets merged key by key at every depth.

A config is a nested mapping. Paths inside it are written relative to the folder of the file they are written in:
``load_config`` records the named file's folder as ``_dir``, and marks every string that comes from a ``base:`` preset
with the preset's own folder (``Written``), so that ``base: /elsewhere/configs/paper.yaml`` keeps finding the data
that preset names. The schema makes paths absolute (``base.ConfigPath``), so a command works from any working
directory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = cfg.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: `base` must be the path of a preset file, got {base!r}")
        preset = load_config(path.parent / base)
        # A preset may extend another one: its keys override the base's, key by key at every depth.
        cfg = merge(written_in(preset, preset.pop("_dir")), cfg)
    cfg["_dir"] = str(path.parent.resolve())
    return cfg


class Written(str):
    """A string of a ``base:`` preset, with the folder of the file it was written in: where a relative path in it
    starts from."""

    folder: str


def written_in(value, folder: str):
    """``value`` with each plain string in it marked as written in ``folder`` (strings already marked, from a
    preset's own base, keep their folder)."""
    if isinstance(value, dict):
        return {k: written_in(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [written_in(v, folder) for v in value]
    if isinstance(value, str) and not isinstance(value, Written):
        marked = Written(value)
        marked.folder = folder
        return marked
    return value


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
