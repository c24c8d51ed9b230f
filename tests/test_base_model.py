"""The shipped base model (data/base_model): checksums, loading like any diffusers folder, finite samples."""

import hashlib

import torch

from conftest import REPO
from memcontrol.models import load_pipeline

BASE = REPO / "data" / "base_model"


def test_shipped_base_matches_its_checksums():
    lines = (BASE / "CHECKSUMS.sha256").read_text().split("\n")
    entries = [line.split("  ", 1) for line in lines if line.strip()]
    assert {name for _, name in entries} >= {"unet/diffusion_pytorch_model.safetensors",
                                              "vae/diffusion_pytorch_model.safetensors",
                                              "text_encoder/model.safetensors", "model_index.json"}
    for digest, name in entries:
        assert hashlib.sha256((BASE / name).read_bytes()).hexdigest() == digest, name


def test_shipped_base_loads_and_samples_finite_images():
    pipe = load_pipeline(BASE)
    out = pipe(["pa chest radiograph. small nodule in the left upper zone.", "axial brain mri. no lesion."],
               num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 3, 64, 64)
    assert torch.isfinite(out.images).all()
    # A trained model draws structure, not a flat field.
    assert out.images.std() > 0.05
