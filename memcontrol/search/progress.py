"""Progress a person can follow: each worker says which run it is at (trial, baseline, base model, control), in which
phase (train, sample, metrics), at which training step, and about how long the whole search has left. The lines go
through logging, so the terminal and ``OUT/search.log`` get the same ones: one when a run or phase starts, and one
every ``search.progress_every_s`` seconds while a run trains.

The time left is an estimate from the work measured so far, read from the study storage (so it counts every
worker's finished runs): seconds per training step and per evaluation (sampling + metrics), times the runs left
(trial budget, waiting baselines, the follow-ups still to come), shared among this machine's workers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from . import study as st
from .settings import SearchSettings

log = logging.getLogger(__name__)


def fmt_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


@dataclass
class Estimate:
    done: int                      # runs finished (trials, baselines, follow-ups)
    left: int                      # runs not finished, the one starting included
    seconds_per_step: float | None
    seconds_per_eval: float | None
    steps_per_run: float
    workers: int

    def seconds_left(self, current_left: float = 0.0, current_rate: float | None = None) -> float | None:
        """Seconds until the search ends: ``current_left`` for the run at hand, then the other runs left."""
        per_step = self.seconds_per_step if self.seconds_per_step is not None else current_rate
        if per_step is None or self.seconds_per_eval is None:
            return None
        per_run = self.steps_per_run * per_step + self.seconds_per_eval
        return current_left + max(0, self.left - 1) * per_run / self.workers


def _load(storage, name: str):
    try:
        return optuna.load_study(storage=storage, study_name=name).get_trials(deepcopy=False)
    except KeyError:
        return None


def estimate(settings: SearchSettings, storage) -> Estimate:
    from .followups import planned

    trials = _load(storage, settings.study_name) or []
    others = [t for name in (settings.baseline_study_name, settings.followup_study_name)
              for t in (_load(storage, name) or []) if not t.user_attrs.get(st.ATTR_SURPLUS)]
    finished = [t for t in trials + others if st.is_evaluated(t)]
    left = max(0, settings.n_trials - sum(st.is_evaluated(t) for t in trials))
    left += sum(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in others)
    if _load(storage, settings.followup_study_name) is None:
        left += len(planned(settings, "next"))  # queued once a candidate is chosen
    trained = [t.user_attrs for t in finished if t.user_attrs.get("steps")]
    evaluated = [t.user_attrs for t in finished if "sample_seconds" in t.user_attrs]
    steps = sum(a["steps"] for a in trained)
    budgets = [a["step_budget"] for a in trained if a.get("step_budget")]
    return Estimate(
        done=len(finished), left=left,
        seconds_per_step=sum(a.get("train_seconds", 0.0) for a in trained) / steps if steps else None,
        seconds_per_eval=(sum(a["sample_seconds"] + a.get("metric_seconds", 0.0) for a in evaluated) / len(evaluated)
                          if evaluated else None),
        steps_per_run=sum(budgets) / len(budgets) if budgets else float(settings.train.get("steps", 0)),
        workers=max(1, int(settings.search["workers"])))


class Progress:
    """One worker's progress lines (``memcontrol.search.trial`` reports phases and steps to it)."""

    def __init__(self, settings: SearchSettings, storage, worker_index: int):
        self.settings, self.storage = settings, storage
        self.who = f"worker{worker_index}"
        self.every_s = float(settings.search["progress_every_s"])
        self.label, self.estimate = "", None
        self.train_start, self.last = 0.0, 0.0

    def _left(self, seconds: float | None) -> str:
        return f"about {fmt_duration(seconds)} left in all" if seconds is not None else \
            "time left not known until a run has trained and been measured"

    def start(self, label: str) -> None:
        self.label = label
        try:
            self.estimate = estimate(self.settings, self.storage)
        except Exception as err:  # noqa: BLE001 - a progress line must never stop a run
            log.debug("no estimate: %s", err)
            self.estimate = None
        e = self.estimate
        if e is None:
            log.info("progress %s: %s starts", self.who, label)
            return
        log.info("progress %s: %s starts; %d of %d runs done; %s", self.who, label, e.done, e.done + e.left,
                 self._left(e.seconds_left(self._one_run())))

    def _one_run(self) -> float:
        e = self.estimate
        if e is None or e.seconds_per_eval is None or e.seconds_per_step is None:
            return 0.0
        return e.steps_per_run * e.seconds_per_step + e.seconds_per_eval

    def phase(self, name: str, total: int | None = None) -> None:
        unit = {"train": "steps", "sample": "images"}.get(name, "")
        log.info("progress %s: %s: %s%s", self.who, self.label, name, f" ({total} {unit})" if total else "")
        self.train_start = self.last = time.monotonic()

    def step(self, k: int, n: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and k < n:
            return
        self.last = now
        rate = (now - self.train_start) / k
        e = self.estimate
        left = None
        if e is not None:
            left = e.seconds_left((n - k) * rate + (e.seconds_per_eval or 0.0), current_rate=rate)
        log.info("progress %s: %s: train step %d/%d (%.3g s/step); %s", self.who, self.label, k, n, rate,
                 self._left(left))
