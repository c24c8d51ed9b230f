"""Exact nearest-neighbour search: chunked results equal a brute-force search, also from a memory-mapped file."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memcontrol.metrics import nearest_neighbours


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("chunk_size,query_block", [(7, 5), (1000, 4096), (64, 3)])
def test_cosine_matches_brute_force(chunk_size, query_block):
    refs, queries = _unit(300, 16, 0), _unit(23, 16, 1)
    sims, idx = nearest_neighbours(queries, refs, k=5, chunk_size=chunk_size, query_block=query_block)
    full = queries @ refs.T
    expected = torch.topk(full, 5, dim=1)
    assert torch.equal(idx, expected.indices)
    assert torch.allclose(sims, expected.values, atol=1e-6)


def test_l2_matches_cdist_and_is_exact_for_duplicates():
    g = torch.Generator().manual_seed(2)
    refs = torch.rand(200, 48, generator=g) * 2 - 1
    queries = torch.cat([refs[[5, 17]], torch.rand(6, 48, generator=g)])  # two exact copies of references
    dist, idx = nearest_neighbours(queries, refs, k=3, metric="l2", chunk_size=33)
    expected = torch.topk(torch.cdist(queries.double(), refs.double()), 3, dim=1, largest=False)
    assert torch.equal(idx, expected.indices)
    assert torch.allclose(dist.double(), expected.values, atol=1e-5)
    # The matrix-product form alone leaves round-off; the float64 re-scoring makes a copy's distance exactly 0.
    assert dist[0, 0].item() == 0.0 and dist[1, 0].item() == 0.0
    assert idx[0, 0].item() == 5 and idx[1, 0].item() == 17


def test_memmap_references(tmp_path):
    refs = _unit(500, 32, 3).numpy()
    path = tmp_path / "feats.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=refs.shape)
    mm[:] = refs
    mm.flush()
    ro = np.memmap(path, dtype=np.float32, mode="r", shape=refs.shape)
    queries = _unit(10, 32, 4)
    sims, idx = nearest_neighbours(queries, ro, k=2, chunk_size=64)
    s2, i2 = nearest_neighbours(queries, torch.from_numpy(refs), k=2, chunk_size=500)
    assert torch.equal(idx, i2) and torch.allclose(sims, s2)
    dist, didx = nearest_neighbours(queries.numpy(), ro, k=2, metric="l2", chunk_size=64)
    assert torch.equal(didx, idx)  # on unit vectors, L2 order is cosine order


def test_k_larger_than_reference_set_is_capped():
    sims, idx = nearest_neighbours(_unit(4, 8, 5), _unit(3, 8, 6), k=10)
    assert sims.shape == (4, 3) and sorted(idx[0].tolist()) == [0, 1, 2]


def test_bad_metric_and_empty_references_are_refused():
    with pytest.raises(ValueError, match="metric"):
        nearest_neighbours(_unit(2, 4, 0), _unit(2, 4, 1), metric="dot")
    with pytest.raises(ValueError, match="no reference"):
        nearest_neighbours(_unit(2, 4, 0), torch.zeros(0, 4))


def test_cosine_normalises_features_of_any_length():
    # Embedders return features as the network gives them; the cosine search normalises them itself. A reference
    # scaled by any factor is still a perfect match, and the scores are those of the normalised rows.
    g = torch.Generator().manual_seed(7)
    refs = torch.randn(50, 12, generator=g) * torch.rand(50, 1, generator=g) * 10
    queries = torch.cat([refs[[3]] * 0.01, torch.randn(4, 12, generator=g) * 5])
    sims, idx = nearest_neighbours(queries, refs, k=3, chunk_size=16)
    expected = torch.topk(F.normalize(queries, dim=1) @ F.normalize(refs, dim=1).T, 3, dim=1)
    assert torch.equal(idx, expected.indices)
    assert torch.allclose(sims, expected.values, atol=1e-6)  # float32 products of unit vectors
    assert idx[0, 0].item() == 3 and sims[0, 0].item() == pytest.approx(1.0, abs=1e-6)
