"""Shared test fixtures of the masks / training / export area (registered in conftest.py)."""

import pytest
import torch

CAPTIONS = ["pa chest radiograph normal", "small nodule left upper zone", "pleural effusion right lower zone",
            "enlarged cardiac silhouette", "clear lungs no acute finding", "ap portable chest radiograph"]


def phantom_like_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """n x 3 x size x size images in [-1, 1]: a bright body with two dark lung fields, each with its own geometry
    and noise. Enough structure for the VAE and the loss to see; no file IO."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        a, b, shift = 0.25 + 0.1 * torch.rand(3, generator=gen)
        body = ((xx / 0.9) ** 2 + (yy / 0.95) ** 2 < 1).float() * 0.6
        lungs = sum((((xx - s * shift) / a) ** 2 + ((yy + 0.05) / (b + 0.3)) ** 2 < 1).float() for s in (-1, 1))
        img = body - 0.45 * lungs + 0.05 * torch.randn(size, size, generator=gen)
        images.append(img.clamp(0, 1).mul(2).sub(1).expand(3, size, size))
    return torch.stack(images)


def make_dataset(n: int = 4, seed: int = 0):
    from memcontrol.training import InMemoryDataset

    return InMemoryDataset(phantom_like_images(n, seed=seed), [CAPTIONS[i % len(CAPTIONS)] for i in range(n)],
                           [f"subject-{i:03d}" for i in range(n)])


@pytest.fixture(scope="session")
def mask_dataset():
    return make_dataset(4)


@pytest.fixture(scope="session")
def tiny_cached(tiny_pipe, mask_dataset, tmp_path_factory):
    """The training cache of ``mask_dataset`` for the tiny pipeline."""
    from memcontrol.training import cache_training_data

    return cache_training_data(tiny_pipe, mask_dataset, tmp_path_factory.mktemp("train-cache"), progress=False)
