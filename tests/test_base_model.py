"""The shipped base model (data/base_model): checksums, loading like any diffusers folder, finite samples."""

import hashlib
from pathlib import Path

import torch

from conftest import REPO
from fixtures_scripts import load_script
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


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pretrain_pipeline_runs_on_cpu_and_continues_from_its_own_output(tmp_path):
    """The pipeline that made the shipped base, scaled down: a fresh pretraining, then ``--init`` on its output."""
    import json
    import tempfile

    main = load_script("pipelines/pretrain_base.py").main

    first, second = tmp_path / "first", tmp_path / "second"
    leftovers = set(Path(tempfile.gettempdir()).glob("memcontrol-tok-*"))
    assert main(["--out", str(first), "--patients", "4", "--vae-steps", "2", "--unet-steps", "2",
                 "--batch-size", "4"]) == 0
    # The fresh model's tokenizer passed through a temporary folder: nothing of it is left behind.
    assert set(Path(tempfile.gettempdir()).glob("memcontrol-tok-*")) == leftovers
    assert main(["--init", str(first), "--out", str(second), "--patients", "4", "--unet-steps", "3",
                 "--batch-size", "4", "--seed", "1"]) == 0
    vae = "vae/diffusion_pytorch_model.safetensors"
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert _sha(second / vae) == _sha(first / vae)  # the latent space is kept
    assert _sha(second / unet) != _sha(first / unet)
    provenance = json.loads((second / "provenance.json").read_text())
    assert provenance["unet_steps"] == 3 and provenance["vae_steps"] == 0
    assert provenance["continues"]["unet_steps"] == 2
    for line in (second / "CHECKSUMS.sha256").read_text().split("\n"):
        if line.strip():
            digest, name = line.split("  ", 1)
            assert _sha(second / name) == digest, name
    assert torch.isfinite(load_pipeline(second)(["axial brain mri. no lesion."], num_inference_steps=2,
                                                output_type="pt").images).all()
