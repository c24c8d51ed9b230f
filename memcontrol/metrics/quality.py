"""Distribution distances between real (held-out) and generated feature sets: Fréchet distance and KID.

Fréchet distance: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64. The trace of the square root is
computed from the symmetric form: the eigenvalues of S1 S2 equal those of sqrt(S1) S2 sqrt(S1), which is symmetric
positive semi-definite, so an eigen-decomposition (no general matrix square root, no complex round-off) gives
Tr((S1 S2)^(1/2)) = sum of the square roots of its eigenvalues, tiny negative ones (round-off) clipped to zero.
This stays finite for the singular covariances of small sample sets, where scipy's general sqrtm needs an offset.

KID (Binkowski et al. 2018): the unbiased estimate of MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets of equal size drawn from each set (without replacement). The
spread over subsets is not a run's uncertainty (subsets share samples); ``quality_report`` gives bootstrap intervals.

Features go in as the network gives them: rows are never L2-normalised here (that would change what is measured).

The value is called "FID" only on the standard Inception-v3 pool features; on any other features it is
"FD[<feature name>]", since the numbers are not comparable with published FIDs. With fewer samples than feature
dimensions the covariance is singular and the Fréchet estimate strongly biased: ``quality_report`` says so and
points at KID, which has no such problem.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _float64(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    return np.asarray(features, dtype=np.float64)


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    f = _float64(features)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature rows (N x D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    root1 = psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    # The distance is >= 0; a tiny negative value is round-off on (near-)identical distributions.
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt))


def frechet_distance(f1, f2) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (rows = samples), in float64."""
    return frechet_from_stats(*gaussian_stats(f1), *gaussian_stats(f2))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size sets with k(a, b) = (a.b / d + 1)^3."""
    m, d = len(x), x.shape[1]
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid(f1, f2, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, standard deviation) of the unbiased MMD^2 over ``subsets`` random subsets of
    ``subset_size`` rows of each set (capped at the smaller set's size)."""
    x, y = _float64(f1), _float64(f2)
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    values = [polynomial_mmd2(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def distance_name(features: str | dict, metric: str = "fd") -> str:
    """How a quality distance is named, by its feature space (an embedder's name, or its spec): "FID" only for the
    Fréchet distance on the standard Inception features, else "FD[features]"; "KID[features]". A spec of one of
    the hospital's metric networks is named by its folder ("FD[domain]"), as that embedder names itself."""
    if isinstance(features, dict):
        path = features.get("path")
        feature_name = Path(path).name if features["type"] == "metric_net" and path else features["type"]
    else:
        feature_name = features
    if metric == "kid":
        return f"KID[{feature_name}]"
    return "FID" if feature_name == "inception" else f"FD[{feature_name}]"


def quality_report(real, generated, feature_name: str, kid_subsets: int = 100, kid_subset_size: int = 1000,
                   seed: int = 0, indices: np.ndarray | None = None, real_stats=None) -> dict:
    """Fréchet distance and KID, each with its 95% interval (``fd_ci_low``, ``fd_ci_high``, ``kid_ci_low``,
    ``kid_ci_high``: a bootstrap over the generated samples, the real side fixed), their names, sample counts and a
    warning when the Fréchet estimate is biased. ``indices``: the bootstrap's resample matrix over the generated
    samples (``intervals.bootstrap_indices``; the same one for runs compared pairwise; by default 1,000 resamples
    from ``seed``). ``real_stats`` (``gaussian_stats(real)``) saves refitting a fixed reference on every call."""
    from .intervals import bootstrap_indices, interval, resampled_frechet, resampled_mmd2

    n_real, n_gen, dim = len(real), len(generated), real.shape[1]
    real_stats = gaussian_stats(real) if real_stats is None else real_stats
    gen = _float64(generated)
    idx = bootstrap_indices(n_gen, seed=seed) if indices is None else indices
    fd = frechet_from_stats(*real_stats, *gaussian_stats(gen))
    kid_mean, _ = kid(real, gen, kid_subsets, kid_subset_size, seed)
    out = {"features": feature_name, "fd_name": distance_name(feature_name),
           **interval(resampled_frechet(gen, real_stats), idx, value=fd).fields("fd"),
           **interval(resampled_mmd2(gen, _float64(real)), idx, value=kid_mean).fields("kid"),
           "n_real": n_real, "n_generated": n_gen, "dim": dim,
           "kid_subset_size": min(kid_subset_size, n_real, n_gen), "kid_subsets": kid_subsets, "warnings": []}
    if min(n_real, n_gen) < dim:
        out["warnings"].append(
            f"{out['fd_name']} from {min(n_real, n_gen)} samples in {dim} dimensions: the covariance is singular and "
            "the estimate is biased (it grows as samples shrink); compare runs by KID instead")
        out["preferred"] = "kid"
    else:
        out["preferred"] = "fd"
    return out
