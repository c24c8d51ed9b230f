import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from memcontrol.errors import MaskError
from memcontrol.export import export_adapter, is_exported, load_adapter
from memcontrol.masks import Mask, adaptable_sites, enumerate_sites
from memcontrol.models import TINY_UNET_CONFIG, load_pipeline
from memcontrol.training import TrainConfig, finetune, pipeline_with_unet

CFG = TrainConfig(steps=2, batch_size=2, lr=5e-2, caption_dropout=0.0, seed=3)
PROMPTS = ["small nodule left upper zone", "pleural effusion right lower zone"]
# A reloaded adapter computes the same function in other objects, whose kernels may take other SIMD paths on other
# CPUs (about 1e-6 per UNet call); the adapters trained here move the images by 0.47 to 1.0 (pixels in [0, 1]), so
# a lost or mis-scaled weight shows far above this tolerance.
ROUND_TRIP_ATOL = 1e-4


def _sample(pipe) -> np.ndarray:
    return pipe(PROMPTS, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(7)).images


def _train_and_export(tiny_pipe, tiny_cached, family, params, out_dir):
    wanted = {"attn1", "attn2", "ff", "proj_out", "norms", "resnet"}
    sites = [s for s in adaptable_sites(tiny_pipe.unet, family, "role") if s.kind in wanted]
    mask = Mask(sites, family, params)
    result = finetune(tiny_pipe, mask, tiny_cached, CFG, progress=False)
    assert result.status == "ok"
    info = {"base_model": "/secret/site/models/tiny-sd", "data_size": len(tiny_cached), "train": CFG.to_dict(),
            "result": {"status": result.status, "steps": result.steps, "final_loss": result.final_loss}}
    metrics = {"copy_fraction": 0.25, "fd_vae": 12.5, "copied_keys": list(tiny_cached.keys[:2])}
    export_adapter(tiny_pipe, result.applied, mask, out_dir, metrics=metrics, info=info)
    return result, mask


# peft warns (RuntimeWarning) when a loaded state dict leaves configured layers without weights: make that fail.
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_lora_loads_in_plain_diffusers(tiny_pipe, tiny_pipe_dir, tiny_cached, tmp_path):
    # alpha != rank: the scale must survive the round trip, not only the weights.
    result, _ = _train_and_export(tiny_pipe, tiny_cached, "lora", {"rank": 4, "alpha": 8}, tmp_path)
    trained = _sample(pipeline_with_unet(tiny_pipe, result.applied.unet))

    from diffusers import StableDiffusionPipeline

    fresh = StableDiffusionPipeline.from_pretrained(str(tiny_pipe_dir), safety_checker=None,
                                                    requires_safety_checker=False)
    fresh.set_progress_bar_config(disable=True)
    base = _sample(fresh)
    fresh.load_lora_weights(str(tmp_path))
    reloaded = _sample(fresh)
    assert np.abs(reloaded - trained).max() < ROUND_TRIP_ATOL
    assert np.abs(base - trained).max() > 100 * ROUND_TRIP_ATOL  # the adapter did change the model
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("family, params", [("loha", {"rank": 2, "alpha": 4}), ("lokr", {"rank": 2}),
                                            ("oft", {"block_size": 4}), ("bitfit_norm", {}), ("unfreeze", {})])
def test_other_families_round_trip(tiny_pipe, tiny_pipe_dir, tiny_cached, tmp_path, family, params):
    result, _ = _train_and_export(tiny_pipe, tiny_cached, family, params, tmp_path)
    trained = _sample(pipeline_with_unet(tiny_pipe, result.applied.unet))
    fresh = load_pipeline(tiny_pipe_dir)
    base = _sample(fresh)
    load_adapter(fresh, tmp_path)
    assert np.abs(_sample(fresh) - trained).max() < ROUND_TRIP_ATOL
    assert np.abs(base - trained).max() > 100 * ROUND_TRIP_ATOL  # the adapter did change the model
    if family in ("bitfit_norm", "unfreeze"):
        from safetensors.torch import load_file

        saved = load_file(str(tmp_path / "adapter.safetensors"))
        assert sorted(saved) == sorted(result.applied.targets)
    else:
        assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()


def test_export_folder_contents_and_card(tiny_pipe, tiny_cached, tmp_path):
    result, mask = _train_and_export(tiny_pipe, tiny_cached, "bitfit_norm", {}, tmp_path)
    assert is_exported(tmp_path)
    saved_mask = Mask.from_json(tmp_path / "mask.json")
    assert saved_mask.sites == mask.sites and saved_mask.layout == result.applied.layout
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["metrics"]["copy_fraction"] == 0.25
    assert record["adapter"]["trainable"] == result.applied.trainable
    assert record["base_model"] == "tiny-sd" and record["data_size"] == 4
    card = (tmp_path / "README.md").read_text()
    assert "`tiny-sd`" in card and "/secret/site" not in card
    assert f"{result.applied.percent:.3f}%" in card and "| fd_vae | 12.5 |" in card and "4 image-caption" in card
    for key, caption in zip(tiny_cached.keys, tiny_cached.captions):
        assert key not in card and caption not in card


def test_adapter_for_another_model_size_is_refused(tiny_pipe, tiny_cached, tmp_path):
    _train_and_export(tiny_pipe, tiny_cached, "unfreeze", {}, tmp_path)
    from diffusers import UNet2DConditionModel

    # Same layout, other widths: the mask fits, the saved tensors do not.
    other = SimpleNamespace(unet=UNet2DConditionModel(**dict(TINY_UNET_CONFIG, block_out_channels=(16, 16, 32, 32))))
    before = copy.deepcopy(other.unet.state_dict())
    with pytest.raises(MaskError, match="shape"):
        load_adapter(other, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in other.unet.state_dict().items())


def test_folder_without_mask_is_a_clear_error(tiny_pipe, tmp_path):
    with pytest.raises(MaskError, match="mask.json.*not found"):
        load_adapter(tiny_pipe, tmp_path)


def test_mask_sites_listed_in_card(tiny_pipe, tiny_cached, tmp_path):
    sites = [s for s in enumerate_sites(tiny_pipe.unet, "block") if s.name == "mid_block.attentions.0"]
    mask = Mask(sites, "lora", {"rank": 2})
    result = finetune(tiny_pipe, mask, tiny_cached, CFG, progress=False)
    export_adapter(tiny_pipe, result.applied, mask, tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "`mid_block.attentions.0`" in card and "rank=2" in card and "pipe.load_lora_weights(folder)" in card
