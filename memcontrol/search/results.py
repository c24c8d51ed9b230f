"""The study's results as plain rows (trials and baselines alike), the Pareto front and the chosen candidate.

Everything is read back from the storage, so the results are the same whichever worker or machine ran a trial,
and a report can be rebuilt from the storage alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

from . import study as st
from .baselines import BASELINE_ATTR, LABELS
from .selection import Point, Selection, pareto_front, select
from .settings import SearchSettings


@dataclass
class Row:
    kind: str                 # "trial" | "baseline"
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
        return Point(self.number, self.memorization, self.quality)


def _state(trial: FrozenTrial) -> str:
    if st.is_interrupted(trial):
        return "interrupted"
    if trial.state == TrialState.PRUNED and trial.user_attrs.get("fidelity") == "screen":
        return "screened"  # multi-fidelity: short budget and proxies only, never on the front
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "stopped", TrialState.FAIL: "failed",
            TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}[trial.state]


def _row(trial: FrozenTrial, kind: str) -> Row:
    values = trial.values if trial.state == TrialState.COMPLETE else None
    if kind == "baseline":
        name = trial.user_attrs.get(BASELINE_ATTR, "?")
        label = LABELS.get(name, name)
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

    @property
    def chosen(self) -> Row | None:
        return next((r for r in self.trials if r.chosen), None)

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


def collect(settings: SearchSettings, storage) -> Results:
    study = optuna.load_study(storage=storage, study_name=settings.study_name)
    trials = [_row(t, "trial") for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(st.ATTR_SURPLUS)]
    baselines = []
    if settings.baselines["enabled"]:
        try:
            bstudy = optuna.load_study(storage=storage, study_name=settings.baseline_study_name)
        except KeyError:
            bstudy = None
        if bstudy is not None:
            # The latest attempt of each baseline (an interrupted one was queued again).
            latest = {}
            for t in bstudy.get_trials(deepcopy=False):
                if t.user_attrs.get(BASELINE_ATTR) and not t.user_attrs.get(st.ATTR_SURPLUS):
                    latest[t.user_attrs[BASELINE_ATTR]] = t
            order = settings.baselines["methods"]
            baselines = [_row(latest[m], "baseline") for m in order if m in latest]
    candidates = [r for r in trials if r.state == "complete" and r.feasible
                  and all(v is not None and math.isfinite(v) for v in (r.memorization, r.quality))]
    front_points = {p.key for p in pareto_front([r.point for r in candidates])}
    front = sorted((r for r in candidates if r.number in front_points), key=lambda r: (r.memorization, r.quality))
    for r in front:
        r.pareto = True
    sel = settings.selection
    selection = select([r.point for r in candidates], sel["rule"], margin=float(sel["margin"]),
                       relative=bool(sel["relative"]), weights=tuple(sel["weights"]))
    if selection is not None:
        next(r for r in trials if r.number == selection.chosen.key).chosen = True
    return Results(trials, baselines, front, selection, settings.n_trials)
