"""Exact nearest-neighbour search in bounded memory.

The references (training features: up to millions of rows, possibly a ``np.memmap`` on disk) are read one chunk at a
time; each chunk is scored against a block of queries with one matrix product and merged into a running top-k. Peak
extra memory is about ``query_block x chunk_size`` scores plus one chunk of references (float32), whatever the size of
the reference set. The result is exact: every reference is scored.

``metric="cosine"`` ranks by cosine similarity: each block of queries and chunk of references is L2-normalised as it
is read (embedders return features as the network gives them; similarity is where the normalisation belongs);
``metric="l2"`` ranks by Euclidean distance. The matrix-product form of L2 (|q|^2 + |r|^2 - 2 q.r) loses precision for
near-identical vectors, so the candidates it finds are re-scored with a direct float64 difference before ranking.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# Candidates kept beyond k for the exact L2 re-scoring, against rounding in the matrix-product ranking.
L2_RESCORE_MARGIN = 4


def _rows(data, start: int, stop: int) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data[start:stop].to(torch.float32)
    # np.array copies: a read-only memmap slice cannot back a torch tensor.
    return torch.from_numpy(np.array(data[start:stop], dtype=np.float32))


def _merge(best_vals, best_idx, vals, idx, k, largest):
    vals = torch.cat([best_vals, vals], 1)
    idx = torch.cat([best_idx, idx], 1)
    top = torch.topk(vals, min(k, vals.shape[1]), dim=1, largest=largest)
    return top.values, torch.gather(idx, 1, top.indices)


def nearest_neighbours(queries, references, k: int = 2, chunk_size: int = 16384, metric: str = "cosine",
                       query_block: int = 4096, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest references of every query: (scores Q x k, indices Q x k int64), best first.

    Scores are cosine similarities (descending) for ``metric="cosine"`` and Euclidean distances (ascending) for
    ``metric="l2"``. ``queries`` and ``references`` are N x D tensors or numpy arrays (memmaps included).
    """
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric must be 'cosine' or 'l2', not '{metric}'")
    n_ref, n_q = len(references), len(queries)
    if n_ref == 0:
        raise ValueError("no reference rows to search")
    k = min(k, n_ref)
    keep = min(n_ref, k + L2_RESCORE_MARGIN) if metric == "l2" else k
    largest = metric == "cosine"
    all_vals, all_idx = [], []
    for q0 in range(0, n_q, query_block):
        q = _rows(queries, q0, min(n_q, q0 + query_block))
        if metric == "cosine":
            q = F.normalize(q, dim=1)
        q_sq = q.square().sum(1, keepdim=True)
        best_vals = torch.empty(len(q), 0)
        best_idx = torch.empty(len(q), 0, dtype=torch.long)
        for r0 in tqdm(range(0, n_ref, chunk_size), desc="nearest neighbours", unit="chunk", leave=False,
                       disable=not progress or None):
            r = _rows(references, r0, min(n_ref, r0 + chunk_size))
            if metric == "cosine":
                r = F.normalize(r, dim=1)
            scores = q @ r.T
            if metric == "l2":
                scores = (q_sq + r.square().sum(1) - 2 * scores).clamp_min_(0)
            top = torch.topk(scores, min(keep, scores.shape[1]), dim=1, largest=largest)
            best_vals, best_idx = _merge(best_vals, best_idx, top.values, top.indices + r0, keep, largest)
        if metric == "l2":
            best_vals, best_idx = _rescore_l2(queries, references, q0, best_idx, k)
        all_vals.append(best_vals)
        all_idx.append(best_idx)
    return torch.cat(all_vals), torch.cat(all_idx)


def _take(data, idx: np.ndarray) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data[torch.from_numpy(idx)].to(torch.float64)
    return torch.from_numpy(np.asarray(data[idx], dtype=np.float64))


def _rescore_l2(queries, references, q0, candidates, k):
    q = _rows(queries, q0, q0 + len(candidates)).double()
    # Unique, sorted row numbers: a memmap is then read in one forward sweep.
    uniq, inverse = np.unique(candidates.numpy(), return_inverse=True)
    rows = _take(references, uniq)[torch.from_numpy(inverse.reshape(candidates.shape))]
    dist = (rows - q[:, None]).square().sum(-1).sqrt()
    top = torch.topk(dist, k, dim=1, largest=False)
    return top.values.float(), torch.gather(candidates, 1, top.indices)
