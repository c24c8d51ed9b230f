"""Multi-fidelity search: the promotion rule on hand-made scores, the hypervolume on a hand-computed front, the
ranking bench's largest set of candidates the full evaluation tells apart, the brackets read back from a real
study, and a tiny search where only the promoted fraction trains at the full budget, resumed without recomputing
anything."""

from __future__ import annotations

import csv
import itertools
import math
import random

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from fixtures_scripts import load_script
from fixtures_search import cheap_search_config, write_config
from memcontrol.cli import main
from memcontrol.errors import ConfigError
from memcontrol.metrics.intervals import bootstrap_indices, interval, largest_separated_sets, resampled_mean
from memcontrol.search import fidelity as fd
from memcontrol.search import study as st
from memcontrol.search.hypervolume import hypervolume_2d
from memcontrol.search.settings import load_settings

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Rank 0: 0, 1, 2, 3, 4; rank 1: 5, 6, 7 (each dominated by a rank-0 point); rank 2: 8.
# Crowding in rank 0 (both objectives span 8): 0 and 4 are ends (inf); 1: 3/8 + 4/8 = 0.875;
# 2: 4/8 + 4/8 = 1.0; 3: 5/8 + 4/8 = 1.125.
BRACKET = {0: (1, 9), 1: (2, 6), 2: (4, 5), 3: (6, 2), 4: (9, 1), 5: (3, 7), 6: (5, 5), 7: (7, 3), 8: (8, 8)}


def test_promotion_order_is_pareto_rank_then_crowding():
    assert fd.pareto_ranks(BRACKET) == {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 1, 7: 1, 8: 2}
    dist = fd.crowding({k: BRACKET[k] for k in range(5)})
    assert dist[0] == dist[4] == math.inf
    assert dist[1] == pytest.approx(0.875, abs=1e-12) and dist[2] == pytest.approx(1.0, abs=1e-12)
    assert dist[3] == pytest.approx(1.125, abs=1e-12)
    assert fd.promotion_order(BRACKET) == [0, 4, 3, 2, 1, 5, 7, 6, 8]


@pytest.mark.parametrize("eta, expected", [(3, [0, 4, 3]), (2, [0, 4, 3, 2, 1]), (9, [0]), (4, [0, 4, 3])])
def test_a_bracket_promotes_the_best_ceil_n_over_eta(eta, expected):
    assert fd.promoted(BRACKET, eta) == expected


def test_ties_and_failed_candidates():
    # Equal points share a rank; within a two-point front both are ends; the trial number decides.
    assert fd.promoted({3: (1.0, 1.0), 1: (1.0, 1.0), 2: (2.0, 2.0)}, eta=2) == [1, 3]
    # A candidate whose proxies are not finite counts in the bracket's size but is never promoted.
    assert fd.promoted({0: (math.nan, 0.0), 1: (2.0, 2.0), 2: (3.0, 3.0)}, eta=3) == [1]
    assert fd.promoted({1: (2.0, 2.0), 2: (3.0, 3.0)}, eta=3, size=6) == [1, 2]
    assert fd.promoted({0: (math.inf, 1.0)}, eta=2) == []


def test_hypervolume_of_a_hand_computed_front():
    # (1, 2) and (2, 1) below (3, 3): two 2 x 1 strips overlapping in a unit square -> 3.
    front = [(1.0, 2.0), (2.0, 1.0)]
    assert hypervolume_2d(front, (3, 3)) == pytest.approx(3.0, abs=1e-12)
    # Dominated, duplicated, outside the box or non-finite points add nothing.
    noisy = front + [(2.5, 2.5), (1.0, 2.0), (4.0, 0.0), (0.5, 3.0), (math.nan, 0.0)]
    assert hypervolume_2d(noisy, (3, 3)) == pytest.approx(3.0, abs=1e-12)
    assert hypervolume_2d([(0.0, 0.0)], (2, 0.5)) == pytest.approx(1.0, abs=1e-12)
    assert hypervolume_2d([], (1, 1)) == 0.0


def test_the_largest_set_of_candidates_pairwise_apart():
    bench = load_script("bench/fidelity.py")
    rng = random.Random(0)
    for _ in range(200):
        rows = []
        for i in range(rng.randint(1, 8)):
            low = rng.uniform(0, 10)
            rows.append({"candidate": i, "q": low + 0.5, "q_ci_low": low, "q_ci_high": low + rng.uniform(0.1, 3)})
        chosen = bench.apart_set(rows, "q")
        # Pairwise disjoint intervals ...
        spans = sorted((r["q_ci_low"], r["q_ci_high"]) for r in chosen)
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
        # ... and no larger disjoint set exists (brute force over every subset).
        best = max(len(subset) for k in range(1, len(rows) + 1) for subset in itertools.combinations(rows, k)
                   if all(min(a["q_ci_high"], b["q_ci_high"]) < max(a["q_ci_low"], b["q_ci_low"])
                          for a, b in itertools.combinations(subset, 2)))
        assert len(chosen) == best


def test_the_largest_sets_of_candidates_all_pairwise_separated():
    import networkx as nx  # torch's own dependency: an independent maximum-clique search to check against

    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(1, 10))
        upper = np.triu(rng.random((n, n)) < rng.uniform(0.2, 0.9), 1)
        separated = upper | upper.T
        found = largest_separated_sets(separated)
        graph = nx.Graph()
        graph.add_nodes_from(range(n))
        graph.add_edges_from(zip(*np.nonzero(upper)))
        cliques = [tuple(sorted(c)) for c in nx.find_cliques(graph)]
        size = max(len(c) for c in cliques)
        assert sorted(found) == sorted(c for c in cliques if len(c) == size)


def test_paired_intervals_separate_what_overlapping_intervals_cannot():
    # Three runs on the same 200 samples: b is a plus a small shift, c draws its own noise with a's mean. Alone each
    # interval is as wide as the samples' spread, so a and b overlap; paired, their difference is the shift.
    bench = load_script("bench/fidelity.py")
    rng = np.random.default_rng(1)
    a = rng.normal(0.5, 0.1, 200)
    runs = [a, a + 0.01 + rng.normal(0, 0.002, 200), rng.normal(0.5, 0.1, 200), a.copy()]
    statistics = [resampled_mean(v) for v in runs]
    separated = bench.paired_separation(statistics, 200, seed=0, resamples=1000, level=0.95)
    assert (separated == separated.T).all() and not separated.diagonal().any()
    assert separated[0, 1] and not separated[0, 2] and not separated[0, 3]
    rows = []
    for i, values in enumerate(runs[:2]):
        ci = interval(resampled_mean(values), bootstrap_indices(200, 1000, 0))
        rows.append({"candidate": i, **ci.fields("m")})
    assert len(bench.apart_set(rows, "m")) == 1  # disjoint intervals: not told apart


def _settings(tmp_path, tiny_pipe_dir, search_data, n_trials, **fidelity):
    cfg = cheap_search_config(tiny_pipe_dir, search_data, search={
        "n_trials": n_trials, "sampler": "tpe", "fidelity": {"enabled": True, "min_steps": 2, **fidelity}})
    return load_settings(cfg, tmp_path)


def _screened(number: int, scores, state=TrialState.PRUNED) -> optuna.trial.FrozenTrial:
    attrs = {fd.ATTR_FIDELITY: fd.SCREEN, st.ATTR_STATUS: "screened"}
    if scores is not None:
        attrs.update(screen_memorization=scores[0], screen_quality=scores[1])
    return create_trial(state=state, params={"lr": 1e-3 * (number + 1)},
                        distributions={"lr": FloatDistribution(1e-4, 1e-1, log=True)}, user_attrs=attrs)


def test_brackets_are_read_back_from_the_study(tmp_path, tiny_pipe_dir, search_data):
    settings = _settings(tmp_path, tiny_pipe_dir, search_data, n_trials=5, eta=2, bracket=3)
    study = optuna.create_study(directions=list(st.DIRECTIONS))
    for i, scores in enumerate([(3, 3), (1, 1), (2, 2), (5, 0)]):
        study.add_trial(_screened(i, scores))
    # Bracket 0 (trials 0-2) is decided: ceil(3/2) = 2 promotions; bracket 1 waits for its fifth candidate.
    assert [t.number for t in fd.due_promotions(study, settings)] == [1, 2]
    assert fd.queue_promotions(study, settings) == 2 and fd.queue_promotions(study, settings) == 0
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs[st.ATTR_PROMOTED_FROM] for t in waiting] == [1, 2]
    assert [t.user_attrs[fd.ATTR_FIDELITY] for t in waiting] == [fd.FULL, fd.FULL]
    assert st.budget_used(study) == 4  # promotions are not candidates
    # The last candidate fails its screen: the last bracket (3, 4) is decided and promotes trial 3 only.
    study.add_trial(_screened(4, None, state=TrialState.FAIL))
    assert [t.number for t in fd.due_promotions(study, settings)] == [1, 2, 3]
    assert [t.number for t in fd.missing_promotions(study, settings)] == [3]
    # Two workers queued promotion 3 at once: the copy asked later is a duplicate.
    fd.queue_promotions(study, settings)
    study.enqueue_trial({"lr": 4e-3}, user_attrs={st.ATTR_PROMOTED_FROM: 3, fd.ATTR_FIDELITY: fd.FULL})
    copies = [t.number for t in study.get_trials() if t.user_attrs.get(st.ATTR_PROMOTED_FROM) == 3]
    assert not fd.duplicate_promotion(study, copies[0], 3) and fd.duplicate_promotion(study, copies[1], 3)


def test_nsga2_is_refused_with_fidelity(tiny_pipe_dir, search_data, tmp_path):
    cfg = cheap_search_config(tiny_pipe_dir, search_data, search={"sampler": "nsga2", "fidelity": {"enabled": True}})
    with pytest.raises(ConfigError, match="fidelity.enabled needs sampler: tpe"):
        load_settings(cfg, tmp_path)


def test_a_compressed_screen_runs_the_whole_schedule_in_its_steps(tiny_pipe_dir, search_data, tmp_path):
    from memcontrol.training import TrainConfig

    full = TrainConfig.from_dict({"steps": 500, "warmup": 100, "schedule": "cosine", "lr": 1e-3})
    truncated = fd.screen_train_config(full, {"min_steps": 100, "schedule": "truncated"})
    compressed = fd.screen_train_config(full, {"min_steps": 100, "schedule": "compressed"})
    assert (truncated.steps, truncated.warmup) == (100, 100)  # the screen is the warm-up and nothing else
    assert (compressed.steps, compressed.warmup) == (100, 20)
    assert compressed.schedule == "cosine" and compressed.lr == full.lr
    assert fd.screen_train_config(full, {"min_steps": 900, "schedule": "compressed"}) == full

    # Studies screened before the options existed (truncated, probe noise norm) keep their fingerprint; another
    # schedule or the new default proxy needs a new study.
    def sections(**fidelity):
        cfg = cheap_search_config(tiny_pipe_dir, search_data, search={
            "sampler": "tpe", "fidelity": {"enabled": True, **fidelity}})
        return load_settings(cfg, tmp_path).fingerprint_sections()["fidelity"]

    before = sections(schedule="truncated", memorization_proxy="noise_norm")
    assert "schedule" not in before and "memorization_proxy" not in before
    assert sections(schedule="compressed")["schedule"] == "compressed"
    assert sections()["memorization_proxy"] == "train_fit"
    # The sampled quality proxy's settings count only when it is the proxy.
    assert not {"quality_proxy", "quality_samples", "sample_steps"} & set(sections(quality_samples=9))
    assert sections(quality_proxy="sample_fd", quality_samples=9)["quality_samples"] == 9


def test_the_sampled_quality_proxy_is_the_fd_of_the_screen_samples(tiny_pipe_dir, search_data, tmp_path):
    from memcontrol.metrics.quality import frechet_distance
    from memcontrol.sampling import generate_samples
    from memcontrol.search.context import build_context
    from memcontrol.search.space import Candidate
    from memcontrol.search.trial import evaluate_candidate

    assert fd.screen_prompts(list("abcdef"), 3) == (["a", "c", "e"], 1)
    assert fd.screen_prompts(list("ab"), 5) == (["a", "b"], 3)
    cfg = cheap_search_config(tiny_pipe_dir, search_data, sampling={"quality_prompts": 2, "seed": 3}, search={
        "sampler": "tpe", "fidelity": {"enabled": True, "min_steps": 2, "quality_items": 2, "quality_draws": 2,
                                       "quality_proxy": "sample_fd", "quality_samples": 5, "sample_steps": 2}})
    settings = load_settings(cfg, tmp_path)
    ctx = build_context(settings, "cpu", progress=False)
    candidate = Candidate(sites=["mid_block.attentions.0"], granularity="block", family="lora",
                          family_params={"rank": 2, "alpha": 2}, train={"lr": 1e-3})
    out = evaluate_candidate(ctx, candidate, tmp_path / "screen", early_stop=False, keep_adapter=False, screen=True)
    assert out.status == "screened", out.reason
    m = out.metrics
    assert m["screen_quality"] == m["screen_sample_fd"] and "FD of 5 samples" in out.reason
    assert 0.0 < m["screen_heldout_loss"] < 10.0 and m["screen_heldout_loss"] != m["screen_quality"]
    # The proxy is the FD of the first 5 samples of the 2 held-out prompts (3 each) at the study's seed, sampler
    # and guidance, with 2 sampler steps, against the held-out images: here for the base model's UNet.
    images = generate_samples(ctx.pipe, ctx.quality_prompts, n_per_prompt=3, steps=2, seed=3, guidance_scale=2.0,
                              sampler=settings.sampling["sampler"])[:5]
    refs = ctx.references
    expected = frechet_distance(refs.quality_embedder.embed(images).float(), refs.heldout_features)
    assert fd.sample_fd(ctx, ctx.pipe.unet) == pytest.approx(expected, rel=1e-6)
    assert math.isfinite(expected) and expected > 0.0


def _study(out):
    return optuna.load_study(storage=f"sqlite:///{out / 'study.db'}", study_name="memcontrol")


def test_only_promoted_candidates_train_the_full_budget_and_resume_recomputes_nothing(tmp_path, tiny_pipe_dir,
                                                                                         search_data):
    cfg = cheap_search_config(tiny_pipe_dir, search_data, train={"steps": 6, "batch_size": 2, "lr": 1e-3, "seed": 0},
                              search={"n_trials": 2, "sampler": "tpe",
                                      "fidelity": {"enabled": True, "min_steps": 2, "eta": 2, "bracket": 2,
                                                   "quality_items": 2, "quality_draws": 2}})
    config = write_config(tmp_path / "search.yaml", cfg)
    out = tmp_path / "run"
    argv = ["search", "--config", str(config), "--out", str(out)]
    assert main(argv) == 0
    first = _study(out).get_trials()
    assert [t.user_attrs[fd.ATTR_FIDELITY] for t in first] == [fd.SCREEN] * 2 + [fd.FULL]

    # A larger budget continues the study: one more candidate, a last bracket of one, one more promotion.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/metrics.json")}
    assert main(argv + ["--n-trials", "3"]) == 0
    trials = _study(out).get_trials()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    screened = [t for t in trials if t.user_attrs[fd.ATTR_FIDELITY] == fd.SCREEN]
    full = [t for t in trials if t.user_attrs[fd.ATTR_FIDELITY] == fd.FULL]
    assert len(screened) == 3 and len(full) == 2
    assert all(t.state == TrialState.PRUNED and t.user_attrs["steps"] == 2 for t in screened)
    # The memorization proxy is the training images' fit (negated denoising loss, by default); the probe noise norm
    # is kept beside it (bench/fidelity.py compares both).
    assert all(0.0 < t.user_attrs["screen_train_loss"] < 10.0 for t in screened)
    assert all(t.user_attrs["screen_memorization"] == -t.user_attrs["screen_train_loss"] for t in screened)
    assert all(t.user_attrs["screen_noise_norm"] > 0.0 for t in screened)
    assert all(t.state == TrialState.COMPLETE and t.user_attrs["steps"] == 6 for t in full)
    # Each promotion re-evaluates the best screened candidate of its bracket, with its parameters.
    by_number = {t.number: t for t in trials}
    brackets = [[t for t in screened if t.number < 2], [t for t in screened if t.number > 2]]
    for bracket, promotion in zip(brackets, full):
        scores = {t.number: (t.user_attrs["screen_memorization"], t.user_attrs["screen_quality"]) for t in bracket}
        assert promotion.user_attrs[st.ATTR_PROMOTED_FROM] == fd.promotion_order(scores)[0]
        assert promotion.params == by_number[promotion.user_attrs[st.ATTR_PROMOTED_FROM]].params
    # Files: samples and adapters only where the full budget ran.
    for t in screened:
        assert not (out / "trials" / str(t.number) / "samples").exists()
    pareto = {int(r["number"]) for r in csv.DictReader(open(out / "pareto.csv"))}
    assert pareto and pareto <= {t.number for t in full}
    states = [r["state"] for r in csv.DictReader(open(out / "trials.csv")) if r["kind"] == "trial"]
    assert states.count("screened") == 3 and states.count("complete") == 2

    # Once finished, a rerun only rebuilds the outputs.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/metrics.json")}
    before = [(t.number, t.state, t.values) for t in trials]
    assert main(argv + ["--n-trials", "3"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/metrics.json")} == stamps
    assert [(t.number, t.state, t.values) for t in _study(out).get_trials()] == before
