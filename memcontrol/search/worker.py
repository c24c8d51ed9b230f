"""A search worker: takes trials from the shared study until the budget is used, evaluates them, records them.

Any number of workers, in one machine's processes or on several machines, run this same loop against one storage.
Each first takes the queued baselines and the base model (each is run by exactly one worker), then asks the sampler
for candidates, then takes the queued follow-ups of the chosen candidate (``followups``), if any.
A trial's results go to its Optuna record (values, state, user attributes) and to ``OUT/trials/<number>/``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..config.devices import resolve_device
from ..errors import MaskError, MemcontrolError
from . import study as st
from .baselines import BASELINE_ATTR, LABELS, baseline_candidate
from .context import SearchContext, build_context
from .progress import Progress
from .settings import SearchSettings
from .space import SearchSpace, load_space
from .trial import ERROR, FAILED, NO_TRAINING, OK, SCREENED, STOPPED, Outcome, evaluate_candidate

log = logging.getLogger(__name__)

STATES = {OK: TrialState.COMPLETE, STOPPED: TrialState.PRUNED, FAILED: TrialState.FAIL, ERROR: TrialState.FAIL,
          SCREENED: TrialState.PRUNED}


class StudyStopped(MemcontrolError):
    """A trial met a configuration or programming error: every other trial would meet it too."""


def open_search_storage(settings: SearchSettings) -> optuna.storages.BaseStorage:
    return st.open_storage(settings.storage_url, st.Recovery.from_search(settings.search))


def trial_dir(out_dir: Path, number: int) -> Path:
    return Path(out_dir) / "trials" / str(number)


def baseline_dir(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / "baselines" / name


def bind_space(settings: SearchSettings, unet) -> SearchSpace:
    from ..masks import enumerate_sites

    space = load_space(settings.space)
    return space.bind(enumerate_sites(unet, space.granularity))


def record(trial: optuna.trial.Trial, candidate, outcome: Outcome, folder: Path, settings: SearchSettings):
    """Everything the report needs, as user attributes (also what optuna-dashboard shows)."""
    trial.set_user_attr(st.ATTR_STATUS, outcome.status)
    trial.set_user_attr("family", candidate.family)
    trial.set_user_attr("n_sites", len(candidate.sites))
    if candidate.family != NO_TRAINING:
        trial.set_user_attr("lr", float(candidate.train.get("lr", settings.train.get("lr", 0.0))))
    if outcome.reason:
        trial.set_user_attr(st.ATTR_REASON, outcome.reason[:2000])
    trial.set_user_attr("folder", str(folder.relative_to(settings.out_dir)))
    if outcome.trainable is not None:
        trial.set_user_attr("trainable", outcome.trainable)
        trial.set_user_attr("trainable_percent", outcome.trainable_percent)
    for key, value in {**outcome.metrics, **outcome.compute}.items():
        trial.set_user_attr(key, value)
    if outcome.status not in (FAILED, ERROR, SCREENED):  # the screen's proxies are not the constrained metrics
        st.record_constraints(trial, settings.constraints, outcome.metrics)


def record_failure(study: optuna.Study, trial: optuna.trial.Trial, reason: str) -> None:
    trial.set_user_attr(st.ATTR_STATUS, FAILED)
    trial.set_user_attr(st.ATTR_REASON, reason[:2000])
    study.tell(trial, state=TrialState.FAIL)
    log.warning("trial %d of %s: failed (%s)", trial.number, study.study_name, reason)


def run_trial(study: optuna.Study, trial: optuna.trial.Trial, ctx: SearchContext, candidate, folder: Path,
              early_stop: bool, keep_adapter: bool, label: str | None = None, screen: bool = False,
              **how) -> Outcome:
    """Evaluate and record one trial; ``how``: ``evaluate_candidate``'s adapter and sampling seed."""
    settings = ctx.settings
    if ctx.progress is not None:
        ctx.progress.start(label or folder.name)
    with st.Heartbeat(study, trial, settings.search["heartbeat_s"]):
        try:
            outcome = evaluate_candidate(ctx, candidate, folder, early_stop=early_stop, keep_adapter=keep_adapter,
                                         screen=screen, **how)
        except KeyboardInterrupt:
            # Ctrl-C: give the trial back to the study so that the next run repeats it.
            st.give_back(study, study.get_trials(deepcopy=False)[trial.number], "stopped by the user",
                         st.Recovery.from_search(settings.search))
            raise
        record(trial, candidate, outcome, folder, settings)
    values = outcome.objectives if outcome.status == OK else None
    study.tell(trial, values, state=STATES[outcome.status])
    log.info("trial %s: %s%s", folder.name, outcome.status,
             f" memorization={values[0]:.4g} quality={values[1]:.4g}" if values else f" ({outcome.reason})")
    if outcome.status == ERROR:
        raise StudyStopped(f"{folder.relative_to(settings.out_dir)} stopped the study: {outcome.reason} (not a "
                           f"failure of that candidate but an error every trial would meet; traceback in "
                           f"{folder / 'error.txt'})")
    return outcome


def take_queued(study: optuna.Study, attr: str, what: str):
    """Yield (trial, name) for each queued trial this worker takes, until none is left; another worker may take
    some of them. ``attr``: the user attribute that names a queued trial."""
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial = study.ask()
        name = study.get_trials(deepcopy=False)[trial.number].user_attrs.get(attr)
        if name is None:
            # The last queued one went to another worker between the check and the ask.
            st.discard_surplus(study, trial, f"no {what} left to run")
            continue
        yield trial, name


def run_baselines(bstudy: optuna.Study, ctx: SearchContext) -> None:
    """Take queued baselines until none is left."""
    settings = ctx.settings
    for trial, name in take_queued(bstudy, BASELINE_ATTR, "baseline"):
        candidate = baseline_candidate(name, settings, ctx.pipe.unet)
        run_trial(bstudy, trial, ctx, candidate, baseline_dir(settings.out_dir, name), early_stop=False,
                  keep_adapter=False, label=LABELS.get(name, name))


def run_followups(fstudy: optuna.Study, ctx: SearchContext, storage) -> None:
    """Take queued follow-ups (re-evaluation, controls) until none is left."""
    from .followups import FOLLOWUP_ATTR, followup_candidate, followup_dir, label

    settings = ctx.settings
    for trial, name in take_queued(fstudy, FOLLOWUP_ATTR, "follow-up"):
        try:
            candidate, how = followup_candidate(settings, storage, ctx.pipe.unet, name)
        except MaskError as err:  # no random mask fits this space: that control fails, with its reason
            record_failure(fstudy, trial, str(err))
            continue
        trial.set_user_attr("sampling_seed", int(how.get("sampling_seed", settings.sampling["seed"])))
        run_trial(fstudy, trial, ctx, candidate, followup_dir(settings.out_dir, name), early_stop=False,
                  keep_adapter=False, label=f"{label(name)} (for {name.partition('@')[2]})", **how)


def run_search_trials(study: optuna.Study, ctx: SearchContext, space: SearchSpace, deadline: float | None) -> int:
    settings = ctx.settings
    done = 0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            log.info("time limit reached; no new trials")
            break
        st.reclaim_stale_trials(study, st.Recovery.from_search(settings.search))
        if st.budget_used(study) >= settings.n_trials:
            if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                break
            # Other workers' trials are still running: wait, to take over any whose worker dies.
            time.sleep(settings.search["heartbeat_s"])
            continue
        trial = study.ask()
        if st.claimed_before(study, trial.number) >= settings.n_trials:
            st.discard_surplus(study, trial, "the budget was used by other workers")
            continue
        st.reseed_for_trial(study.sampler, settings.search["seed"], trial.number)
        candidate = space.sample(trial)
        # A candidate with every switch off is a failed trial too: its mask is refused, at no cost.
        run_trial(study, trial, ctx, candidate, trial_dir(settings.out_dir, trial.number), early_stop=True,
                  keep_adapter=True, label=f"trial {trial.number}")
        done += 1
    return done


def run_worker(settings: SearchSettings, worker_index: int = 0, progress: bool = True, on_ready=None) -> int:
    """One worker's whole life: load the model once, run baselines, then trials, then follow-ups. Returns the
    trials it ran.
    ``on_ready`` is called once the model is loaded and the training cache written."""
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.monotonic()
    deadline = start + settings.search["timeout"] if settings.search["timeout"] else None
    storage = open_search_storage(settings)
    device = resolve_device(settings.model["device"], worker_index)
    ctx = build_context(settings, device, progress=progress)
    if on_ready is not None:
        on_ready()
    ctx.progress = Progress(settings, storage, worker_index)
    space = bind_space(settings, ctx.pipe.unet)
    trials_so_far = len(optuna.load_study(storage=storage, study_name=settings.study_name).trials)
    sampler = st.make_sampler(settings.search["sampler"], settings.n_trials,
                              st.worker_seed(settings.search["seed"], worker_index, trials_so_far),
                              settings.search["population_size"])
    study = optuna.load_study(storage=storage, study_name=settings.study_name, sampler=sampler)
    bstudy = optuna.load_study(storage=storage, study_name=settings.baseline_study_name)
    st.reclaim_stale_trials(bstudy, st.Recovery.from_search(settings.search))
    run_baselines(bstudy, ctx)
    log.info("searching: %s", space.describe())
    if settings.search["fidelity"]["enabled"]:
        from .fidelity import run_fidelity_trials

        done = run_fidelity_trials(study, ctx, space, deadline)
    else:
        done = run_search_trials(study, ctx, space, deadline)
    try:
        fstudy = optuna.load_study(storage=storage, study_name=settings.followup_study_name)
    except KeyError:  # no candidate chosen yet
        fstudy = None
    if fstudy is not None:
        st.reclaim_stale_trials(fstudy, st.Recovery.from_search(settings.search))
        run_followups(fstudy, ctx, storage)
    del ctx
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return done
