"""The Optuna side of the search: storage URLs, samplers, the trial budget, and recovery of interrupted trials.

Several workers (processes, GPUs, machines) run one study by pointing at the same storage; there is no scheduler
of our own. What makes that safe is here: every running trial has a heartbeat, so that a trial whose worker died
(SIGKILL, out of memory, a lost machine) is marked failed and queued again with the same parameters, and the budget
counts each evaluated trial once, whichever worker ran it. On SQL storages the heartbeat and the retry are Optuna's
own (``RDBStorage(heartbeat_interval=...)``, ``RetryHeartbeatStaleTrialCallback``); the journal storage has no
heartbeat, so there the trial records its own in a user attribute. A worker also notices at once a dead process in
its own PID namespace, so that re-running a killed command does not wait out the grace period.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import random
import re
import socket
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from ..errors import ConfigError, MemcontrolError

log = logging.getLogger(__name__)

DIRECTIONS = ("minimize", "minimize")  # memorization, quality distance
SQLITE_SUFFIXES = {".db", ".sqlite", ".sqlite3"}
JOURNAL_SUFFIXES = {".log", ".journal"}

# User attributes the search writes on trials (visible as they are in optuna-dashboard).
ATTR_WORKER = "worker"            # "host:pid" of the process running the trial (for people to read)
ATTR_PID_SPACE = "pid_space"      # the kernel boot and PID namespace in which that pid means something
ATTR_HEARTBEAT = "heartbeat"      # unix time of the owner's last sign of life (journal storage only)
ATTR_INTERRUPTED = "interrupted"  # the worker died or was stopped; the trial was queued again
ATTR_SURPLUS = "surplus"          # asked but not run (the budget was used by other workers)
ATTR_STATUS = "status"            # ok | stopped | failed
ATTR_REASON = "reason"
ATTR_PROMOTED_FROM = "promoted_from"  # multi-fidelity: the screened trial this full-budget trial re-evaluates
RUN_ATTRS = (ATTR_WORKER, ATTR_PID_SPACE, ATTR_HEARTBEAT, ATTR_INTERRUPTED, ATTR_STATUS, ATTR_REASON)
STUDY_ATTR_FINGERPRINT = "memcontrol_fingerprint"
STUDY_ATTR_READY = "memcontrol_ready"


# Workers ask and tell (one trial at a time, around a model loaded once) instead of Study.optimize, and keep the
# heartbeat themselves (Heartbeat below): Optuna's reminder that its heartbeat assumes optimize() does not apply.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


@contextlib.contextmanager
def _quiet_experimental():
    """Optuna marks its heartbeat and retry API experimental and warns at each use; we rely on it knowingly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


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


@dataclass(frozen=True)
class Recovery:
    """How dead workers are found and their trials repeated: a heartbeat every ``heartbeat_s``, a trial is stale
    after ``grace_s`` without one, and each trial is run at most ``max_attempts`` times."""
    heartbeat_s: float = 30
    grace_s: float = 300
    max_attempts: int = 2

    @classmethod
    def from_search(cls, search: dict) -> "Recovery":
        return cls(search["heartbeat_s"], search["grace_s"], search["max_attempts"])

    def retry_callback(self) -> RetryHeartbeatStaleTrialCallback:
        with _quiet_experimental():
            return RetryHeartbeatStaleTrialCallback(max_retry=self.max_attempts - 1)


def open_storage(url: str, recovery: Recovery = Recovery(), attempts: int = 4) -> optuna.storages.BaseStorage:
    """Open (and create if needed) the storage behind ``url``. Opening is retried a few times because workers
    started together race to create the same tables."""
    for attempt in range(attempts):
        try:
            return _open_storage_once(url, recovery)
        except (MemcontrolError, ImportError):
            raise
        except Exception as err:  # noqa: BLE001 - the database driver's errors have no common base class
            if attempt == attempts - 1:
                raise MemcontrolError(f"cannot open the study storage {hide_password(url)}: "
                                      f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
            time.sleep(0.5 + random.random() * 2 ** attempt)
    raise AssertionError("unreachable")


def _open_storage_once(url: str, recovery: Recovery) -> optuna.storages.BaseStorage:
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
        return _rdb_storage(url, recovery, {"connect_args": {"timeout": 120}})
    if scheme.startswith(("postgresql", "postgres", "mysql")):
        if scheme in ("postgresql", "postgres"):
            url = "postgresql+" + _postgres_driver() + "://" + url.split("://", 1)[1]
        try:
            return _rdb_storage(url, recovery, {"pool_pre_ping": True})
        except ImportError as err:
            raise ConfigError(f"storage {hide_password(url)}: its database driver is not installed ({err}); "
                              "for PostgreSQL: pip install 'memcontrol[postgres]'") from None
    raise ConfigError(f"storage '{hide_password(url)}': unknown kind '{scheme}' "
                      "(use sqlite:///, postgresql://, mysql:// or journal:FILE)")


def _rdb_storage(url: str, recovery: Recovery, engine_kwargs: dict) -> optuna.storages.RDBStorage:
    with _quiet_experimental():  # the heartbeat arguments
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=max(1, math.ceil(recovery.heartbeat_s)),
            grace_period=max(1, math.ceil(recovery.grace_s)), heartbeat_stale_trial_callback=recovery.retry_callback())


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

def is_interrupted(trial: FrozenTrial) -> bool:
    """Failed because its worker died or was stopped, not because of the candidate: marked so by whoever gave it
    back, or failed by Optuna's heartbeat before the worker could record an outcome (every trial that runs to its
    end records ``status``)."""
    if trial.state != TrialState.FAIL or trial.user_attrs.get(ATTR_SURPLUS):
        return False
    return bool(trial.user_attrs.get(ATTR_INTERRUPTED)) or ATTR_STATUS not in trial.user_attrs


def retried_from(trial: FrozenTrial) -> int | None:
    """The number of the interrupted trial that this one repeats (None for a first attempt)."""
    with _quiet_experimental():
        history = RetryHeartbeatStaleTrialCallback.retry_history(trial)
    return history[-1] if history else None


def is_evaluated(trial: FrozenTrial) -> bool:
    """A trial that used its share of the budget: finished, stopped early, or failed on its own (an interrupted
    trial is not: it is queued again; nor is a surplus trial, never run)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and not is_interrupted(trial) and not trial.user_attrs.get(ATTR_SURPLUS)


def discard_surplus(study: optuna.Study, trial: optuna.trial.Trial, why: str) -> None:
    """End a trial that was asked for but will not run (the budget went to other workers, or nothing was left to
    take): recorded as failed and marked, so that no count or report takes it for a result."""
    trial.set_user_attr(ATTR_SURPLUS, True)
    trial.set_user_attr(ATTR_REASON, why)
    study.tell(trial, state=TrialState.FAIL)


def is_promotion(trial: FrozenTrial) -> bool:
    """A multi-fidelity promotion: a candidate already counted in the budget, evaluated again at its full budget."""
    return trial.user_attrs.get(ATTR_PROMOTED_FROM) is not None


def claimed_before(study: optuna.Study, number: int) -> int:
    """How many trials numbered below ``number`` are evaluated or running: when it reaches the budget, a trial
    just asked by one of several workers is one too many."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.number < number and not is_promotion(t) and (is_evaluated(t) or t.state == TrialState.RUNNING))


def budget_used(study: optuna.Study) -> int:
    """Evaluated plus running candidates: what a worker checks before it asks for another trial. The budget counts
    candidates; promotions are paid by the fidelity rule (one in ``eta``)."""
    trials = study.get_trials(deepcopy=False)
    return sum(1 for t in trials if not is_promotion(t) and (is_evaluated(t) or t.state == TrialState.RUNNING))


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_space() -> str | None:
    """Where a pid names one process: this kernel boot and this PID namespace. Containers share host names (and
    pids) across PID namespaces, so a host name alone does not say that a pid seen in a trial is ours to check."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux: no pid is checked, heartbeats alone decide
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A worker that died but is not yet reaped by its parent (the coordinator joins its workers only at the end of a
    # phase) still answers signal 0: a zombie runs nothing, so its trial is dead.
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                return fh.read().rpartition(")")[2].split()[0] != "Z"
        except FileNotFoundError:  # it went between the two looks
            return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")  # no procfs (macOS): ask ps


def has_optuna_heartbeat(storage) -> bool:
    return callable(getattr(storage, "get_heartbeat_interval", None)) and storage.get_heartbeat_interval() is not None


def owner_is_dead(trial: FrozenTrial) -> bool:
    """The trial's process is known dead: it ran in this PID namespace and its pid is gone."""
    space = pid_space()
    pid = str(trial.user_attrs.get(ATTR_WORKER, "")).rpartition(":")[2]
    return (space is not None and trial.user_attrs.get(ATTR_PID_SPACE) == space and pid.isdigit()
            and not _pid_alive(int(pid)))


def heartbeat_lost(trial: FrozenTrial, grace_s: float, now: float | None = None) -> bool:
    """No heartbeat attribute for ``grace_s`` (journal storage; a trial asked but not yet claimed is judged by its
    start time)."""
    last = trial.user_attrs.get(ATTR_HEARTBEAT)
    if last is None:
        last = trial.datetime_start.timestamp() if trial.datetime_start else None
    return last is not None and (time.time() if now is None else now) - float(last) > grace_s


def reclaim_stale_trials(study: optuna.Study, recovery: Recovery) -> list[int]:
    """Fail the running trials of dead workers and queue each again with the same parameters, up to
    ``max_attempts`` runs of one trial. Returns the numbers of the trials failed here."""
    storage = study._storage
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    optuna_beats = has_optuna_heartbeat(storage)
    # Optuna's heartbeat starts when a worker claims the trial; one that died between asking and claiming is
    # judged by the trial's start time, as on the journal.
    reclaimed = [t.number for t in running
                 if (owner_is_dead(t) or ((not optuna_beats or ATTR_WORKER not in t.user_attrs)
                                          and heartbeat_lost(t, recovery.grace_s)))
                 and give_back(study, t, f"worker {t.user_attrs.get(ATTR_WORKER, '?')} stopped", recovery)]
    if optuna_beats:
        with _quiet_experimental():
            optuna.storages.fail_stale_trials(study)
        still = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        reclaimed += [t.number for t in running if t.number not in still and t.number not in reclaimed
                      and is_interrupted(study.get_trials(deepcopy=False)[t.number])]
    return reclaimed


def give_back(study: optuna.Study, trial: FrozenTrial, why: str, recovery: Recovery) -> bool:
    """End a running trial that will not finish as interrupted (failed, not counted in the budget) and queue it
    again through Optuna's retry callback, as Optuna's heartbeat does. False when it had finished or another worker
    took it back first."""
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
    failed = copy.deepcopy(storage.get_trial(trial._trial_id))  # storages may hand out their own record
    # The copy inherits the user attributes: not those saying who ran it and how it ended.
    failed.user_attrs = {k: v for k, v in failed.user_attrs.items() if k not in RUN_ATTRS}
    before = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    recovery.retry_callback()(study, failed)
    if len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) == before:
        log.warning("trial %d was interrupted %d times; not run again", trial.number, recovery.max_attempts)
    else:
        log.info("trial %d was interrupted (%s); queued again", trial.number, why)
    return True


class Heartbeat:
    """Claims a running trial for this process and keeps its heartbeat fresh from a background thread: Optuna's
    heartbeat where the storage has one, a user attribute otherwise."""

    def __init__(self, study: optuna.Study, trial: optuna.trial.Trial, interval_s: float):
        self.storage = study._storage
        self.trial_id = trial._trial_id
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{trial.number}")

    def __enter__(self):
        self.storage.set_trial_user_attr(self.trial_id, ATTR_WORKER, worker_id())
        space = pid_space()
        if space is not None:
            self.storage.set_trial_user_attr(self.trial_id, ATTR_PID_SPACE, space)
        self._record()
        self._thread.start()
        return self

    def _record(self) -> None:
        if has_optuna_heartbeat(self.storage):
            self.storage.record_heartbeat(self.trial_id)
        else:
            self.storage.set_trial_user_attr(self.trial_id, ATTR_HEARTBEAT, time.time())

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._record()
            except optuna.exceptions.UpdateFinishedTrialError:
                return
            except Exception as err:  # noqa: BLE001 - a missed beat must not kill the trial
                log.warning("heartbeat not recorded: %s", err)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False
