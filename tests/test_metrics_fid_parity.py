"""FID parity on image files: memcontrol's ``inception`` embedder and Fréchet distance against pytorch-fid's own
``calculate_fid_given_paths`` on the same two folders of PNGs, with the same (random) FID-Inception weights.

pytorch-fid is given its weights offline: a random state dict in its FID-Inception layout is written where
``torch.hub`` looks for the downloaded file (``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth``),
inside this test's temporary TORCH_HOME. Random weights test the pipeline (file reading, resize, pooling, the
formula), which is what parity is about; the released weights are only a different state dict.
"""

import numpy as np
import pytest
import torch
from fixtures_metrics import random_inception
from PIL import Image

from memcontrol.metrics import build_embedder, frechet_distance

pytorch_fid = pytest.importorskip("pytorch_fid", reason="pytorch-fid is in the dev extra")

FID_FILE = "pt_inception-2015-12-05-6726825d.pth"


def _write_pngs(folder, n, seed, shift):
    # Blobs with pixel-level detail, at a size that is not 299, so that the resize method matters.
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.uniform(0, 1, size=(6, 6, 3)) * (1 - shift) + shift * np.array([1.0, 0.6, 0.2])
        blobs = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((72, 72), Image.BICUBIC))
        detail = rng.integers(-40, 41, size=blobs.shape)
        Image.fromarray(np.clip(blobs + detail, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


def _read_pngs(folder):
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    net = random_inception(num_classes=1008, aux_logits=False)
    path = home / "hub" / "checkpoints" / FID_FILE
    torch.save(net.state_dict(), path)
    return home, path


def test_fid_matches_pytorch_fid_on_the_same_png_files(tmp_path, weights, monkeypatch):
    from pytorch_fid.fid_score import calculate_fid_given_paths

    home, path = weights
    monkeypatch.setenv("TORCH_HOME", str(home))
    real, fake = tmp_path / "real", tmp_path / "fake"
    # Few images: each Inception-v3 pass costs about a second of CPU here. The covariances are singular (rank 5 in
    # 2048 dimensions), which both implementations must handle; the figure is still exactly defined.
    _write_pngs(real, 6, seed=1, shift=0.0)
    _write_pngs(fake, 6, seed=2, shift=0.3)
    theirs = calculate_fid_given_paths([str(real), str(fake)], batch_size=6, device="cpu", dims=2048,
                                       num_workers=0)
    embedder = build_embedder({"type": "inception", "weights": str(path)})
    assert embedder.name == "inception"
    ours = frechet_distance(embedder.embed(_read_pngs(real)), embedder.embed(_read_pngs(fake)))
    # Same network, resize and formula, float32 features and float64 statistics; what differs is the matrix square
    # root (scipy's sqrtm of the singular product of two rank-5 covariances in 2048 dimensions, against memcontrol's
    # symmetric eigen-decomposition) and float32 summation order: 1e-4 relative.
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert theirs > 0


def test_features_match_pytorch_fid_activations(tmp_path, weights, monkeypatch):
    from pytorch_fid.fid_score import get_activations
    from pytorch_fid.inception import InceptionV3

    home, path = weights
    monkeypatch.setenv("TORCH_HOME", str(home))
    folder = tmp_path / "imgs"
    _write_pngs(folder, 2, seed=3, shift=0.1)
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    theirs = get_activations(sorted(str(p) for p in folder.glob("*.png")), model, batch_size=2, num_workers=0)
    ours = build_embedder({"type": "inception", "weights": str(path)}).embed(_read_pngs(folder))
    # float32 convolutions on the same inputs: the only differences are the order of summation and the float32
    # rounding of x / 255 against x / 127.5 - 1 before the resize: 1e-4 of the largest feature.
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-4 * scale)
    # With the old antialiased bicubic resize the features differ far beyond that tolerance: the test can fail.
    from memcontrol.metrics.embedders import resize_normalise

    emb = build_embedder({"type": "inception", "weights": str(path)})
    with torch.no_grad():
        bicubic = emb.module(resize_normalise(_read_pngs(folder), 299, emb.mean, emb.std, "bicubic"))
    assert np.abs(bicubic.numpy() - theirs).max() > 1e-2 * scale
