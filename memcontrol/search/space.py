"""Search spaces: which UNet sites a candidate switches on, its adaptation family and hyperparameters.

A space is written in YAML (a ``space:`` section; the presets are ``configs/search_reference.yaml`` and
``configs/search_extended.yaml``)::

    space:
      granularity: block             # sites at block level, or "role" (attn1/attn2/ff/proj_in/proj_out/norms)
      kinds: [attention]             # which site kinds get a switch (attention, resnet, attn1, ff, norms, ...)
      sites: ["*"]                   # and/or glob patterns over site names
      exclude: []                    # patterns to leave out
      group_by: site                 # one on/off switch per site, or per "block" (all sites of a kind in a block)
      family: lora                   # fixed, or {choices: [lora, loha, lokr, oft, bitfit_norm, unfreeze]}
      family_params:                 # per family; a fixed value or a distribution
        lora: {rank: {choices: [2, 4, 8]}, alpha: 8}
      train:                         # overrides of the training config per candidate
        lr: {low: 1.0e-5, high: 1.0e-3, log: true}
        steps: 100

A distribution is ``{choices: [...]}`` (categorical) or ``{low, high}`` (with ``log: true`` and/or ``step``; integer
when both ends are integers or ``type: int``). Any other value is fixed and not searched.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import load_config
from ..config.base import as_number
from ..errors import ConfigError
from ..masks.spec import FAMILIES, FAMILY_PARAMS

PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs"
PRESETS = {"reference": "search_reference.yaml", "extended": "search_extended.yaml"}
SWITCH_PREFIX = "on:"


@dataclass
class Candidate:
    """What one trial trains: the sites switched on, the family and its hyperparameters, training overrides; and,
    for the mitigation baselines, an inference-time mitigation of its sampling (``inference``, e.g. ``{"wen": {...}}``)
    and whether its trained model is saved for, or loaded from, another trial with the same training
    (``shared_training``: ``memcontrol.search.shared_training``); and whether it trains on the de-duplicated
    training set (``deduplicated``: one record per near-duplicate group, the de-duplication baseline)."""
    sites: list[str]
    granularity: str
    family: str
    family_params: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    inference: dict = field(default_factory=dict)
    shared_training: bool = False
    deduplicated: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _number(value, where: str):
    # PyYAML reads 1e-4 (no dot) as a string.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: '{value}' is not a number") from None
    return value


class Dimension:
    """One searched or fixed value of the space."""

    def __init__(self, name: str, spec):
        self.name = name
        self.spec = spec
        if isinstance(spec, dict) and "choices" in spec:
            if not spec["choices"]:
                raise ConfigError(f"space {name}: 'choices' is empty")
            self.kind = "categorical"
            self.choices = [as_number(c) for c in spec["choices"]]
        elif isinstance(spec, dict) and ("low" in spec or "high" in spec):
            if "low" not in spec or "high" not in spec:
                raise ConfigError(f"space {name}: a range needs both 'low' and 'high'")
            self.low, self.high = _number(spec["low"], f"space {name}"), _number(spec["high"], f"space {name}")
            if self.low > self.high:
                raise ConfigError(f"space {name}: low {self.low} > high {self.high}")
            self.log = bool(spec.get("log", False))
            self.step = spec.get("step")
            is_int = spec.get("type") == "int" or (spec.get("type") != "float" and isinstance(self.low, int)
                                                  and isinstance(self.high, int) and not isinstance(self.low, bool))
            self.kind = "int" if is_int else "float"
            if self.log and self.low <= 0:
                raise ConfigError(f"space {name}: a log range needs low > 0")
        elif isinstance(spec, dict):
            raise ConfigError(f"space {name}: a mapping must have 'choices' or 'low'/'high', got {spec}")
        else:
            self.kind = "fixed"
            self.value = as_number(spec)

    def suggest(self, trial):
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log,
                                   step=None if self.step is None else float(self.step))

    @property
    def searched(self) -> bool:
        return self.kind != "fixed"


@dataclass
class Switch:
    """An on/off parameter of the space and the sites it turns on."""
    name: str
    sites: list[str]


class SearchSpace:
    """A parsed ``space`` section; ``bind(site_names)`` ties it to a model's sites."""

    def __init__(self, spec: dict):
        from ..config.base import validated
        from ..config.schema import SpaceSection

        if not isinstance(spec, dict):
            raise ConfigError(f"space must be a mapping or a preset name ({', '.join(PRESETS)}), got {spec!r}")
        self.spec = spec
        checked = validated(SpaceSection, spec, prefix=("space",))  # keys and their types; the values follow
        self.granularity, self.group_by = checked.granularity, checked.group_by
        self.kinds, self.patterns, self.exclude = checked.kinds, checked.sites, checked.exclude
        self.family = Dimension("family", checked.family)
        families = self.family.choices if self.family.kind == "categorical" else [self.family.value]
        bad = [f for f in families if f not in FAMILIES]
        if bad:
            raise ConfigError(f"space.family: unknown {bad}; families are {', '.join(FAMILIES)}")
        family_params = checked.family_params
        for fam, params in family_params.items():
            allowed = FAMILY_PARAMS.get(fam)
            if allowed is None:
                raise ConfigError(f"space.family_params.{fam}: unknown family (families: {', '.join(FAMILIES)})")
            unknown = sorted(set(params) - set(allowed))
            if unknown:
                raise ConfigError(f"space.family_params.{fam}: unknown parameters {unknown} "
                                  f"(allowed: {', '.join(allowed) or 'none'})")
        self.family_params = {fam: [Dimension(f"{fam}.{k}", v) for k, v in params.items()]
                              for fam, params in family_params.items()}
        self.train = [Dimension(k, v) for k, v in checked.train.items()]
        self.switches: list[Switch] | None = None

    def bind(self, sites) -> "SearchSpace":
        """Make the on/off switches from a model's sites (``memcontrol.masks.Site`` objects of this space's
        granularity). A pattern or kind that selects nothing is an error, so that typos do not shrink the space."""
        selected = [] if self.patterns else list(sites)
        for pattern in self.patterns:
            hits = [s for s in sites if fnmatch.fnmatchcase(s.name, pattern)]
            if not hits:
                raise ConfigError(f"space.sites: pattern '{pattern}' matches no {self.granularity}-level site "
                                  f"(examples: {', '.join(s.name for s in sites[:4])}, ...)")
            selected += hits
        if self.kinds:
            available = sorted({s.kind for s in sites})
            missing = [k for k in self.kinds if k not in available]
            if missing:
                raise ConfigError(f"space.kinds: {missing} are not {self.granularity}-level site kinds "
                                  f"(available: {', '.join(available)})")
            selected = [s for s in selected if s.kind in self.kinds]
        selected = [s for s in dict.fromkeys(selected)
                    if not any(fnmatch.fnmatchcase(s.name, p) for p in self.exclude)]
        if not selected:
            raise ConfigError("space: the sites, kinds and exclude settings leave no site to switch")
        groups: dict[str, list[str]] = {}
        for s in selected:
            key = s.name if self.group_by == "site" else f"{s.block}/{s.kind}"
            groups.setdefault(key, []).append(s.name)
        self.switches = [Switch(SWITCH_PREFIX + key, names) for key, names in groups.items()]
        return self

    def sample(self, trial) -> Candidate:
        """The candidate for an Optuna trial (or ``optuna.trial.FixedTrial`` to rebuild one from its params)."""
        if self.switches is None:
            raise RuntimeError("SearchSpace.bind(sites) must be called before sampling")
        sites = []
        for switch in self.switches:
            if trial.suggest_categorical(switch.name, [False, True]):
                sites += switch.sites
        family = self.family.suggest(trial)
        params = {d.name.split(".", 1)[1]: d.suggest(trial) for d in self.family_params.get(family, [])}
        train = {d.name: d.suggest(trial) for d in self.train}
        return Candidate(sites=sites, granularity=self.granularity, family=family, family_params=params, train=train)

    def describe(self) -> str:
        searched = [d.name for d in [self.family, *self.train, *sum(self.family_params.values(), [])] if d.searched]
        n = len(self.switches) if self.switches is not None else "?"
        return f"{n} on/off switches ({self.granularity} level, per {self.group_by}); searched: " + \
            (", ".join(searched) if searched else "switches only")


def load_space(value, presets_dir: Path = PRESETS_DIR) -> SearchSpace:
    """A ``space`` config value: a preset name, a path to a YAML file holding a ``space`` section, or the mapping."""
    if isinstance(value, str):
        path = presets_dir / PRESETS[value] if value in PRESETS else Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"space '{value}': neither a preset ({', '.join(PRESETS)}) nor a YAML file"
                              + (f" (preset file {path} is missing)" if value in PRESETS else ""))
        spec = load_config(path).get("space")
        if spec is None:
            raise ConfigError(f"{path}: no 'space' section")
        return SearchSpace(spec)
    return SearchSpace(value or {})
