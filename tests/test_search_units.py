"""The search's parts that need no training: storages, samplers, recovery of dead workers' trials, selection rules,
search spaces."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from memcontrol.errors import ConfigError
from memcontrol.search import selection, study as st
from memcontrol.search.selection import Point
from memcontrol.search.space import SearchSpace, load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


# --- storage URLs ----------------------------------------------------------------------------------------------------

def test_storage_urls(tmp_path):
    assert st.resolve_storage_url(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/study.db"
    assert st.resolve_storage_url(str(tmp_path / "s.log"), tmp_path) == f"journal:{tmp_path.resolve()}/s.log"
    assert st.resolve_storage_url(f"journal:{tmp_path}/x.jsonl", tmp_path) == f"journal:{tmp_path.resolve()}/x.jsonl"
    assert st.resolve_storage_url(str(tmp_path / "a.db"), tmp_path) == f"sqlite:///{tmp_path.resolve()}/a.db"
    pg = "postgresql://u:secret@host:5432/db"
    assert st.resolve_storage_url(pg, tmp_path) == pg
    assert st.hide_password(pg) == "postgresql://u:***@host:5432/db"
    with pytest.raises(ConfigError, match="journal:FILE"):
        st.resolve_storage_url(str(tmp_path / "study.txt"), tmp_path)
    with pytest.raises(ConfigError, match="unknown kind 'redis'"):
        st.open_storage("redis://localhost/0")


def test_unreachable_server_is_one_clear_error():
    with pytest.raises(st.MemcontrolError, match=r"cannot open the study storage postgresql://u:\*\*\*@127.0.0.1:1/db"):
        st.open_storage("postgresql://u:pw@127.0.0.1:1/db", attempts=1)


def _storages(tmp_path, postgres_url=None):
    urls = {"sqlite": f"sqlite:///{tmp_path}/study.db", "journal": f"journal:{tmp_path}/study.log"}
    if postgres_url:
        urls["postgresql"] = postgres_url
    return urls


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_study_persists_and_resumes(kind, tmp_path, request):
    pg = request.getfixturevalue("postgres_url") if kind == "postgresql" else None
    url = _storages(tmp_path, pg)[kind]
    storage = st.open_storage(url)
    sections = {"space": {"granularity": "block"}, "objectives": {"memorization": "mean_similarity"}}
    study, created = st.open_study(storage, "s", fingerprint_sections=sections)
    assert created
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    study.tell(trial, [0.25, 1.5])

    # A second process (a fresh storage object) continues the same study.
    again, created = st.open_study(st.open_storage(url), "s", fingerprint_sections=sections)
    assert not created
    assert [t.values for t in again.get_trials()] == [[0.25, 1.5]]
    # A changed configuration is refused, naming what changed.
    with pytest.raises(ConfigError, match=r"\(space changed\)"):
        st.open_study(st.open_storage(url), "s", fingerprint_sections={**sections, "space": {"granularity": "role"}})


# --- recovery of interrupted trials --------------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _claim(study, trial, pid: int, pid_space: str | None, heartbeat: float | None = None) -> None:
    """Mark a running trial as a worker would: its process, where that pid means something, a heartbeat."""
    storage = study._storage
    storage.set_trial_user_attr(trial._trial_id, st.ATTR_WORKER, f"{st.socket.gethostname()}:{pid}")
    if pid_space is not None:
        storage.set_trial_user_attr(trial._trial_id, st.ATTR_PID_SPACE, pid_space)
    if st.has_optuna_heartbeat(storage):
        storage.record_heartbeat(trial._trial_id)
    else:
        storage.set_trial_user_attr(trial._trial_id, st.ATTR_HEARTBEAT, time.time() if heartbeat is None else heartbeat)


LONG = st.Recovery(heartbeat_s=60, grace_s=3600, max_attempts=2)


def test_a_worker_that_died_unreaped_counts_as_dead():
    # A spawned worker that crashed stays a zombie until the coordinator joins it, and signal 0 still reaches it.
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while st._pid_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        st.os.kill(proc.pid, 0)  # still there for signals: the case this guards against
        assert st._pid_alive(proc.pid) is False
    finally:
        proc.wait()
    assert st._pid_alive(st.os.getpid())


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_trial_of_dead_worker_is_failed_and_queued_again(kind, tmp_path):
    study, _ = st.open_study(st.open_storage(_storages(tmp_path)[kind], LONG), "s")
    done = study.ask()
    done.suggest_float("lr", 1e-5, 1e-3, log=True)
    study.tell(done, [0.1, 0.2])
    dead = study.ask()
    lr = dead.suggest_float("lr", 1e-5, 1e-3, log=True)
    _claim(study, dead, _dead_pid(), st.pid_space())
    alive = study.ask()  # a running trial of a live worker (this process) is left alone
    alive.suggest_float("lr", 1e-5, 1e-3, log=True)
    _claim(study, alive, st.os.getpid(), st.pid_space())

    assert st.budget_used(study) == 3
    assert st.reclaim_stale_trials(study, LONG) == [dead.number]  # at once, long before the grace period
    assert st.reclaim_stale_trials(study, LONG) == []  # not twice
    trials = study.get_trials()
    assert trials[dead.number].state == TrialState.FAIL and st.is_interrupted(trials[dead.number])
    assert "interrupted" in trials[dead.number].user_attrs[st.ATTR_REASON]
    assert trials[alive.number].state == TrialState.RUNNING
    assert st.budget_used(study) == 2  # the interrupted one does not count

    retry = study.ask()  # the queued copy comes first, with the same parameters
    assert retry.suggest_float("lr", 1e-5, 1e-3, log=True) == lr
    assert st.retried_from(study.get_trials()[retry.number]) == dead.number
    assert st.ATTR_INTERRUPTED not in study.get_trials()[retry.number].user_attrs  # it starts afresh
    # Its worker dies too: after max_attempts it is not queued a third time.
    _claim(study, retry, _dead_pid(), st.pid_space())
    assert st.reclaim_stale_trials(study, LONG) == [retry.number]
    assert not study.get_trials(states=(TrialState.WAITING,))


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_pid_from_another_pid_namespace_is_not_checked(kind, tmp_path):
    """Containers share host names across PID namespaces: a pid that is dead here may be a live worker there."""
    study, _ = st.open_study(st.open_storage(_storages(tmp_path)[kind], LONG), "s")
    trial = study.ask()
    _claim(study, trial, _dead_pid(), "another-boot/4026531836")
    assert st.reclaim_stale_trials(study, LONG) == []
    _claim(study, trial, _dead_pid(), None)  # a worker that could not say where its pid lives: same answer
    assert st.reclaim_stale_trials(study, LONG) == []
    assert study.get_trials()[0].state == TrialState.RUNNING


def test_silent_foreign_worker_is_stale_after_grace_on_the_journal(tmp_path):
    study, _ = st.open_study(st.open_storage(f"journal:{tmp_path}/s.log"), "s")
    trial = study.ask()
    _claim(study, trial, 12345, "another-boot/1", heartbeat=time.time() - 100)
    frozen = study.get_trials()[0]
    assert not st.heartbeat_lost(frozen, grace_s=300)
    assert st.heartbeat_lost(frozen, grace_s=60)
    assert st.reclaim_stale_trials(study, st.Recovery(heartbeat_s=10, grace_s=60)) == [trial.number]


def test_sql_storages_use_optunas_heartbeat_and_retry(tmp_path):
    recovery = st.Recovery(heartbeat_s=1, grace_s=2, max_attempts=2)
    study, _ = st.open_study(st.open_storage(f"sqlite:///{tmp_path}/s.db", recovery), "s")
    silent = study.ask()
    lr = silent.suggest_float("lr", 1e-5, 1e-3, log=True)
    _claim(study, silent, 12345, "another-boot/1")  # one beat, then silence (a lost machine)
    beating = study.ask()
    beating.suggest_float("lr", 1e-5, 1e-3, log=True)
    with st.Heartbeat(study, beating, recovery.heartbeat_s):
        assert st.reclaim_stale_trials(study, recovery) == []
        time.sleep(3.5)  # past the 2 s grace period: Optuna's own check finds the silent trial
        assert st.reclaim_stale_trials(study, recovery) == [silent.number]
    trials = study.get_trials()
    assert trials[silent.number].state == TrialState.FAIL and st.is_interrupted(trials[silent.number])
    assert not st.is_evaluated(trials[silent.number])
    assert trials[beating.number].state == TrialState.RUNNING
    retry = study.ask()
    assert retry.suggest_float("lr", 1e-5, 1e-3, log=True) == lr
    assert st.retried_from(study.get_trials()[retry.number]) == silent.number


def test_heartbeat_claims_and_refreshes(tmp_path):
    study, _ = st.open_study(st.open_storage(f"journal:{tmp_path}/s.log"), "s")
    trial = study.ask()
    with st.Heartbeat(study, trial, interval_s=0.05):
        first = study.get_trials()[0].user_attrs[st.ATTR_HEARTBEAT]
        time.sleep(0.3)
        later = study.get_trials()[0].user_attrs[st.ATTR_HEARTBEAT]
    assert study.get_trials()[0].user_attrs[st.ATTR_WORKER] == st.worker_id()
    assert later > first


# --- samplers ------------------------------------------------------------------------------------------------------

def test_nsga2_population_fits_the_budget():
    assert st.population_size(20) == 5
    assert st.population_size(8) == 4
    assert st.population_size(1000) == 50
    sampler = st.make_sampler("nsga2", n_trials=20, seed=0)
    study = optuna.create_study(directions=list(st.DIRECTIONS), sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1 - t.suggest_float("x", 0, 1) ** 0.5), n_trials=20)
    generations = {t.system_attrs.get("NSGAIISampler:generation") for t in study.trials}
    assert max(generations) >= 3  # 20 trials are not one random generation


def test_constraints_reach_the_sampler():
    cons = st.parse_constraints([{"metric": "copy_fraction", "max": 0.2}])
    study = optuna.create_study(directions=list(st.DIRECTIONS), sampler=st.make_sampler("tpe", n_trials=10, seed=0))
    for metrics in ({"copy_fraction": 0.1}, {"copy_fraction": 0.5}, {}):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        st.record_constraints(trial, cons, metrics)
        study.tell(trial, [0.5, 1.0])
    got = [t.constraints["copy_fraction<=0.2"] for t in study.trials]
    assert got == pytest.approx([-0.1, 0.3, 1.0])
    assert [st.is_feasible(t) for t in study.trials] == [True, False, False]
    assert [t.number for t in study.best_trials] == [0]  # Optuna's own front honours the limit
    with pytest.raises(ConfigError):
        st.parse_constraints([{"metric": "x", "max": 1, "min": 0}])
    with pytest.raises(ConfigError, match="nsga2, tpe or random"):
        st.make_sampler("cmaes", 10, 0)


def test_surplus_trial_of_a_racing_worker_is_not_counted(tmp_path):
    study, _ = st.open_study(st.open_storage(f"journal:{tmp_path}/s.log"), "s")
    for _ in range(2):
        t = study.ask()
        study.tell(t, [0.1, 0.1])
    racing = study.ask()  # a second worker asked while the first took the last slot of a 2-trial budget
    assert st.claimed_before(study, racing.number) == 2
    st.discard_surplus(study, racing, "the budget was used by other workers")
    assert st.budget_used(study) == 2 and not st.is_evaluated(study.get_trials()[racing.number])


def test_random_draws_depend_on_the_trial_number_not_the_sampler_history():
    def draws(sampler, numbers):
        study = optuna.create_study(directions=list(st.DIRECTIONS), sampler=sampler)
        out = {}
        for n in range(max(numbers) + 1):
            trial = study.ask()
            st.reseed_for_trial(sampler, 0, trial.number)
            x = trial.suggest_float("x", 0, 1)
            study.tell(trial, [x, 1 - x])
            out[n] = x
        return out

    for kind in ("random", "nsga2", "tpe"):
        a = draws(st.make_sampler(kind, 20, seed=1), [3])
        b = draws(st.make_sampler(kind, 20, seed=2), [3])  # another worker's constructor seed
        assert a[0] == b[0] and a[1] != a[0]  # same number, same draw; numbers differ, draws differ


def test_worker_seeds_differ_between_workers_and_resumptions():
    seeds = {st.worker_seed(0, w, n) for w in range(3) for n in (0, 5)}
    assert len(seeds) == 6
    assert st.worker_seed(0, 1, 5) == st.worker_seed(0, 1, 5)


# --- selection -----------------------------------------------------------------------------------------------------

POINTS = [Point("a", 0.9, 10.0), Point("b", 0.5, 12.0), Point("c", 0.3, 20.0), Point("d", 0.1, 40.0),
          Point("dominated", 0.6, 13.0), Point("nan", math.nan, 1.0)]


def test_pareto_front():
    assert [p.key for p in selection.pareto_front(POINTS)] == ["d", "c", "b", "a"]
    assert selection.select([], "margin") is None


def test_margin_rule():
    # Best quality 10: within 25% -> limit 12.5 -> a (0.9) and b (0.5): b has the lowest memorization.
    assert selection.select(POINTS, "margin", margin=0.25).chosen.key == "b"
    assert selection.select(POINTS, "margin", margin=0.0).chosen.key == "a"
    assert selection.select(POINTS, "margin", margin=10.0, relative=False).chosen.key == "c"
    with pytest.raises(ConfigError):
        selection.select(POINTS, "margin", margin=-1)


def test_knee_and_weighted_rules():
    # Scaled over the front: a (1, 0), b (0.5, 1/15), c (0.25, 1/3), d (0, 1); b is farthest below x + y = 1.
    assert selection.select(POINTS, "knee").chosen.key == "b"
    assert selection.select(POINTS, "weighted", weights=(1, 0)).chosen.key == "d"
    assert selection.select(POINTS, "weighted", weights=(0, 1)).chosen.key == "a"
    assert selection.select(POINTS, "weighted", weights=(0.5, 0.5)).chosen.key == "b"
    with pytest.raises(ConfigError, match="choose one of"):
        selection.select(POINTS, "best")


# --- spaces ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unets():
    from memcontrol.models import TINY_UNET_CONFIG, sd15_unet_meta
    from diffusers import UNet2DConditionModel

    return {"tiny": UNet2DConditionModel(**TINY_UNET_CONFIG), "sd15": sd15_unet_meta()}


def _bound(space, unet):
    from memcontrol.masks.sites import enumerate_sites

    return space.bind(enumerate_sites(unet, space.granularity))


def test_reference_preset_is_one_switch_per_attention_block(unets):
    for unet in unets.values():
        space = _bound(load_space("reference"), unet)
        names = [s.name for s in space.switches]
        assert len(names) == 16  # 6 down, 1 mid, 9 up attention blocks of SD 1.5's layout
        assert "on:mid_block.attentions.0" in names and "on:up_blocks.3.attentions.2" in names
        searched = {k for k in space.describe().split("searched: ")[1].split(", ")}
        assert searched == {"lr"}


def test_extended_preset_groups_roles_per_block(unets):
    tiny = [s.name for s in _bound(load_space("extended"), unets["tiny"]).switches]
    sd15 = [s.name for s in _bound(load_space("extended"), unets["sd15"]).switches]
    assert tiny == sd15
    assert {"on:down_blocks.0/attn1", "on:down_blocks.0/attn2", "on:down_blocks.0/ff", "on:down_blocks.0/norms",
            "on:down_blocks.0/resnet", "on:down_blocks.3/resnet"} <= set(tiny)
    space = _bound(load_space("extended"), unets["tiny"])
    fams = space.family.choices
    assert set(fams) == {"lora", "loha", "lokr", "oft", "bitfit_norm", "unfreeze"}
    # Rank is asked only for the families that have one.
    ranks = {}
    for fam in fams:
        params = {s.name: True for s in space.switches} | {"family": fam, "lr": 1e-4, "steps": 100}
        params |= {f"{fam}.rank": 4, f"{fam}.alpha": 8, f"{fam}.block_size": 4}
        cand = space.sample(optuna.trial.FixedTrial(params))
        ranks[fam] = cand.family_params.get("rank")
        assert cand.train == {"lr": 1e-4, "steps": 100}
    assert ranks["lora"] == 4 and ranks["bitfit_norm"] is None and ranks["unfreeze"] is None


def test_user_space_from_yaml(tmp_path, unets):
    (tmp_path / "space.yaml").write_text(
        "space:\n  granularity: role\n  sites: ['up_blocks.*']\n  kinds: [attn2]\n"
        "  family: lora\n  family_params: {lora: {rank: {choices: [2, 4]}}}\n"
        "  train: {lr: {low: 1e-5, high: 1e-3, log: true}, steps: 20}\n")
    space = _bound(load_space(str(tmp_path / "space.yaml")), unets["tiny"])
    assert len(space.switches) == 9 and all(s.name.endswith(".attn2") for s in space.switches)
    assert space.train[0].kind == "float" and space.train[0].low == 1e-5  # 1e-5 without a dot is a number
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    cand = space.sample(study.ask())
    assert cand.family == "lora" and cand.family_params["rank"] in (2, 4) and cand.train["steps"] == 20
    assert all(s.startswith("up_blocks.") and s.endswith(".attn2") for s in cand.sites)


@pytest.mark.parametrize("spec, message", [
    ({"sites": ["down_blocks.9.*"]}, "matches no block-level site"),
    ({"kinds": ["attn1"]}, "not block-level site kinds"),
    ({"family": "dora"}, "unknown"),
    ({"train": {"lr": {"low": 1}}}, "needs both"),
    ({"colour": "red"}, r"`space.colour`: unknown"),
    ({"family_params": {"lora": {"rnk": 4}}}, r"unknown parameters \['rnk'\]"),
])
def test_space_errors(spec, message, unets):
    with pytest.raises(ConfigError, match=message):
        _bound(SearchSpace(spec), unets["tiny"])


# --- settings ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"train": {"stpes": 3}}, r"`train.stpes`: unknown; did you mean `steps`\?"),
    ({"objectives": {"memorization": {"metric": "fid"}}}, r"`objectives.memorization.metric`: .*\(got 'fid'\)"),
    ({"search": {"heartbeat_s": 30, "grace_s": 40}}, "more than twice"),
    ({"data": {"heldout": None}}, "data.heldout is not set"),
    ({"space": {"family_params": {"lora": {"rnk": 2}}}}, "unknown parameters"),
    ({"selection": {"rule": "best"}}, r"`selection.rule`: .*\(got 'best'\)"),
    ({"search": {"workers": 0}}, r"`search.workers`: Input should be greater than or equal to 1"),
])
def test_settings_mistakes_are_reported_before_any_model_loads(tmp_path, change, message):
    from fixtures_search import cheap_search_config
    from memcontrol.config import merge
    from memcontrol.search.settings import load_settings

    cfg = merge(cheap_search_config(tmp_path / "model", {"train": "t.csv", "heldout": "h.csv"}), change)
    cfg["_dir"] = str(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg, tmp_path / "out")


def test_settings_resolve_paths_and_defaults(tmp_path):
    from fixtures_search import cheap_search_config
    from memcontrol.search.settings import load_settings

    cfg = cheap_search_config("model", {"train": "data/t.csv", "heldout": "data/h.csv"})
    cfg["_dir"] = str(tmp_path)
    settings = load_settings(cfg, tmp_path / "out", n_trials=7)
    assert settings.model["path"] == str(tmp_path / "model")
    assert settings.data["train"]["source"] == str(tmp_path / "data" / "t.csv")
    assert settings.data["cache_dir"] == str(tmp_path / "out" / "cache")
    assert settings.storage_url == f"sqlite:///{tmp_path / 'out' / 'study.db'}"
    assert settings.n_trials == 7 and settings.selection["rule"] == "margin"
    assert settings.search["workers"] == 1 and load_settings(cfg, tmp_path / "out", workers=3).search["workers"] == 3
    # Where the cache lives is not part of what makes results comparable (machines sharing a study differ there).
    other = load_settings(cfg, tmp_path / "elsewhere", n_trials=7)
    assert other.fingerprint_sections() == settings.fingerprint_sections()


def test_sites_a_family_cannot_train_are_left_out(unets):
    from memcontrol.errors import MaskError
    from memcontrol.masks import adaptable_sites, apply_mask
    from memcontrol.search.trial import to_mask

    unet = unets["tiny"]
    space = _bound(load_space("extended"), unet)
    every = {s.name: True for s in space.switches}
    cand = space.sample(optuna.trial.FixedTrial(every | {"family": "lora", "lora.rank": 2, "lora.alpha": 2,
                                                         "lr": 1e-4, "steps": 100}))
    assert any(s.endswith(".norms") for s in cand.sites)
    lora_sites = {s.name for s in adaptable_sites(unet, "lora", "role")}
    mask = to_mask(cand, lora_sites)
    assert mask.sites and not any(s.endswith(".norms") for s in mask.sites)
    assert set(mask.sites) == set(cand.sites) & lora_sites
    assert apply_mask(copy.deepcopy(unet), mask).trainable > 0
    only_norms = {name: name.endswith("/norms") for name in every}
    cand = space.sample(optuna.trial.FixedTrial(only_norms | {"family": "lora", "lora.rank": 2, "lora.alpha": 2,
                                                              "lr": 1e-4, "steps": 100}))
    with pytest.raises(MaskError, match="has a layer that lora can train"):
        to_mask(cand, lora_sites)
