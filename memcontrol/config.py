"""YAML configuration files: loading, relative paths, overrides.

A config is a nested mapping. Paths inside it are written relative to the config file's folder; ``resolve_path``
turns them into absolute paths so that a command works from any working directory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


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
        # A preset may extend another one: its keys override the base's, section by section.
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


def resolve_path(cfg: dict, value: str | Path | None) -> Path | None:
    """A path from a config, made absolute against the config file's folder."""
    if value is None:
        return None
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    return (Path(cfg.get("_dir", ".")) / p).resolve()


def resolve_spec_paths(cfg: dict, spec: dict) -> dict:
    """An embedder spec with its file options made absolute against the config file's folder."""
    spec = dict(spec)
    for key in ("checkpoint", "path", "weights", "config"):
        if isinstance(spec.get(key), str):
            spec[key] = str(resolve_path(cfg, spec[key]))
    return spec


def section(cfg: dict, name: str) -> dict:
    value = cfg.get(name, {}) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"config section '{name}' must be a mapping, got {type(value).__name__}")
    return value
