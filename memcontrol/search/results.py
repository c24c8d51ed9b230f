"""The study's results as plain rows (trials, baselines, the base model, the follow-ups alike), the Pareto front
and the chosen candidate.

Everything is read back from the storage, so the results are the same whichever worker or machine ran a trial,
and a report can be rebuilt from the storage alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

from . import study as st
from .baselines import BASE_MODEL, BASELINE_ATTR, LABELS
from .selection import Point, Selection, pareto_front, select
from .settings import SearchSettings


@dataclass
class Row:
    kind: str                 # "trial" | "baseline" | "base" (the untuned model) | "reevaluation" | "control"
    number: int               # Optuna trial number in its study
    label: str
    state: str                # complete | stopped | screened | failed | interrupted | running | waiting
    memorization: float | None
    quality: float | None
    feasible: bool
    attrs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    pareto: bool = False
    chosen: bool = False

    def get(self, key, default=None):
        return self.attrs.get(key, default)

    @property
    def point(self) -> Point:
        return Point(self.number, self.memorization, self.quality, copy_rate=self.get("copy_fraction"),
                     quality_high=self.get("quality_ci_high"), base=self.kind == "base")


def _state(trial: FrozenTrial) -> str:
    if st.is_interrupted(trial):
        return "interrupted"
    if trial.state == TrialState.PRUNED and trial.user_attrs.get("fidelity") == "screen":
        return "screened"  # multi-fidelity: short budget and proxies only, never on the front
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "stopped", TrialState.FAIL: "failed",
            TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}[trial.state]


def _row(trial: FrozenTrial, kind: str) -> Row:
    from .followups import FOLLOWUP_ATTR, label as followup_label

    values = trial.values if trial.state == TrialState.COMPLETE else None
    if kind in ("baseline", "base"):
        name = trial.user_attrs.get(BASELINE_ATTR, "?")
        label = LABELS.get(name, name)
    elif kind in ("reevaluation", "control"):
        label = followup_label(trial.user_attrs.get(FOLLOWUP_ATTR, "?"))
    else:
        label = f"trial {trial.number}"
    return Row(kind=kind, number=trial.number, label=label, state=_state(trial),
               memorization=values[0] if values else None, quality=values[1] if values else None,
               feasible=st.is_feasible(trial), attrs=dict(trial.user_attrs), params=dict(trial.params))


@dataclass
class Results:
    trials: list[Row]
    baselines: list[Row]
    front: list[Row]
    selection: Selection | None
    n_trials: int
    base: Row | None = None               # the untuned base model
    reevaluation: Row | None = None       # the chosen candidate, sampled again on fresh seeds
    controls: list[Row] = field(default_factory=list)  # of the chosen candidate

    @property
    def chosen(self) -> Row | None:
        return next((r for r in [*self.trials, *([self.base] if self.base else [])] if r.chosen), None)

    @property
    def followups(self) -> list[Row]:
        return ([self.reevaluation] if self.reevaluation else []) + self.controls

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.trials:
            out[r.state] = out.get(r.state, 0) + 1
        return out

    def first_failure(self) -> str | None:
        """``label: reason`` of the first trial or baseline that failed, for a run where none completed."""
        failed = [r for r in self.baselines + self.trials if r.state in ("failed", "stopped")]  # in running order
        return next((f"{r.label}: {r.get(st.ATTR_REASON, 'no reason recorded')}" for r in failed), None)

    def early_stop_savings(self) -> dict:
        """Compute early stopping saved: the steps the stopped trials did not train, and an estimate of the time,
        from the completed trials' mean seconds per step and mean sampling + metric time."""
        done = [r for r in self.trials if r.state == "complete" and r.get("steps")]
        stopped = [r for r in self.trials if r.state == "stopped"]
        skipped_steps = sum(max(0, int(r.get("step_budget", 0)) - int(r.get("steps", 0))) for r in stopped)
        if not done:
            return {"stopped": len(stopped), "steps_saved": skipped_steps, "seconds_saved": None}
        per_step = sum(r.get("train_seconds", 0.0) for r in done) / sum(r.get("steps") for r in done)
        per_eval = sum(r.get("sample_seconds", 0.0) + r.get("metric_seconds", 0.0) for r in done) / len(done)
        return {"stopped": len(stopped), "steps_saved": skipped_steps,
                "seconds_saved": skipped_steps * per_step + len(stopped) * per_eval}


def _latest(storage, name: str, attr: str) -> dict[str, FrozenTrial]:
    """The latest attempt of each entry of a queued study, by its name (an interrupted one was queued again)."""
    try:
        study = optuna.load_study(storage=storage, study_name=name)
    except KeyError:
        return {}
    latest = {}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(attr) and not t.user_attrs.get(st.ATTR_SURPLUS):
            latest[t.user_attrs[attr]] = t
    return latest


def _usable(r: Row) -> bool:
    return (r.state == "complete" and r.feasible
            and all(v is not None and math.isfinite(v) for v in (r.memorization, r.quality)))


def collect(settings: SearchSettings, storage) -> Results:
    from .followups import FOLLOWUP_ATTR, REEVALUATE, chosen_key, planned, split

    study = optuna.load_study(storage=storage, study_name=settings.study_name)
    trials = [_row(t, "trial") for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(st.ATTR_SURPLUS)]
    latest = _latest(storage, settings.baseline_study_name, BASELINE_ATTR)
    baselines = [_row(latest[m], "baseline") for m in settings.baselines["methods"]
                 if m in latest and settings.baselines["enabled"]]
    base = _row(latest[BASE_MODEL], "base") if BASE_MODEL in latest else None
    candidates = [r for r in trials if _usable(r)]
    front_points = {p.key for p in pareto_front([r.point for r in candidates])}
    front = sorted((r for r in candidates if r.number in front_points), key=lambda r: (r.memorization, r.quality))
    for r in front:
        r.pareto = True
    sel = settings.selection
    # The base model competes under the copy_bound rule only (the other rules pick from the Pareto front).
    pool = candidates + ([base] if base is not None and _usable(base) and sel["rule"] == "copy_bound" else [])
    points = [r.point for r in pool]
    selection = select(points, sel["rule"], margin=float(sel["margin"]), relative=bool(sel["relative"]),
                       weights=tuple(sel["weights"]), copy_bound=float(sel["copy_bound"]))
    if selection is not None:
        pool[next(i for i, p in enumerate(points) if p is selection.chosen)].chosen = True
    results = Results(trials, baselines, front, selection, settings.n_trials, base=base)
    key = chosen_key(results.chosen)
    if key is not None:
        done = _latest(storage, settings.followup_study_name, FOLLOWUP_ATTR)
        for name in planned(settings, key):
            if name in done:
                row = _row(done[name], "reevaluation" if split(name)[0] == REEVALUATE else "control")
                if row.kind == "reevaluation":
                    row.label = f"{results.chosen.label}, {row.label}"
                    results.reevaluation = row
                else:
                    results.controls.append(row)
    return results
