"""YAML configuration files: loading, with `base:` presets merged key by key at every depth.

A config is a nested mapping. Paths inside it are written relative to the config file's folder, which ``load_config``
records as ``_dir``; the schema makes them absolute (``base.ConfigPath``) so that a command works from any working
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
        # A preset may extend another one: its keys override the base's, key by key at every depth.
        cfg = merge(load_config(path.parent / base), cfg)
    # Relative paths resolve against the file that the user named (presets used as `base:` hold no paths).
    cfg["_dir"] = str(path.parent.resolve())
    return cfg


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
