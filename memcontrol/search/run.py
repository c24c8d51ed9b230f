"""``memcontrol search`` from start to end: open (or resume) the study, run the workers, select, run the chosen
candidate's follow-ups (re-evaluation on fresh seeds, controls) with the same workers, then export and report.

Re-running the same command continues the study: finished trials stay in the storage and are never recomputed,
trials whose worker died are run again, and once the budget is used the command only rebuilds the outputs. The
same command started on several machines with one ``--storage`` URL shares the work.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from . import study as st
from .baselines import baseline_methods, queue_baselines
from .results import Results, collect
from .settings import SearchSettings
from .worker import open_search_storage, run_worker, trial_dir

log = logging.getLogger(__name__)

BEST_DIR = "best"
LOG_FILE = "search.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class SearchOutputs:
    results: Results
    report: Path
    best: Path | None
    table: str
    stopped_workers: list[str]   # workers of this command that ended with an error
    claim: str | None = None     # OUT/claim.md: the chosen candidate against full fine-tuning and the other rows


def prepare_studies(settings: SearchSettings) -> None:
    """Create the studies on first use (queueing baselines and user candidates once), or check that the stored
    ones were made with this configuration."""
    storage = open_search_storage(settings)
    study, created = st.open_study(storage, settings.study_name, fingerprint_sections=settings.fingerprint_sections())
    if created:
        for params in settings.search["enqueue"] or []:
            study.enqueue_trial(dict(params))
        st.mark_ready(study)
    elif not st.wait_until_ready(study):
        log.warning("study '%s' was created by a run that stopped before setting it up; continuing",
                    settings.study_name)
        st.mark_ready(study)
    bstudy, created = st.open_study(storage, settings.baseline_study_name,
                                    fingerprint_sections=settings.baseline_fingerprint_sections())
    if not created:
        st.wait_until_ready(bstudy)
    queue_baselines(bstudy, baseline_methods(settings), settings.search["max_attempts"])
    st.mark_ready(bstudy)


def work_left(settings: SearchSettings) -> bool:
    storage = open_search_storage(settings)
    study = optuna.load_study(storage=storage, study_name=settings.study_name)
    st.reclaim_stale_trials(study, st.Recovery.from_search(settings.search))
    if st.budget_used(study) < settings.n_trials:
        return True
    if settings.search["fidelity"]["enabled"]:
        from .fidelity import work_left as promotions_left

        if promotions_left(study, settings):
            return True
    bstudy = optuna.load_study(storage=storage, study_name=settings.baseline_study_name)
    st.reclaim_stale_trials(bstudy, st.Recovery.from_search(settings.search))
    return bool(bstudy.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _stop_with_coordinator() -> None:
    """End this spawned worker as soon as the process that started it is gone.

    Ctrl-C reaches every process of the terminal's group, but a coordinator killed on its own (``kill``, the OOM
    killer, a closed SSH session) would otherwise leave its workers training for up to an hour, holding the cores
    and the study's trials. The trial this worker had running is left RUNNING in the storage: a resumed search marks
    it interrupted and runs it again, as after any crash, so nothing finished is lost."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        log.error("the coordinator (pid %s) is gone; this worker stops too (pid %d). Run the same command again "
                  "to resume: its unfinished trial will be run again", parent.pid, os.getpid())
        logging.shutdown()
        os._exit(3)

    threading.Thread(target=watch, name="coordinator-watch", daemon=True).start()


def _worker_main(settings: SearchSettings, index: int, threads: int, first_ready) -> None:
    import torch

    from .context import preload

    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s worker{index} %(name)s: %(message)s")
    log_to_file(settings.out_dir / LOG_FILE)
    _stop_with_coordinator()
    torch.set_num_threads(threads)
    preload()
    # The first worker writes the training cache; the others wait for it (their imports done) and reuse it.
    first_ready.wait()
    run_worker(settings, index, progress=False)


def run_workers(settings: SearchSettings, workers: int, progress: bool = True) -> list[str]:
    """Worker 0 runs in this process, the others in spawned processes (each loads its own model copy). Returns the
    names of the spawned workers that ended with an error (worker 0's error propagates)."""
    if workers <= 1:
        run_worker(settings, 0, progress=progress)
        return []
    import torch

    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    first_ready = ctx.Event()
    procs = [ctx.Process(target=_worker_main, args=(settings, i, threads, first_ready), name=f"worker{i}")
             for i in range(1, workers)]
    for p in procs:
        p.start()
    torch.set_num_threads(threads)
    try:
        run_worker(settings, 0, progress=progress, on_ready=first_ready.set)
    finally:
        first_ready.set()  # never leave the others waiting, whatever happened here
        for p in procs:
            p.join()
    failed = [p.name for p in procs if p.exitcode]
    if failed:
        log.error("%s stopped with an error (see above)", ", ".join(failed))
    return failed


def log_to_file(path: Path) -> logging.Handler:
    """Send memcontrol's log lines (INFO and above) to ``path`` too, appended, as the terminal gets them."""
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    package = logging.getLogger("memcontrol")
    package.addHandler(handler)
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    return handler


def prune_adapters(settings: SearchSettings, results: Results) -> None:
    """Keep trained adapters of Pareto trials (and the chosen one) only: a dominated trial stays dominated as the
    study goes on."""
    if settings.export["keep_adapters"] == "all":
        return
    for row in results.trials:
        if row.state == "complete" and not row.pareto and not row.chosen:
            shutil.rmtree(trial_dir(settings.out_dir, row.number) / "adapter", ignore_errors=True)


def export_best(settings: SearchSettings, results: Results) -> Path | None:
    """Copy the chosen trial's exported adapter to ``OUT/best`` (retraining it when its folder is on another
    machine) with ``selection.json`` saying why it was chosen."""
    import json

    from ..export import is_exported

    chosen = results.chosen
    if chosen is None:
        return None
    best = settings.out_dir / BEST_DIR
    tmp = best.with_name(f"{BEST_DIR}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if results.selection.do_not_finetune:
        # No adapter: the advice is to use the base model as it is.
        tmp.mkdir(parents=True)
        (tmp / "README.txt").write_text(f"Do not fine-tune: {results.selection.explanation}.\nNo adapter is "
                                        "exported; use the base model as it is (see report.html).\n")
    else:
        source = trial_dir(settings.out_dir, chosen.number) / "adapter"
        if not is_exported(source):
            source = retrain(settings, chosen.number)
        shutil.copytree(source, tmp)
    again = results.reevaluation
    (tmp / "selection.json").write_text(json.dumps({
        "trial": None if chosen.kind == "base" else chosen.number, "do_not_finetune": results.selection.do_not_finetune,
        "rule": results.selection.rule, "explanation": results.selection.explanation,
        "memorization": chosen.memorization, "quality": chosen.quality, "copy_rate": chosen.get("copy_fraction"),
        "reevaluated": None if again is None or again.state != "complete" else {
            "memorization": again.memorization, "quality": again.quality, "copy_rate": again.get("copy_fraction"),
            "sampling_seed": again.get("sampling_seed")},
        "memorization_metric": settings.memorization_metric, "quality_metric": settings.quality_metric,
        "params": chosen.params, "pareto_front": [r.number for r in results.front]}, indent=2) + "\n")
    # Swap in the new export. Another machine may be finalizing the same folder at this moment: each step is one
    # rename that either wins or finds the other's result in place, never a check followed by an act.
    old = best.with_name(f"{BEST_DIR}.old{os.getpid()}")
    try:
        best.rename(old)
    except FileNotFoundError:
        pass
    try:
        tmp.rename(best)
    except OSError:  # the other finalizer's export took the place first: keep it
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return best


def retrain(settings: SearchSettings, number: int) -> Path:
    """Train trial ``number`` again from its stored parameters (same seed: the same adapter)."""
    from optuna.trial import FixedTrial

    from ..config.devices import resolve_device
    from .context import build_context
    from .trial import evaluate_candidate
    from .worker import bind_space

    log.info("the adapter of trial %d is not in this folder; training it again", number)
    study = optuna.load_study(storage=open_search_storage(settings), study_name=settings.study_name)
    ctx = build_context(settings, resolve_device(settings.model["device"], 0))
    candidate = bind_space(settings, ctx.pipe.unet).sample(FixedTrial(study.trials[number].params))
    folder = settings.out_dir / "retrained" / str(number)
    outcome = evaluate_candidate(ctx, candidate, folder, early_stop=False, keep_adapter=True)
    if outcome.status != "ok":
        from ..errors import MemcontrolError

        raise MemcontrolError(f"retraining trial {number} for export failed: {outcome.reason}")
    return folder / "adapter"


def finalize(settings: SearchSettings, stopped_workers: list[str] | None = None) -> SearchOutputs:
    from .claim import write_claim
    from .report import comparison_table, plot_front_html, plot_front_png, write_csv
    from .report_html import write_report

    results = collect(settings, open_search_storage(settings))
    out = settings.out_dir
    write_csv(results.front, out / "pareto.csv")
    write_csv(results.baselines + ([results.base] if results.base else []) + results.trials, out / "trials.csv")
    if results.chosen is not None:
        # The claim beside its checks: search-time figures, fresh-seed figures, controls.
        write_csv([results.chosen] + results.followups, out / "controls.csv")
    plot_front_png(results, settings, out / "pareto_front.png")
    plot_front_html(results, settings, out / "pareto_front.html")
    prune_adapters(settings, results)
    best = export_best(settings, results)
    claim = write_claim(settings, results)  # before the report, which shows it
    report = write_report(settings, results, out / "report.html")
    return SearchOutputs(results, report, best, comparison_table(results, settings), stopped_workers or [], claim)


def check_training_data(settings: SearchSettings) -> None:
    """The data audit's warning (or, with ``data_audit.on_duplicates: error``, its refusal) before any trial; the
    workers de-duplicate on their own when asked (``build_context``)."""
    from ..data import load_source, run_salt
    from ..data.duplicates import audit_job_data

    if settings.data_audit["on_duplicates"] == "ignore":
        return
    data, salt = settings.data, run_salt(settings.out_dir)
    train = load_source(data["train"], data["resolution"], data["max_train"], salt=salt)
    heldout = load_source(data["heldout"], data["resolution"], salt=salt)
    audit_job_data(train, heldout, {**settings.data_audit, "deduplicate": False}, "search", data["cache_dir"])


def run_search(settings: SearchSettings, progress: bool = True) -> SearchOutputs:
    from ..runs import claim_out_dir

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = settings.storage_url
    claim_out_dir(settings.out_dir, "search", own=Path(url[len("journal:"):]) if url.startswith("journal:") else None)
    handler = log_to_file(settings.out_dir / LOG_FILE)
    try:
        check_training_data(settings)
        prepare_studies(settings)
        stopped = []
        if work_left(settings):
            stopped = run_workers(settings, settings.search["workers"], progress=progress)
        else:
            log.info("the study has used its budget (%d trials); rebuilding the outputs", settings.n_trials)
        if not stopped and queue_chosen_followups(settings):
            log.info("running the chosen candidate's re-evaluation and controls")
            stopped = run_workers(settings, settings.search["workers"], progress=progress)
        return finalize(settings, stopped)
    finally:
        logging.getLogger("memcontrol").removeHandler(handler)
        handler.close()


def queue_chosen_followups(settings: SearchSettings) -> bool:
    """Queue what runs once a candidate is chosen (``followups``); True when some of it is waiting."""
    from .followups import chosen_key, queue_followups

    storage = open_search_storage(settings)
    return queue_followups(settings, storage, chosen_key(collect(settings, storage).chosen))
