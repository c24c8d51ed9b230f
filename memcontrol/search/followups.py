"""What runs once a candidate is chosen: its re-evaluation on fresh sampling seeds, and the controls.

Re-evaluation: the chosen candidate was picked as the best of many noisy measurements, so its search-time figures
are biased in its favour (the winner's curse). Its exported adapter (or, for the base model, the base model) is
sampled again from sampling seeds no search run used, and measured again; the report shows both.

Controls separate *which* sites the chosen candidate trains from *how much* it trains: random masks over the search
space's sites with its family, family parameters, training settings (learning rate) and trainable share
(within ``controls.share_tolerance``), several draws; and LoRA on all attention blocks at its learning rate. They
are measured like any trial, on the search's sampling seeds. None are run when the base model is chosen.

They live in their own study (``<study_name>.controls``), queued like the baselines, one waiting trial each, named
by the user attribute ``followup`` = ``<what>@<chosen>`` (``reevaluate@7``, ``random_mask_0@7``,
``lora_attention@7``, ``reevaluate@base``): when a resumed study chooses another candidate, the new one's follow-ups
are queued, and the old ones stay in the storage, unreported.
"""

from __future__ import annotations

import copy
import logging
import random
import re
from pathlib import Path

import optuna
from optuna.trial import TrialState

from . import study as st
from .baselines import BASE_MODEL, baseline_candidate, queue_baselines
from .settings import SearchSettings
from .space import Candidate

log = logging.getLogger(__name__)

FOLLOWUP_ATTR = "followup"
BASE_KEY = "base"
REEVALUATE = "reevaluate"
LORA_ATTENTION = "lora_attention"
RANDOM_MASK = "random_mask"
LABELS = {REEVALUATE: "re-evaluated on fresh seeds", LORA_ATTENTION: "control: LoRA on all attention, chosen lr",
          RANDOM_MASK: "control: random mask"}


def chosen_key(row) -> str | None:
    """The follow-up key of a results row: its trial number, or ``base`` for the base model."""
    if row is None:
        return None
    return BASE_KEY if row.kind == "base" else str(row.number)


def planned(settings: SearchSettings, key: str) -> list[str]:
    """The follow-up names for the chosen candidate ``key``."""
    names = [REEVALUATE] if settings.selection["reevaluate"] else []
    controls = settings.controls
    if key != BASE_KEY and controls["enabled"]:
        names += [f"{RANDOM_MASK}_{k}" for k in range(int(controls["random_masks"]))]
        names += [LORA_ATTENTION] if controls["lora_attention"] else []
    return [f"{name}@{key}" for name in names]


def split(name: str) -> tuple[str, str]:
    what, _, key = name.partition("@")
    return what, key


def label(name: str) -> str:
    what, _ = split(name)
    if what.startswith(RANDOM_MASK + "_"):
        return f"{LABELS[RANDOM_MASK]} {int(what.rsplit('_', 1)[1]) + 1}"
    return LABELS.get(what, what)


def fresh_seed(settings: SearchSettings) -> int:
    """The re-evaluation's sampling seed. Every search run (trials, baselines, controls) draws sample j of a prompt
    from noise seeded by ``sampling.seed + j``, j < ``sampling.per_prompt`` (``memcontrol.sampling.noise_seed``);
    starting at ``sampling.seed + per_prompt`` gives seeds that none of them used."""
    return int(settings.sampling["seed"]) + int(settings.sampling["per_prompt"])


def followup_dir(out_dir: Path, name: str) -> Path:
    what, key = split(name)
    return Path(out_dir) / "controls" / f"{what}-{key}"


def open_followups(settings: SearchSettings, storage) -> optuna.Study:
    study, _ = st.open_study(storage, settings.followup_study_name,
                             fingerprint_sections=settings.fingerprint_sections())
    return study


def queue_followups(settings: SearchSettings, storage, key: str | None) -> bool:
    """Queue the chosen candidate's follow-ups that have not run; True when some are waiting to be run."""
    if key is None or not planned(settings, key):
        return False
    study = open_followups(settings, storage)
    queue_baselines(study, planned(settings, key), settings.search["max_attempts"], attr=FOLLOWUP_ATTR)
    st.reclaim_stale_trials(study, st.Recovery.from_search(settings.search))
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


# --- what a follow-up trains -----------------------------------------------------------------------------------

def chosen_candidate(settings: SearchSettings, storage, unet, key: str) -> tuple[Candidate, dict]:
    """The chosen candidate rebuilt from its stored parameters, and its trial's user attributes."""
    from optuna.trial import FixedTrial

    from .worker import bind_space

    if key == BASE_KEY:
        return baseline_candidate(BASE_MODEL, settings, unet), {}
    trial = optuna.load_study(storage=storage, study_name=settings.study_name).trials[int(key)]
    return bind_space(settings, unet).sample(FixedTrial(trial.params)), dict(trial.user_attrs)


def site_sizes(unet, family: str, family_params: dict, granularity: str, among: set[str]) -> dict[str, int]:
    """The parameters ``family`` trains in each site of ``among`` it can train (the mask applied to a copy of the
    UNet)."""
    from ..masks import Mask, adaptable_sites, apply_mask

    sites = [s for s in adaptable_sites(unet, family, granularity) if s.name in among]
    applied = apply_mask(copy.deepcopy(unet), Mask([s.name for s in sites], family, family_params))
    trained = [(name.rsplit(".", 1)[0], p.numel()) for name, p in applied.unet.named_parameters() if p.requires_grad]
    sizes = {}
    for s in sites:
        pattern = re.compile(s.pattern)
        sizes[s.name] = sum(n for module, n in trained if pattern.fullmatch(module))
    del applied
    return {k: v for k, v in sizes.items() if v}


def draw_sites(sizes: dict[str, int], avoid: set[str], target: int, tolerance: float, seed: str,
               attempts: int = 2000) -> list[str]:
    """Random sites whose trained parameters add up to ``target`` within ``tolerance`` (relative) and that are not
    the set ``avoid``; the closest draw found when none fits (its share is recorded and shown as it is)."""
    rng = random.Random(seed)
    names = sorted(sizes)
    low, high = target * (1 - tolerance), target * (1 + tolerance)
    best, best_gap = None, float("inf")
    for _ in range(attempts):
        rng.shuffle(names)
        picked, total = [], 0
        for name in names:
            if total >= target:
                break
            if total + sizes[name] <= high:
                picked.append(name)
                total += sizes[name]
        if not picked or set(picked) == avoid:
            continue
        if low <= total <= high:
            return sorted(picked)
        if abs(total - target) < best_gap:
            best, best_gap = sorted(picked), abs(total - target)
    if best is None:
        from ..errors import MaskError

        raise MaskError(f"no random set of sites other than the chosen one can be drawn ({len(names)} site(s))")
    return best


def followup_candidate(settings: SearchSettings, storage, unet, name: str) -> tuple[Candidate, dict]:
    """What the follow-up ``name`` evaluates, and how: ``adapter`` and ``sampling_seed`` for the re-evaluation."""
    from ..masks import enumerate_sites
    from .worker import bind_space, trial_dir

    what, key = split(name)
    chosen, attrs = chosen_candidate(settings, storage, unet, key)
    if what == REEVALUATE:
        adapter = None if key == BASE_KEY else trial_dir(settings.out_dir, int(key)) / "adapter"
        return chosen, {"adapter": adapter, "sampling_seed": fresh_seed(settings)}
    if what == LORA_ATTENTION:
        rank = int(settings.baselines["lora_rank"])
        params = dict(chosen.family_params) if chosen.family == "lora" else {"rank": rank, "alpha": float(rank)}
        sites = [s.name for s in enumerate_sites(unet, "block") if s.kind == "attention"]
        return Candidate(sites, "block", "lora", params, dict(chosen.train)), {}
    if what.startswith(RANDOM_MASK + "_"):
        # Random sites of the search space: a point the search could have drawn, with the chosen one's budget.
        space_sites = {name for switch in bind_space(settings, unet).switches for name in switch.sites}
        sizes = site_sizes(unet, chosen.family, chosen.family_params, chosen.granularity, space_sites)
        target = int(attrs.get("trainable") or sum(sizes.get(s, 0) for s in chosen.sites))
        sites = draw_sites(sizes, set(chosen.sites) & set(sizes), target, float(settings.controls["share_tolerance"]),
                           seed=f"{settings.search['seed']}:{key}:{what}")
        return Candidate(sites, chosen.granularity, chosen.family, dict(chosen.family_params), dict(chosen.train)), {}
    raise ValueError(f"unknown follow-up {name!r}")
