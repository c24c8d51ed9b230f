"""Intervals: Wilson endpoints, bootstrap coverage by simulation, pairing, and the vectorised statistics against
the plain metric functions."""

import math

import numpy as np
import pytest
from scipy.stats import norm

from fixtures_scripts import load_script
from memcontrol.metrics.intervals import (bootstrap_indices, interval, paired, rate_difference, rate_ratio_cut,
                                          replicate_interval, resampled_frechet, resampled_mean,
                                          resampled_mmd2, wilson)
from memcontrol.metrics.quality import frechet_distance, frechet_from_stats, gaussian_stats


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (14, 18), (18, 18), (500, 1000)])
def test_wilson_endpoints_solve_the_score_equation(k, n):
    # The Wilson interval is {p : |k/n - p| <= z sqrt(p (1 - p) / n)}: both endpoints make it an equality.
    ci = wilson(k, n)
    z = norm.ppf(0.975)
    for p in (ci.low, ci.high):
        if p in (0.0, 1.0) and p == k / n:
            continue  # the interval is closed at the boundary when every or no trial succeeded
        assert abs(abs(k / n - p) - z * math.sqrt(p * (1 - p) / n)) < 1e-12
    assert ci.low <= k / n <= ci.high and ci.value == k / n


def test_wilson_matches_the_published_figures_of_the_issue():
    # Issue 11 quotes 14 of 18 detections right: precision 78%, Wilson 95% interval about [0.55, 0.91].
    ci = wilson(14, 18)
    assert (round(ci.low, 2), round(ci.high, 2)) == (0.55, 0.91)
    assert math.isnan(wilson(0, 0).value)


def _coverage(draw, truth, statistic, reps, resamples, seed):
    rng = np.random.default_rng(seed)
    hits = 0
    for r in range(reps):
        data = draw(rng)
        ci = interval(statistic(data), bootstrap_indices(len(data), resamples, seed=r))
        hits += ci.low <= truth <= ci.high
    return hits / reps


# With 400 replications the coverage estimate has a binomial standard error of sqrt(0.95 * 0.05 / 400) = 0.011;
# the percentile bootstrap also under-covers a little at these sample sizes (about 1 point). A band of
# [0.91, 0.985] is three standard errors on each side of the nominal rate, shifted by that known small bias.
COVERAGE_BAND = (0.91, 0.985)


def test_bootstrap_interval_of_a_mean_covers_the_true_mean_at_the_nominal_rate():
    rate = _coverage(lambda rng: rng.normal(0.6, 0.1, 80), 0.6, resampled_mean, reps=400, resamples=400, seed=1)
    assert COVERAGE_BAND[0] <= rate <= COVERAGE_BAND[1], rate


def test_bootstrap_interval_of_the_frechet_distance_covers_the_true_distance():
    # Generated features ~ N(mu, I) in 2 dimensions against a reference Gaussian known exactly: the true distance is
    # |mu - mu_ref|^2 = 1 (equal covariances). With 200 samples in 2 dimensions the estimator's bias (about d / n)
    # is far below its spread, so the percentile interval should cover at about the nominal rate.
    ref = (np.zeros(2), np.eye(2))
    mu = np.array([1.0, 0.0])
    rate = _coverage(lambda rng: rng.normal(size=(200, 2)) + mu, 1.0, lambda x: resampled_frechet(x, ref),
                     reps=400, resamples=200, seed=2)
    assert COVERAGE_BAND[0] <= rate <= COVERAGE_BAND[1], rate


def test_paired_interval_of_a_difference_is_narrower_than_unpaired_on_correlated_runs():
    rng = np.random.default_rng(3)
    prompt_effect = rng.normal(0, 1.0, 200)          # what both runs share: how hard each prompt is
    a = prompt_effect + rng.normal(0, 0.2, 200)
    b = prompt_effect + 0.1 + rng.normal(0, 0.2, 200)
    idx = bootstrap_indices(200, 1000, seed=0)
    together = paired(resampled_mean(a), resampled_mean(b), idx)
    # Unpaired: each run resampled on its own draws.
    idx_b = bootstrap_indices(200, 1000, seed=1)
    unpaired_low, unpaired_high = np.percentile(resampled_mean(a)(idx) - resampled_mean(b)(idx_b), [2.5, 97.5])
    assert together.excludes(0.0)                     # the 0.1 shift is outside the noise once paired
    assert unpaired_low < 0 < unpaired_high           # and inside it when the prompts' shared part is not cancelled
    assert (together.high - together.low) < 0.3 * (unpaired_high - unpaired_low)
    assert together.value == pytest.approx(a.mean() - b.mean(), abs=1e-12)   # the point value is not resampled


@pytest.mark.parametrize("n,d", [(40, 8), (12, 30)])
def test_resampled_frechet_equals_the_frechet_distance_of_the_resampled_rows(n, d):
    rng = np.random.default_rng(4)
    gen, ref = rng.normal(size=(n, d)), rng.normal(0.3, 1.2, size=(3 * d, d))
    stats = gaussian_stats(ref)
    idx = bootstrap_indices(n, 5, seed=0)
    values = resampled_frechet(gen, stats)(idx)
    expected = [frechet_from_stats(*stats, *gaussian_stats(gen[i])) for i in idx]
    # float64; the two routes take eigenvalues of different (similar) matrices, and with n < d the d x d route has
    # d - n + 1 zero eigenvalues that come out as +-1e-15, whose square roots add ~1e-8 each: 1e-6 relative.
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert resampled_frechet(gen, stats)(np.arange(n)[None])[0] == pytest.approx(
        frechet_distance(gen, ref), rel=1e-6)


def test_resampled_mmd2_is_the_unbiased_estimate_over_distinct_samples():
    rng = np.random.default_rng(5)
    gen, ref = rng.normal(size=(15, 4)), rng.normal(0.5, 1, size=(20, 4))

    def k(a, b):
        return (a @ b / 4 + 1) ** 3

    def direct(positions):
        # Written out pair by pair: gen pairs of two different samples, all ref pairs off the diagonal, all cross.
        xs = [gen[p] for p in positions]
        within_x = [k(xs[i], xs[j]) for i in range(len(xs)) for j in range(len(xs))
                    if positions[i] != positions[j]]
        within_y = [k(ref[i], ref[j]) for i in range(20) for j in range(20) if i != j]
        cross = [k(x, y) for x in xs for y in ref]
        return np.mean(within_x) + np.mean(within_y) - 2 * np.mean(cross)

    idx = bootstrap_indices(15, 3, seed=2)
    # float64 sums of a few hundred terms: 1e-10 relative.
    np.testing.assert_allclose(resampled_mmd2(gen, ref)(idx), [direct(list(i)) for i in idx], rtol=1e-10)


def test_two_stage_resampling_keeps_each_drawn_seed_together():
    groups = np.repeat([10, 20, 30], 4)               # three sampling seeds, four samples each
    idx = bootstrap_indices(12, 200, seed=0, groups=groups)
    blocks = groups[idx].reshape(200, 3, 4)
    assert (blocks == blocks[:, :, :1]).all()          # every block of four comes from one seed
    assert len({tuple(row) for row in blocks[:, :, 0]}) > 1 and (blocks[:, :, 0] == blocks[:, :1, 0]).any()
    with pytest.raises(ValueError, match="unequal"):
        bootstrap_indices(5, 10, groups=[0, 0, 0, 1, 1])


@pytest.mark.parametrize("p1, p2", [(0.35, 0.05), (0.2, 0.2)])
def test_rate_difference_covers_the_true_difference_of_two_rates(p1, p2):
    # Small counts, as a run's copy rate is (32 samples), one rate near 0: where a bootstrap would be degenerate.
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(1000):
        k1, k2 = rng.binomial(32, p1), rng.binomial(32, p2)
        iv = rate_difference(k1, 32, k2, 32)
        assert iv.low <= iv.value <= iv.high and iv.value == pytest.approx(k1 / 32 - k2 / 32)
        hits += iv.low <= p1 - p2 <= iv.high
    assert COVERAGE_BAND[0] <= hits / 1000 <= 0.995, hits / 1000


def test_rate_ratio_cut_covers_the_true_cut_and_widens_zero_copies():
    rng = np.random.default_rng(6)
    p_ref, p_new, hits, reps = 0.4, 0.04, 0, 300
    for _ in range(reps):
        k_ref, k_new = rng.binomial(32, p_ref), rng.binomial(32, p_new)
        iv = rate_ratio_cut(k_new, 32, k_ref, 32, draws=4000, seed=int(rng.integers(1 << 30)))
        hits += iv.low <= 1 - p_new / p_ref <= iv.high
    assert COVERAGE_BAND[0] <= hits / reps <= 0.995, hits / reps
    # 0 copies of 32 against 12 of 32 is a cut of 100%, but not a certain one: the interval reaches well below.
    iv = rate_ratio_cut(0, 32, 12, 32)
    assert iv.value == 1.0 and iv.high <= 1.0 and iv.low < 0.95
    assert math.isnan(rate_ratio_cut(0, 32, 0, 32).value)   # nothing to cut


def test_interval_coverage_bench_shows_the_percentile_bias_the_readme_reports():
    # bench/interval_coverage.py's simulation at a small size (48 samples in 16 dimensions, true FD 2, 200
    # replications): the README reports that the percentile interval memcontrol prints misses the true distance
    # when the bias is near the spread, and that the basic interval covers it. Coverage over 200 replications has a
    # binomial standard error of 0.015: 0.905 is the nominal 0.95 less three.
    bench = load_script("bench/interval_coverage.py")
    rate = bench.single(16, 48, 2.0, reps=200, resamples=200)
    assert rate["basic"] >= 0.905 and rate["percentile"] < 0.5, rate
    assert rate["mean estimate"] > 2.0  # the estimate's own upward bias


def test_replicate_interval_covers_the_true_mean_over_three_replicates():
    # Three studies of one procedure, each figure the truth plus training and sampling noise: Student's t with 2
    # degrees of freedom covers at the nominal rate; the normal quantile (z = 1.96) would cover about 81%.
    rng = np.random.default_rng(4)
    hits = [replicate_interval(rng.normal(100.0, 20.0, 3)) for _ in range(2000)]
    rate = np.mean([iv.low <= 100.0 <= iv.high for iv in hits])
    assert 0.93 <= rate <= 0.97, rate
    one = replicate_interval([90.0, 73.0, 93.0])
    assert one.value == pytest.approx(256 / 3) and one.high - one.value == pytest.approx(one.value - one.low)
    assert math.isnan(replicate_interval([5.0]).low)
    assert replicate_interval([0.0, 0.0, 0.0]) == replicate_interval([0.0, 0.0])  # all agree: zero width
    with pytest.raises(ValueError, match="finite"):
        replicate_interval([1.0, float("nan")])
