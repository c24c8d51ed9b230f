"""The Optuna side of the search: storage URLs, samplers, the trial budget, and recovery of interrupted trials.

Several workers (processes, GPUs, machines) run one study by pointing at the same storage; there is no scheduler
of our own. What makes that safe is here: every running trial carries the worker that owns it and a heartbeat, so
that a trial whose worker died (SIGKILL, out of memory, a lost machine) is marked failed and queued again with the
same parameters, and the budget counts each evaluated trial once, whichever worker ran it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ..errors import ConfigError, MemcontrolError

log = logging.getLogger(__name__)

DIRECTIONS = ("minimize", "minimize")  # memorization, quality distance
SQLITE_SUFFIXES = {".db", ".sqlite", ".sqlite3"}
JOURNAL_SUFFIXES = {".log", ".journal"}

# User attributes the search writes on trials (visible as they are in optuna-dashboard).
ATTR_WORKER = "worker"            # "host:pid" of the process running the trial
ATTR_HEARTBEAT = "heartbeat"      # unix time of the owner's last sign of life
ATTR_INTERRUPTED = "interrupted"  # the worker died; the trial was queued again
ATTR_RETRY_OF = "retry_of"        # number of the interrupted trial this one repeats
ATTR_ATTEMPT = "attempt"
ATTR_SURPLUS = "surplus"          # asked but not run (the budget was used by other workers)
ATTR_STATUS = "status"            # ok | stopped | failed
ATTR_REASON = "reason"
STUDY_ATTR_FINGERPRINT = "memcontrol_fingerprint"
STUDY_ATTR_READY = "memcontrol_ready"


# --- storage -----------------------------------------------------------------------------------------------------

def hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def resolve_storage_url(storage: str | None, out_dir: str | Path) -> str:
    """The storage as a URL: SQLite at ``OUT/study.db`` by default; ``journal:PATH`` or a ``.log`` path for
    Optuna's journal file; any SQLAlchemy URL (``postgresql://``, ``mysql://``, ``sqlite:///``) as it is."""
    if not storage:
        return f"sqlite:///{(Path(out_dir) / 'study.db').resolve()}"
    storage = str(storage)
    if storage.startswith("journal:"):
        return "journal:" + str(Path(storage[len("journal:"):]).expanduser().resolve())
    if "://" in storage:
        return storage
    path = Path(storage).expanduser().resolve()
    if path.suffix in JOURNAL_SUFFIXES:
        return f"journal:{path}"
    if path.suffix in SQLITE_SUFFIXES:
        return f"sqlite:///{path}"
    raise ConfigError(f"storage '{storage}': give a URL (sqlite:///FILE.db, postgresql://USER@HOST/DB), "
                      f"journal:FILE, or a path ending in {', '.join(sorted(SQLITE_SUFFIXES | JOURNAL_SUFFIXES))}")


def open_storage(url: str, attempts: int = 4) -> optuna.storages.BaseStorage:
    """Open (and create if needed) the storage behind ``url``. Opening is retried a few times because workers
    started together race to create the same tables."""
    for attempt in range(attempts):
        try:
            return _open_storage_once(url)
        except (MemcontrolError, ImportError):
            raise
        except Exception as err:  # noqa: BLE001 - the database driver's errors have no common base class
            if attempt == attempts - 1:
                raise MemcontrolError(f"cannot open the study storage {hide_password(url)}: "
                                      f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
            time.sleep(0.5 + random.random() * 2 ** attempt)
    raise AssertionError("unreachable")


def _open_storage_once(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    scheme = url.split("://", 1)[0].lower()
    if scheme.startswith("sqlite"):
        db = url.split(":///", 1)[-1]
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        # Several processes write to one file: wait for the lock instead of failing at once.
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    if scheme.startswith(("postgresql", "postgres", "mysql")):
        if scheme in ("postgresql", "postgres"):
            url = "postgresql+" + _postgres_driver() + "://" + url.split("://", 1)[1]
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except ImportError as err:
            raise ConfigError(f"storage {hide_password(url)}: its database driver is not installed ({err}); "
                              "for PostgreSQL: pip install 'memcontrol[postgres]'") from None
    raise ConfigError(f"storage '{hide_password(url)}': unknown kind '{scheme}' "
                      "(use sqlite:///, postgresql://, mysql:// or journal:FILE)")


def _postgres_driver() -> str:
    """SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3; use whichever of psycopg 3 and psycopg2 is installed."""
    import importlib.util

    return "psycopg" if importlib.util.find_spec("psycopg") else "psycopg2"


# --- samplers ------------------------------------------------------------------------------------------------------

def population_size(n_trials: int) -> int:
    """NSGA-II's population for a budget: its first generation is random, so a population of Optuna's default 50
    would make a 20-trial search pure random sampling. A quarter of the budget leaves about four generations."""
    return max(4, min(50, round(n_trials / 4)))


def make_sampler(kind: str, n_trials: int, seed: int, population: int | None = None):
    """Hard limits need no sampler option: trials record them with ``Trial.set_constraint`` (Optuna 5), which
    NSGA-II and TPE read."""
    kind = (kind or "nsga2").lower().replace("-", "").replace("_", "")
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population or population_size(n_trials), seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=max(2, min(10, n_trials // 3)))
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"search.sampler '{kind}': choose nsga2, tpe or random")


def worker_seed(base_seed: int, worker_index: int, trials_so_far: int) -> int:
    """A sampler seed that differs between workers and between a run and its resumption, so that no two samplers
    propose the same random candidates, yet is reproducible from the same history."""
    digest = hashlib.sha256(f"{base_seed}:{worker_index}:{trials_so_far}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def reseed_for_trial(sampler, base_seed: int, trial_number: int) -> None:
    """Reseed the sampler's random states from the trial number, right after ``ask``: the random parameters a trial
    draws then depend on its number only, so workers started at the same moment on several machines (with equal
    seeds) do not propose the same candidates, and a single worker stays reproducible."""
    seed = worker_seed(base_seed, -1, trial_number)
    stack, seeded = [sampler], False
    while stack:
        for value in vars(stack.pop()).values():
            if isinstance(getattr(value, "rng", None), np.random.RandomState):
                value.rng.seed(seed)
                seeded = True
            elif isinstance(value, optuna.samplers.BaseSampler):
                stack.append(value)
    if not seeded:
        sampler.reseed_rng()


@dataclass
class Constraint:
    """A hard limit on a trial metric: ``metric <= max`` (or ``>= min``), recorded with Optuna's
    ``Trial.set_constraint`` so that the samplers and the Pareto front treat a violating trial as infeasible."""
    metric: str
    max: float | None = None
    min: float | None = None

    @property
    def key(self) -> str:
        return f"{self.metric}<={self.max}" if self.max is not None else f"{self.metric}>={self.min}"

    def violation(self, metrics: dict) -> float:
        """> 0 when violated. A trial without the metric (stopped early, before sampling) is infeasible."""
        value = metrics.get(self.metric)
        if value is None:
            return 1.0
        return float(value) - self.max if self.max is not None else self.min - float(value)


def parse_constraints(items) -> list[Constraint]:
    out = []
    for item in items or []:
        if not isinstance(item, dict) or "metric" not in item or (("max" in item) == ("min" in item)):
            raise ConfigError(f"search.constraints: each entry needs 'metric' and one of 'max'/'min', got {item!r}")
        out.append(Constraint(str(item["metric"]), item.get("max"), item.get("min")))
    return out


def record_constraints(trial: optuna.trial.Trial, constraints: list[Constraint], metrics: dict) -> None:
    for c in constraints:
        trial.set_constraint(c.key, c.violation(metrics))


def is_feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


# --- studies -------------------------------------------------------------------------------------------------------

def fingerprint(sections: dict) -> dict[str, str]:
    """Per-section hashes of what makes results comparable; stored with the study and checked on resume."""
    return {name: hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for name, value in sections.items()}


def open_study(storage, name: str, sampler=None, fingerprint_sections: dict | None = None) -> tuple[optuna.Study, bool]:
    """Create or load the study ``name``. Returns (study, created): exactly one of the processes that open a new
    study concurrently gets ``created=True`` and is responsible for setting it up (queueing baselines)."""
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=list(DIRECTIONS), sampler=sampler)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
        created = False
    if [d.name.lower() for d in study.directions] != list(DIRECTIONS):
        raise ConfigError(f"study '{name}' in the storage has directions {study.directions}, not two to minimise; "
                          "use another --out, storage or search.study_name")
    if fingerprint_sections is not None:
        check_fingerprint(study, fingerprint(fingerprint_sections), created)
    return study, created


def check_fingerprint(study: optuna.Study, current: dict[str, str], created: bool) -> None:
    stored = study.user_attrs.get(STUDY_ATTR_FINGERPRINT)
    if stored is None:
        study.set_user_attr(STUDY_ATTR_FINGERPRINT, current)
        return
    changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if changed:
        raise ConfigError(
            f"study '{study.study_name}' was run with a different configuration ({', '.join(changed)} changed); "
            "its results would not be comparable. Use a new --out folder, another --storage, or search.study_name")


def mark_ready(study: optuna.Study) -> None:
    study.set_user_attr(STUDY_ATTR_READY, True)


def wait_until_ready(study: optuna.Study, timeout_s: float = 60.0) -> bool:
    """A worker that did not create the study waits for its creator to finish setting it up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if optuna.load_study(storage=study._storage, study_name=study.study_name).user_attrs.get(STUDY_ATTR_READY):
            return True
        time.sleep(0.5)
    return False


# --- budget and recovery ---------------------------------------------------------------------------------------------

def is_evaluated(trial: FrozenTrial) -> bool:
    """A trial that used its share of the budget: finished, stopped early, or failed on its own (a trial whose
    worker died is not: it is queued again; nor is a surplus trial, never run)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and not (trial.user_attrs.get(ATTR_INTERRUPTED)
                                                   or trial.user_attrs.get(ATTR_SURPLUS))


def discard_surplus(study: optuna.Study, trial: optuna.trial.Trial, why: str) -> None:
    """End a trial that was asked for but will not run (the budget went to other workers, or nothing was left to
    take): recorded as failed and marked, so that no count or report takes it for a result."""
    trial.set_user_attr(ATTR_SURPLUS, True)
    trial.set_user_attr(ATTR_REASON, why)
    study.tell(trial, state=TrialState.FAIL)


def claimed_before(study: optuna.Study, number: int) -> int:
    """How many trials numbered below ``number`` are evaluated or running: when it reaches the budget, a trial
    just asked by one of several workers is one too many."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.number < number and (is_evaluated(t) or t.state == TrialState.RUNNING))


def budget_used(study: optuna.Study) -> int:
    """Evaluated plus running trials: what a worker checks before it asks for another trial."""
    trials = study.get_trials(deepcopy=False)
    return sum(1 for t in trials if is_evaluated(t) or t.state == TrialState.RUNNING)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(trial: FrozenTrial, grace_s: float, now: float | None = None) -> bool:
    """A running trial whose worker is gone: a dead process on this machine, or no heartbeat for ``grace_s``."""
    if trial.state != TrialState.RUNNING:
        return False
    owner = str(trial.user_attrs.get(ATTR_WORKER, ""))
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
        return True
    last = trial.user_attrs.get(ATTR_HEARTBEAT)
    if last is None:  # asked but not yet claimed: judge by its start time
        last = trial.datetime_start.timestamp() if trial.datetime_start else None
    return last is not None and (time.time() if now is None else now) - float(last) > grace_s


def reclaim_stale_trials(study: optuna.Study, grace_s: float, max_attempts: int) -> list[int]:
    """Mark trials of dead workers failed (reason recorded) and queue each again with the same parameters, up to
    ``max_attempts`` attempts. Returns the numbers of the reclaimed trials."""
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if is_stale(t, grace_s) and give_back(study, t, f"worker {t.user_attrs.get(ATTR_WORKER, '?')} stopped",
                                                   max_attempts)]


def give_back(study: optuna.Study, trial: FrozenTrial, why: str, max_attempts: int) -> bool:
    """End a running trial that will not finish as interrupted (failed, not counted in the budget) and queue it
    again. False when it had finished or another worker took it back first."""
    storage = study._storage
    try:
        # Attributes first: a finished trial cannot be changed any more.
        storage.set_trial_user_attr(trial._trial_id, ATTR_INTERRUPTED, True)
        storage.set_trial_user_attr(trial._trial_id, ATTR_STATUS, "failed")
        storage.set_trial_user_attr(trial._trial_id, ATTR_REASON, f"interrupted: {why}")
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    attempt = int(trial.user_attrs.get(ATTR_ATTEMPT, 1))
    if attempt >= max_attempts:
        log.warning("trial %d was interrupted %d times; not run again", trial.number, attempt)
        return True
    attrs = {k: v for k, v in trial.user_attrs.items()
             if k not in (ATTR_WORKER, ATTR_HEARTBEAT, ATTR_INTERRUPTED, ATTR_STATUS, ATTR_REASON)}
    attrs.update({ATTR_RETRY_OF: trial.number, ATTR_ATTEMPT: attempt + 1})
    study.enqueue_trial(trial.params, user_attrs=attrs)
    log.info("trial %d was interrupted (%s); queued again", trial.number, why)
    return True


class Heartbeat:
    """Claims a running trial for this process and keeps its heartbeat fresh from a background thread."""

    def __init__(self, study: optuna.Study, trial: optuna.trial.Trial, interval_s: float):
        self.storage = study._storage
        self.trial_id = trial._trial_id
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{trial.number}")

    def __enter__(self):
        self.storage.set_trial_user_attr(self.trial_id, ATTR_WORKER, worker_id())
        self.storage.set_trial_user_attr(self.trial_id, ATTR_HEARTBEAT, time.time())
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.storage.set_trial_user_attr(self.trial_id, ATTR_HEARTBEAT, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                return
            except Exception as err:  # noqa: BLE001 - a missed beat must not kill the trial
                log.warning("heartbeat not recorded: %s", err)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False
