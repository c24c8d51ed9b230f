"""The mask: which sites are trained, with which adaptation family and hyperparameters; its ``mask.json`` form.

``mask.json`` (schema ``memcontrol.mask``, version 1)::

    {"schema": "memcontrol.mask", "version": 1,
     "family": "lora", "params": {"rank": 4, "alpha": 4, "dropout": 0.0},
     "sites": [{"name": "down_blocks.1.attentions.0", "pattern": "down_blocks\\.1\\.attentions\\.0(?:\\..+)?"}],
     "layout": "77aa11501b743307"}

A site's ``pattern`` is a regex full-matched against module names and is what gets applied; ``name`` is for
people. Hand-written masks may list sites as plain names (the pattern is derived), give only a ``pattern``, and
leave out ``layout`` (then the model's layout is not checked, only that every pattern matches).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MaskError
from .sites import Site, enumerate_sites, site_pattern

SCHEMA = "memcontrol.mask"
VERSION = 1

# Hyperparameters of each family with their defaults. rank/alpha follow peft (scale = alpha / rank); OFT uses
# orthogonal blocks of ``block_size`` (peft's ``oft_block_size``).
FAMILY_PARAMS: dict[str, dict[str, Any]] = {
    "lora": {"rank": 4, "alpha": 4.0, "dropout": 0.0},
    "loha": {"rank": 4, "alpha": 4.0, "rank_dropout": 0.0, "module_dropout": 0.0},
    "lokr": {"rank": 4, "alpha": 4.0, "rank_dropout": 0.0, "module_dropout": 0.0, "decompose_both": False,
             "decompose_factor": -1},
    "oft": {"block_size": 8, "module_dropout": 0.0, "coft": False, "eps": 6e-5, "block_share": False},
    "bitfit_norm": {},
    "unfreeze": {},
}
FAMILIES = tuple(FAMILY_PARAMS)
PEFT_FAMILIES = ("lora", "loha", "lokr", "oft")
_PROBABILITIES = ("dropout", "rank_dropout", "module_dropout")


@dataclass
class Mask:
    """Sites switched on + adaptation family + its hyperparameters.

    ``sites`` takes site names or ``Site`` objects (from ``enumerate_sites``); ``params`` is completed with the
    family's defaults; ``layout`` is the fingerprint of the UNet layout the mask was made on (None: not checked;
    ``export_adapter`` records the layout it was trained on); ``patterns`` maps a site name to its regex when it
    is not the one derived from the name.
    """

    sites: list
    family: str
    params: dict = field(default_factory=dict)
    layout: str | None = None
    patterns: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.family not in FAMILY_PARAMS:
            raise MaskError(f"unknown adaptation family '{self.family}'; choose one of {', '.join(FAMILIES)}")
        names, patterns = [], dict(self.patterns)
        for site in self.sites:
            if isinstance(site, Site):
                patterns.setdefault(site.name, site.pattern)
                site = site.name
            if not isinstance(site, str) or not site:
                raise MaskError(f"a mask site must be a site name, got {site!r}")
            if site not in names:
                names.append(site)
        if not names:
            raise MaskError("the mask switches on no site")
        for name in names:
            pattern = patterns.get(name, site_pattern(name))
            try:
                re.compile(pattern)
            except re.error as err:
                raise MaskError(f"site '{name}': pattern {pattern!r} is not a valid regular expression ({err})")
        self.sites = names
        self.patterns = {n: p for n, p in patterns.items() if n in names and p != site_pattern(n)}
        self.params = _checked_params(self.family, self.params or {})

    @classmethod
    def full_unet(cls, unet) -> Mask:
        """Every parameter of the UNet: plain full fine-tuning."""
        return cls(enumerate_sites(unet, "block"), "unfreeze")

    def pattern_of(self, site: str) -> str:
        return self.patterns.get(site, site_pattern(site))

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "version": VERSION, "family": self.family, "params": dict(self.params),
                "sites": [{"name": s, "pattern": self.pattern_of(s)} for s in self.sites], "layout": self.layout}

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict, source: str = "mask") -> Mask:
        if not isinstance(data, dict):
            raise MaskError(f"{source}: a mask must be a mapping, got {type(data).__name__}")
        if data.get("schema", SCHEMA) != SCHEMA:
            raise MaskError(f"{source}: schema is {data.get('schema')!r}, expected '{SCHEMA}'")
        version = data.get("version", VERSION)
        if not isinstance(version, int) or version > VERSION:
            raise MaskError(f"{source}: mask version {version!r} is newer than this memcontrol reads ({VERSION})")
        unknown = set(data) - {"schema", "version", "family", "params", "sites", "layout"}
        if unknown:
            raise MaskError(f"{source}: unknown mask keys {sorted(unknown)}")
        if "family" not in data or "sites" not in data:
            raise MaskError(f"{source}: a mask needs 'family' and 'sites'")
        if not isinstance(data["sites"], list):
            raise MaskError(f"{source}: 'sites' must be a list")
        names, patterns = [], {}
        for entry in data["sites"]:
            if isinstance(entry, dict):
                if "pattern" not in entry and "name" not in entry:
                    raise MaskError(f"{source}: site entry {entry!r} needs a 'name' or a 'pattern'")
                name = entry.get("name") or entry["pattern"]
                if "pattern" in entry:
                    patterns[name] = entry["pattern"]
                names.append(name)
            else:
                names.append(entry)
        try:
            return cls(names, data["family"], data.get("params") or {}, data.get("layout"), patterns)
        except MaskError as err:
            raise MaskError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> Mask:
        path = Path(path)
        if not path.is_file():
            raise MaskError(f"{path}: mask file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MaskError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))

    def describe(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.family}({params}) on {len(self.sites)} site(s)"


def load_mask(spec: Mask | dict | str | Path) -> Mask:
    """A mask from a ``Mask``, an inline mapping (as in a config file) or a ``mask.json`` path."""
    if isinstance(spec, Mask):
        return spec
    if isinstance(spec, dict):
        return Mask.from_dict(spec)
    return Mask.from_json(spec)


def _checked_params(family: str, params: dict) -> dict:
    defaults = FAMILY_PARAMS[family]
    unknown = set(params) - set(defaults)
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise MaskError(f"unknown {family} parameter(s) {sorted(unknown)}; allowed: {allowed}")
    out = {**defaults, **params}
    for key in ("rank", "block_size"):
        if key in out and (not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1):
            raise MaskError(f"{family} {key} must be a positive integer, got {out[key]!r}")
    if "alpha" in out:
        if not isinstance(out["alpha"], (int, float)) or isinstance(out["alpha"], bool) or out["alpha"] <= 0:
            raise MaskError(f"{family} alpha must be a positive number, got {out['alpha']!r}")
        out["alpha"] = float(out["alpha"])
    for key in _PROBABILITIES:
        if key in out and not (isinstance(out[key], (int, float)) and 0.0 <= out[key] < 1.0):
            raise MaskError(f"{family} {key} must be in [0, 1), got {out[key]!r}")
    return out
