"""95% intervals for every figure: Wilson intervals for rates, bootstrap intervals over generated samples.

* ``wilson(k, n)``: the Wilson score interval of a rate k / n (copy rates, precision, recall). Unlike the normal
  approximation it stays inside [0, 1] and is not degenerate at k = 0 or k = n.
* ``bootstrap_indices``: resamples of sample positions, drawn once and shared. Pass the same index matrix to the
  statistic of two runs that were sampled on the same prompts and seeds, and the interval of their difference (or of
  a ratio, such as the fraction of a gap closed) is *paired*: the prompt-to-prompt variation both runs share cancels.
  With ``groups`` (one label per sample, e.g. its sampling seed), the resample is two-stage: seeds are drawn with
  replacement, then samples within each drawn seed, so that the interval also carries the seed-to-seed variation.
* ``resampled_*``: the statistics the search, the audit and the benches report, vectorised over resamples
  (a B x n index matrix in, B values out). The reference side (held-out features) is held fixed: the interval is
  over generated samples, as the figures compare runs against the same held-out set.
* ``percentile_interval`` / ``interval``: the percentile interval of the resampled values beside the point value
  computed on all samples (the point value is never replaced by a bootstrap mean).
* ``replicate_interval``: the mean of one figure measured by independent replicates of a whole procedure (studies
  trained with other seeds), with Student's t interval over them: it carries the training noise that the intervals
  above, which resample the samples of one trained model, do not. Few replicates give wide intervals, rightly.
* ``largest_separated_sets``: given which pairs of candidates an interval separates, every largest set of candidates
  all pairwise separated: the candidates whose ranking means something, over which a cheap ranking is judged.

An ``Interval`` writes itself as ``{name: value, name_ci_low: low, name_ci_high: high}``, the column convention of
trials.csv, pareto.csv, metrics.json and the benches.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, t

from .quality import psd_sqrt

LEVEL = 0.95
RESAMPLES = 1000


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def fields(self, name: str) -> dict:
        return {name: self.value, f"{name}_ci_low": self.low, f"{name}_ci_high": self.high}

    def excludes(self, x: float = 0.0) -> bool:
        """Whether ``x`` lies outside the interval: for a difference, whether it is outside the noise."""
        return not (self.low <= x <= self.high)

    def __str__(self) -> str:
        return format_interval(self.value, self.low, self.high)


def format_interval(value, low=None, high=None, spec: str = ".4g") -> str:
    """"0.653 [0.641, 0.665]"; the bare value where no interval was recorded, "-" where no value."""
    def text(x):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(float(x), spec)

    if low is None or high is None:
        return text(value)
    return f"{text(value)} [{text(low)}, {text(high)}]"


def wilson(successes: int, n: int, level: float = LEVEL) -> Interval:
    """Wilson score interval of the rate ``successes / n``; NaN throughout when n = 0."""
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    z = float(norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def rate_difference(k1: int, n1: int, k2: int, n2: int, level: float = LEVEL) -> Interval:
    """Interval of the difference of two independent rates k1/n1 - k2/n2 (Newcombe's hybrid score interval, from
    the two Wilson intervals): it stays informative at 0 of n, where a bootstrap of a rate is degenerate."""
    a, b = wilson(k1, n1, level), wilson(k2, n2, level)
    d = a.value - b.value
    low = d - math.sqrt((a.value - a.low) ** 2 + (b.high - b.value) ** 2)
    high = d + math.sqrt((a.high - a.value) ** 2 + (b.value - b.low) ** 2)
    return Interval(d, max(-1.0, low), min(1.0, high))


def rate_ratio_cut(k_new: int, n_new: int, k_ref: int, n_ref: int, level: float = LEVEL, draws: int = 20000,
                   seed: int = 0) -> Interval:
    """How much a rate was cut, 1 - (k_new/n_new) / (k_ref/n_ref), with the equal-tailed interval of that figure under
    independent Jeffreys posteriors Beta(k + 1/2, n - k + 1/2) of the two rates (a bootstrap cannot widen 0 of n)."""
    if n_new == 0 or n_ref == 0 or k_ref == 0:
        return Interval(math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    new = rng.beta(k_new + 0.5, n_new - k_new + 0.5, draws)
    ref = rng.beta(k_ref + 0.5, n_ref - k_ref + 0.5, draws)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(1 - new / ref, [tail, 100 - tail])
    return Interval(1 - (k_new / n_new) / (k_ref / n_ref), float(low), float(high))


def replicate_interval(values, level: float = LEVEL) -> Interval:
    """Mean of ``values`` (one per independent replicate) with Student's t interval, n - 1 degrees of freedom. Not a
    bootstrap: over 3 to 5 replicates a resample of them has too few distinct outcomes and is too narrow. NaN bounds
    below two replicates; zero width when all replicates agree (the caller says so rather than print it as certain)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or not np.all(np.isfinite(values)):
        raise ValueError(f"replicate values must be finite numbers, got {values.tolist()}")
    mean = float(values.mean()) if len(values) else math.nan
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan)
    half = float(t.ppf(0.5 + level / 2, len(values) - 1)) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half)


def largest_separated_sets(separated: np.ndarray) -> list[tuple[int, ...]]:
    """Every largest set of candidates whose pairs are all separated (the maximum cliques of the ``separated``
    graph), by trying subsets from the largest size down; exhaustive, so for the dozen or so candidates of a study."""
    n = len(separated)
    if n > 22:
        raise ValueError(f"{n} candidates: the exhaustive search is for at most 22")
    for k in range(n, 0, -1):
        found = [c for c in itertools.combinations(range(n), k)
                 if all(separated[a, b] for a, b in itertools.combinations(c, 2))]
        if found:
            return found
    return []


def bootstrap_indices(n: int, resamples: int = RESAMPLES, seed: int = 0, groups=None) -> np.ndarray:
    """A ``resamples`` x n matrix of sample positions drawn with replacement.

    With ``groups`` (n labels, every group of the same size), whole groups are drawn with replacement first and then
    positions within each drawn group: the two-stage bootstrap over seeds, then samples within them."""
    if n < 1:
        raise ValueError("nothing to resample")
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.integers(0, n, size=(resamples, n))
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group labels for {n} samples")
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    size = len(members[0])
    if any(len(m) != size for m in members):
        raise ValueError("groups of unequal size: every seed must have drawn the same number of samples")
    table = np.stack(members)                                       # G x size
    picked = rng.integers(0, len(members), size=(resamples, len(members)))
    within = rng.integers(0, size, size=(resamples, len(members), size))
    return table[picked[:, :, None], within].reshape(resamples, n)


def percentile_interval(value: float, resampled: np.ndarray, level: float = LEVEL) -> Interval:
    """The point value with the percentile interval of its resampled values (NaN resamples are ignored)."""
    resampled = np.asarray(resampled, dtype=np.float64)
    finite = resampled[np.isfinite(resampled)]
    if len(finite) == 0:
        return Interval(float(value), math.nan, math.nan)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))


def interval(statistic, indices: np.ndarray, level: float = LEVEL, value: float | None = None) -> Interval:
    """``statistic(index matrix) -> values`` on every resample; the point value is the statistic on all samples, or
    ``value`` where the reported figure is computed otherwise (KID's mean over random subsets)."""
    if value is None:
        value = float(np.asarray(statistic(np.arange(indices.shape[1])[None]))[0])
    return percentile_interval(value, statistic(indices), level)


def paired(statistic_a, statistic_b, indices: np.ndarray, combine=np.subtract, level: float = LEVEL) -> Interval:
    """Interval of ``combine(a, b)`` (default a - b) for two runs sampled on the same prompts and seeds: both
    statistics see the same resampled positions."""
    n = indices.shape[1]
    everything = np.arange(n)[None]
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(np.asarray(combine(statistic_a(everything), statistic_b(everything)))[0])
        return percentile_interval(value, combine(statistic_a(indices), statistic_b(indices)), level)


def resampled_mean(values) -> callable:
    values = np.asarray(values, dtype=np.float64)
    return lambda idx: values[idx].mean(axis=1)


def resampled_percentile(values, q: float) -> callable:
    values = np.asarray(values, dtype=np.float64)
    return lambda idx: np.percentile(values[idx], q, axis=1)


def resampled_frechet(generated, reference_stats: tuple[np.ndarray, np.ndarray]) -> callable:
    """Fréchet distance of resampled generated features to a fixed reference Gaussian (``gaussian_stats`` of the
    held-out features, fitted once), equal to ``frechet_from_stats(*reference_stats, *gaussian_stats(rows))``.

    Per resample it needs no d x d covariance: with C the centred resampled rows and R = sqrt(S_ref), the
    eigenvalues of R S R (S = C'C / (n - 1)) are those of the n x n matrix (CR)(CR)' / (n - 1), so the cost is
    O(n^2 d) per resample whichever of n and d is larger (d = 2048 Inception features stay affordable)."""
    x = np.asarray(generated, dtype=np.float64)
    mu_ref, sigma_ref = reference_stats
    projected = x @ psd_sqrt(sigma_ref)                            # rows of x R: centring commutes with R
    trace_ref = float(np.trace(sigma_ref))
    n, d = x.shape

    def statistic(idx):
        out = np.empty(len(idx))
        # Bound memory to about 2e7 floats of resampled rows at a time.
        chunk = max(1, int(2e7 // (idx.shape[1] * d)))
        for start in range(0, len(idx), chunk):
            sel = idx[start:start + chunk]
            rows, proj = x[sel], projected[sel]                    # b x n x d
            mu = rows.mean(1)
            centred = proj - proj.mean(1, keepdims=True)
            scale = sel.shape[1] - 1
            small = centred @ centred.transpose(0, 2, 1) if sel.shape[1] <= d else \
                centred.transpose(0, 2, 1) @ centred
            eig = np.linalg.eigvalsh(small / scale)
            trace_gen = ((rows - mu[:, None]) ** 2).sum((1, 2)) / scale
            diff = mu - mu_ref
            value = (diff * diff).sum(1) + trace_gen + trace_ref - 2 * np.sqrt(np.clip(eig, 0, None)).sum(1)
            out[start:start + chunk] = np.maximum(value, 0.0)
        return out

    return statistic


def resampled_mmd2(generated, reference) -> callable:
    """Unbiased MMD^2 (KID's cubic polynomial kernel) of resampled generated features against the whole fixed
    reference. The kernel matrices are computed once; a resample only re-weights them by how often it drew each
    sample. Pairs of one sample with its own copy are left out of the within-set term, as the diagonal is."""
    x = np.asarray(generated, dtype=np.float64)
    y = np.asarray(reference, dtype=np.float64)
    n, m, d = len(x), len(y), x.shape[1]
    k_xx = (x @ x.T / d + 1) ** 3
    k_xy_rows = ((x @ y.T / d + 1) ** 3).sum(1)
    k_yy = (y @ y.T / d + 1) ** 3
    within_y = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    diag = np.diag(k_xx)

    def statistic(idx):
        counts = np.zeros((len(idx), n))
        np.add.at(counts, (np.arange(len(idx))[:, None], idx), 1)
        size = idx.shape[1]
        same = counts * counts
        pairs = np.einsum("bi,ij,bj->b", counts, k_xx, counts) - same @ diag
        # A resample of one sample drawn n times has no pair of distinct samples: NaN, left out of the interval.
        with np.errstate(divide="ignore", invalid="ignore"):
            within_x = pairs / (size * size - same.sum(1))
        return within_x + within_y - 2 * (counts @ k_xy_rows) / (size * m)

    return statistic
