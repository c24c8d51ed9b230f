import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fixtures_masks import CAPTIONS, phantom_like_images

from memcontrol.cli import main
from memcontrol.config import read_config
from memcontrol.export import load_adapter
from memcontrol.masks import Mask, load_mask
from memcontrol.models import load_pipeline

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def png_manifest(tmp_path_factory) -> Path:
    """Four PNG images with a manifest.csv (file,text,subject), as a hospital export would list them."""
    from PIL import Image

    root = tmp_path_factory.mktemp("pngs")
    rows = ["file,text,subject"]
    for i, image in enumerate(phantom_like_images(4, seed=2)):
        gray = ((image[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(gray, mode="L").save(root / f"img{i}.png")
        rows.append(f"img{i}.png,{CAPTIONS[i]},p{i:02d}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def _config(tmp_path, pipe_dir, manifest, mask=None) -> Path:
    cfg = {"model": {"path": str(pipe_dir), "device": "cpu"},
           "data": {"train": str(manifest), "resolution": 64},
           "train": {"steps": 2, "batch_size": 2, "lr": 1e-2}}
    if mask is not None:
        cfg["mask"] = mask
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_finetune_exports_and_refuses_to_overwrite(tmp_path, tiny_pipe_dir, png_manifest, capsys):
    mask = {"family": "lora", "params": {"rank": 2}, "sites": ["mid_block.attentions.0", "up_blocks.1.attentions.0"]}
    cfg = _config(tmp_path, tiny_pipe_dir, png_manifest, mask)
    out = tmp_path / "out"
    assert main(["finetune", "--config", str(cfg), "--out", str(out)]) == 0
    assert "adapter written" in capsys.readouterr().out
    for name in ("pytorch_lora_weights.safetensors", "mask.json", "metrics.json", "README.md"):
        assert (out / name).is_file(), name
    assert list((out / "cache").glob("*.safetensors"))
    record = json.loads((out / "metrics.json").read_text())
    assert record["data_size"] == 4 and record["result"]["steps"] == 2
    assert Mask.from_json(out / "mask.json").sites == mask["sites"]
    card = (out / "README.md").read_text()
    assert all(f"p{i:02d}" not in card for i in range(4)) and CAPTIONS[1] not in card
    pipe = load_adapter(load_pipeline(tiny_pipe_dir), out)
    assert any(hasattr(m, "lora_A") for m in pipe.unet.modules())

    before = (out / "pytorch_lora_weights.safetensors").read_bytes()
    assert main(["finetune", "--config", str(cfg), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already holds a finished fine-tune" in err and len(err.strip().splitlines()) == 1
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == before


def test_mask_option_overrides_and_partial_masks(tmp_path, tiny_pipe_dir, png_manifest, capsys):
    cfg = _config(tmp_path, tiny_pipe_dir, png_manifest)
    mask_file = Mask(["mid_block.attentions.0", "down_blocks.7.resnets.0"], "bitfit_norm").to_json(
        tmp_path / "m.json")
    assert main(["finetune", "--config", str(cfg), "--mask", str(mask_file), "--out", str(tmp_path / "a")]) == 1
    assert "down_blocks.7.resnets.0" in capsys.readouterr().err
    assert main(["finetune", "--config", str(cfg), "--mask", str(mask_file), "--allow-partial",
                 "--out", str(tmp_path / "b")]) == 0
    assert "skipped 1 site(s)" in capsys.readouterr().out
    assert (tmp_path / "b" / "adapter.safetensors").is_file()
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["adapter"]["unmatched_sites"] == [
        "down_blocks.7.resnets.0"]


def test_missing_mask_and_bad_options_are_one_line_errors(tmp_path, tiny_pipe_dir, png_manifest, capsys):
    cfg = _config(tmp_path, tiny_pipe_dir, png_manifest)
    assert main(["finetune", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 1
    assert "no mask" in capsys.readouterr().err
    bad = _config(tmp_path, tiny_pipe_dir, png_manifest, {"family": "lora", "sites": ["conv_in"]})
    data = yaml.safe_load(bad.read_text())
    data["train"]["learning_rate"] = 1e-3
    bad.write_text(yaml.safe_dump(data))
    assert main(["finetune", "--config", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "learning_rate" in err and len(err.strip().splitlines()) == 1


def test_example_config_is_valid():
    job = read_config(REPO / "configs" / "finetune_example.yaml")
    mask = load_mask(job.mask)
    assert mask.family == "lora" and len(mask.sites) == 6
    assert np.isclose(mask.params["alpha"], 4.0)
    assert job.data.resolution == 64 and job.train.steps == 200


def test_a_run_folder_is_not_taken_by_another_job(tmp_path):
    from memcontrol.errors import ConfigError
    from memcontrol.runs import claim_out_dir

    claim_out_dir(tmp_path / "ft", "finetune")
    for job, said in (("audit", "not an audit run"), ("search", "not a search run")):
        with pytest.raises(ConfigError, match=f"holds a memcontrol finetune run, {said}; choose another folder"):
            claim_out_dir(tmp_path / "ft", job)
    assert claim_out_dir(tmp_path / "ft", "finetune") == tmp_path / "ft"  # the same job takes it again
