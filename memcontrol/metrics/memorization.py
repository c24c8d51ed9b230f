"""Memorization metrics on generated images against the training set. Definitions follow the README's "The checks".

* Copy detection (Somepalli et al. 2023; Carlini et al. 2023): the cosine similarity of each generated image's
  features to its nearest training image; a copy when it exceeds tau. Reports the fraction of copies, the mean and
  95th percentile of the similarities, and which training keys were copied how often.
* Calibrated tau: the threshold that at most a stated share of held-out real patients (never trained on) exceed
  in their similarity to the training set: their false-positive rate as copies.
* Distance ratio (Yoon et al. 2023; Gu et al. 2023): in pixel space, a sample is memorized when
  d(x, NN1) / d(x, NN2) < 1/3, NN1 and NN2 its two nearest training images by L2. A training image present twice
  (duplicate records, common in real data) would be its own NN2 and make the ratio 0/0 or meaningless, so identical
  training images are collapsed first (exact pixel equality); with ``distinct_by="key"``, NN2 is moreover the
  nearest image of another key than NN1 (several images of one patient then count as one).
* Tiled L2 (Carlini et al. 2023): images are mapped to [0, 1] and cut into a grid x grid set of equal tiles; the
  distance of two images is the largest, over tiles, of the root-mean-square pixel difference inside the tile (so it
  lies in [0, 1] whatever the image size). A generated image is a copy when its distance to the nearest training
  image is below delta: a near match everywhere, which a global L2 can miss when most of the image is background.
* Extraction (Carlini et al. 2023): many samples per prompt; samples closer than delta (tiled L2) are linked, and a
  prompt is extracted when a clique of at least ``min_clique`` mutually near-identical samples forms and its most
  central member is within delta of a training image. The clique is grown greedily from each sample in order of
  degree, which finds a large clique (a lower bound on the largest one) in O(n^3) at worst.

Every headline figure carries its 95% interval (``<name>_ci_low``, ``<name>_ci_high``): a Wilson interval for each
fraction, a bootstrap interval over the generated samples for the mean and 95th percentile (the training side is
fixed). ``indices`` is the bootstrap's resample matrix (``intervals.bootstrap_indices``): pass the same one to runs
sampled on the same prompts and seeds to compare them pairwise; by default 1,000 resamples from seed 0. The maximum
has none: no bootstrap interval of a maximum is trustworthy.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter

import numpy as np
import torch

from .intervals import bootstrap_indices, interval, resampled_mean, resampled_percentile, wilson
from .nn_search import nearest_neighbours

DEFAULT_TAU = 0.5
RATIO_THRESHOLD = 1 / 3
DEFAULT_DELTA = 0.1


def _summary(values: np.ndarray, indices: np.ndarray | None) -> dict:
    if len(values) == 0:
        return {"mean": None, "p95": None, "max": None}
    idx = bootstrap_indices(len(values)) if indices is None else indices
    return {**interval(resampled_mean(values), idx).fields("mean"),
            **interval(resampled_percentile(values, 95), idx).fields("p95"), "max": float(values.max())}


def _rate(hits: int, n: int) -> dict:
    """The fraction with its Wilson interval; 0 with an empty interval when there was nothing to count."""
    return wilson(hits, n).fields("fraction") if n else {"fraction": 0.0, "fraction_ci_low": None,
                                                         "fraction_ci_high": None}


def _attribution(keys: list[str], flags: np.ndarray) -> list[dict]:
    counts = Counter(k for k, f in zip(keys, flags) if f)
    return [{"key": k, "copies": c} for k, c in sorted(counts.items(), key=lambda kc: (-kc[1], kc[0]))]


def copy_detection(gen_feats, train_feats, train_keys: list[str], tau: float = DEFAULT_TAU,
                   chunk_size: int = 16384, indices: np.ndarray | None = None) -> dict:
    """Nearest-neighbour copy detection by cosine similarity of features (generated N x D against training M x D)."""
    if len(train_keys) != len(train_feats):
        raise ValueError(f"{len(train_keys)} training keys for {len(train_feats)} training features")
    sims, idx = nearest_neighbours(gen_feats, train_feats, k=1, chunk_size=chunk_size)
    sims, idx = sims[:, 0].numpy().astype(np.float64), idx[:, 0].numpy()
    keys = [train_keys[i] for i in idx]
    flags = sims > tau
    return {"metric": "copy_detection", "tau": tau, "n": len(sims), "copies": int(flags.sum()),
            **_rate(int(flags.sum()), len(flags)), **_summary(sims, indices),
            "attribution": _attribution(keys, flags),
            "samples": {"similarity": sims.tolist(), "nn_index": idx.tolist(), "nn_key": keys,
                        "is_copy": flags.tolist()}}


def tau_at_false_positive_rate(heldout_similarities, rate: float) -> float:
    """The smallest observed threshold that at most a share ``rate`` of held-out real patients exceed (each
    patient's similarity to its nearest training image); ``rate`` 0 gives the largest similarity."""
    values = np.sort(np.asarray(heldout_similarities, dtype=np.float64))
    if len(values) == 0:
        raise ValueError("calibrating tau needs at least one held-out similarity")
    if not 0 <= rate < 1:
        raise ValueError(f"the false-positive rate must be in [0, 1), got {rate}")
    allowed = int(np.floor(rate * len(values) + 1e-9))  # how many held-out patients may lie above tau
    return float(values[len(values) - 1 - allowed])


def calibrate_tau(heldout_feats, train_feats, rate: float) -> tuple[float, np.ndarray]:
    """tau at false-positive rate ``rate`` from held-out and training features, and the held-out similarities."""
    sims = nearest_neighbours(heldout_feats, train_feats, k=1)[0][:, 0].double().numpy()
    return tau_at_false_positive_rate(sims, rate), sims


def _flat(images) -> torch.Tensor:
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    return x.detach().float().flatten(1)


def unique_rows(flat: torch.Tensor) -> np.ndarray:
    """Indices of the first occurrence of every distinct row (exact equality)."""
    seen: dict[str, int] = {}
    for i, row in enumerate(flat.numpy()):
        seen.setdefault(hashlib.sha1(row.tobytes()).hexdigest(), i)
    return np.array(sorted(seen.values()), dtype=np.int64)


def distance_ratio(gen_images, train_images, train_keys: list[str] | None = None,
                   threshold: float = RATIO_THRESHOLD, distinct_by: str = "pixels",
                   indices: np.ndarray | None = None) -> dict:
    """The distance-ratio test in pixel space; identical training images are collapsed first (see module doc)."""
    if distinct_by not in ("pixels", "key"):
        raise ValueError("distinct_by must be 'pixels' or 'key'")
    train = _flat(train_images)
    keys = list(train_keys) if train_keys is not None else [str(i) for i in range(len(train))]
    keep = unique_rows(train)
    train, keys = train[keep], [keys[i] for i in keep]
    gen = _flat(gen_images)
    if distinct_by == "key":
        k = min(len(train), max(Counter(keys).values()) + 1)
    else:
        k = min(len(train), 2)
    dist, idx = nearest_neighbours(gen, train, k=k, metric="l2")
    dist, idx = dist.double().numpy(), idx.numpy()
    d1, nn1 = dist[:, 0], idx[:, 0]
    d2 = np.full(len(gen), np.nan)
    for row in range(len(gen)):
        for col in range(1, k):
            if distinct_by == "pixels" or keys[idx[row, col]] != keys[nn1[row]]:
                d2[row] = dist[row, col]
                break
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(d2 > 0, d1 / d2, np.nan)
    flags = np.nan_to_num(ratio, nan=np.inf) < threshold
    nn_keys = [keys[i] for i in nn1]
    return {"metric": "distance_ratio", "threshold": threshold, "n": len(gen), "memorized": int(flags.sum()),
            **_rate(int(flags.sum()), len(flags)), **_mean_ratio(ratio, indices),
            "training_duplicates_removed": int(len(_flat(train_images)) - len(keep)), "distinct_by": distinct_by,
            "attribution": _attribution(nn_keys, flags),
            "samples": {"ratio": [None if not np.isfinite(r) else float(r) for r in ratio], "nn_key": nn_keys,
                        "d1": d1.tolist(), "is_memorized": flags.tolist()}}


def _mean_ratio(ratio: np.ndarray, indices: np.ndarray | None) -> dict:
    """The mean of the defined ratios (a sample with no second distinct neighbour has none), with its interval."""
    defined = np.where(np.isfinite(ratio), ratio, np.nan)
    if not np.isfinite(defined).any():
        return {"mean_ratio": None, "mean_ratio_ci_low": None, "mean_ratio_ci_high": None}
    idx = bootstrap_indices(len(defined)) if indices is None else indices

    def statistic(rows):
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample holding no defined ratio gives NaN
            return np.nanmean(defined[rows], axis=1)

    return interval(statistic, idx).fields("mean_ratio")


def _tiles(images, grid: int) -> torch.Tensor:
    """[-1, 1] images N x C x H x W -> N x tiles x (C * tile pixels), in [0, 1]."""
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    x = (x.detach().double() + 1) / 2
    n, c, h, w = x.shape
    if h % grid or w % grid:
        raise ValueError(f"tiled L2: image size {h}x{w} is not divisible by the {grid}x{grid} grid")
    x = x.view(n, c, grid, h // grid, grid, w // grid).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, grid * grid, -1)


def tiled_distances(a_tiles: torch.Tensor, b_tiles: torch.Tensor) -> torch.Tensor:
    """Tiled L2 between every row of a (A x tiles x P) and of b (B x tiles x P): the A x B matrix of the largest
    per-tile RMS difference."""
    per_tile = a_tiles.shape[-1]
    worst = torch.zeros(len(a_tiles), len(b_tiles), dtype=torch.float64)
    for t in range(a_tiles.shape[1]):
        a, b = a_tiles[:, t], b_tiles[:, t]
        d2 = (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T).clamp_min(0)
        worst = torch.maximum(worst, (d2 / per_tile).sqrt())
    return worst


def _nearest_tiled(gen_tiles, train_tiles, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    best = np.full(len(gen_tiles), np.inf)
    arg = np.zeros(len(gen_tiles), dtype=np.int64)
    for start in range(0, len(train_tiles), chunk):
        d = tiled_distances(gen_tiles, train_tiles[start:start + chunk])
        vals, idx = d.min(1)
        better = vals.numpy() < best
        best[better] = vals.numpy()[better]
        arg[better] = idx.numpy()[better] + start
    return best, arg


def tiled_l2(gen_images, train_images, train_keys: list[str] | None = None, delta: float = DEFAULT_DELTA,
             grid: int = 4, indices: np.ndarray | None = None) -> dict:
    """Tiled-L2 copy test of each generated image against its nearest training image (see module doc)."""
    keys = list(train_keys) if train_keys is not None else [str(i) for i in range(len(train_images))]
    dist, arg = _nearest_tiled(_tiles(gen_images, grid), _tiles(train_images, grid))
    flags = dist < delta
    nn_keys = [keys[i] for i in arg]
    return {"metric": "tiled_l2", "delta": delta, "grid": grid, "n": len(dist), "copies": int(flags.sum()),
            **_rate(int(flags.sum()), len(flags)), **_summary(dist, indices),
            "attribution": _attribution(nn_keys, flags),
            "samples": {"distance": dist.tolist(), "nn_key": nn_keys, "is_copy": flags.tolist()}}


def greedy_clique(adjacent: np.ndarray) -> list[int]:
    """A large clique of a symmetric boolean adjacency matrix (diagonal ignored), grown greedily by degree."""
    adj = adjacent.copy()
    np.fill_diagonal(adj, False)
    degree = adj.sum(1)
    order = np.argsort(-degree, kind="stable")
    best: list[int] = []
    for seed in order:
        if degree[seed] + 1 <= len(best):
            break
        clique = [int(seed)]
        candidates = adj[seed].copy()
        while candidates.any():
            pick = int(np.flatnonzero(candidates)[np.argmax(degree[candidates])])
            clique.append(pick)
            candidates &= adj[pick]
        if len(clique) > len(best):
            best = clique
    return best


def extraction(samples_by_prompt, train_images, train_keys: list[str] | None = None, delta: float = DEFAULT_DELTA,
               min_clique: int = 10, grid: int = 4, prompts: list[str] | None = None) -> dict:
    """The extraction attack: ``samples_by_prompt`` is P x n x C x H x W (n samples of each of P prompts)."""
    keys = list(train_keys) if train_keys is not None else [str(i) for i in range(len(train_images))]
    train_tiles = _tiles(train_images, grid)
    rows = []
    for p, samples in enumerate(samples_by_prompt):
        tiles = _tiles(samples, grid)
        pairwise = tiled_distances(tiles, tiles).numpy()
        clique = greedy_clique(pairwise < delta)
        centre = clique[int(np.argmin(pairwise[np.ix_(clique, clique)].mean(1)))]
        dist, arg = _nearest_tiled(tiles[centre:centre + 1], train_tiles)
        matched = bool(dist[0] < delta)
        rows.append({"prompt": prompts[p] if prompts else p, "clique_size": len(clique),
                     "match_distance": float(dist[0]), "nearest_key": keys[arg[0]],
                     "extracted": bool(len(clique) >= min_clique and matched)})
    extracted = [r for r in rows if r["extracted"]]
    return {"metric": "extraction", "delta": delta, "min_clique": min_clique, "grid": grid, "prompts": len(rows),
            "extracted": len(extracted), **_rate(len(extracted), len(rows)),
            "extracted_keys": sorted({r["nearest_key"] for r in extracted}), "per_prompt": rows}
