"""`memcontrol audit` on what users hold, each written by the libraries that make it in the wild (peft, diffusers'
save_lora_weights, save_pretrained), never by memcontrol's exporter: a diffusers LoRA folder and single file, a
kohya-style .safetensors, a peft adapter folder, a fully fine-tuned diffusers folder, a single-file checkpoint.
Each is audited and must change the model's output (noise norm per prompt) against the base model's audit, so
that a loader silently doing nothing fails."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch

from memcontrol.cli import main

FAST = {"audit": {"device": "cpu", "max_prompts": 2,
                  "generation": {"n_per_prompt": 1, "steps": 1, "sampler": "ddim", "batch_size": 4},
                  "noise_norm": {"steps": 1}}}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _noise_norms(out) -> list[float]:
    with open(out / "prompts.csv", newline="") as fh:
        return [float(r["noise_norm"]) for r in csv.DictReader(fh)]


def _audit(model, out, **kwargs) -> list[float]:
    from memcontrol.api import audit

    result = audit(model, out=out, config=FAST, **kwargs)
    assert result.report.is_file() and result.metrics_file.is_file() and (out / "figures" / "noise_norm.png").is_file()
    assert json.loads(result.metrics_file.read_text())["summary"] == result.summary
    return _noise_norms(out)


def _randomize(module, seed: int, std: float = 0.3) -> None:
    """Give the adapter's second factor values (peft starts it at zero, so that a new adapter changes nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("kinds-prompts") / "prompts.txt"
    path.write_text("pa chest radiograph\nlarge effusion\n")
    return path


@pytest.fixture(scope="module")
def base_norms(tiny_pipe_dir, prompts, tmp_path_factory):
    return _audit(tiny_pipe_dir, tmp_path_factory.mktemp("kinds-base") / "out", prompts=prompts)


@pytest.fixture(scope="module")
def lora_layers(tiny_pipe):
    """LoRA layers on the UNet's attention, as peft makes them (rank = alpha: scale 1)."""
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(tiny_pipe.unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS))
    _randomize(unet, 1)
    return get_peft_model_state_dict(unet)


@pytest.fixture(scope="module")
def diffusers_lora(lora_layers, tiny_pipe_dir, prompts, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("kinds-lora") / "lora"
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=lora_layers, safe_serialization=True)
    out = folder.parent / "audit"
    assert main(["audit", "--model", str(tiny_pipe_dir), "--adapter", str(folder), "--prompts", str(prompts),
                 "--config", str(_config_file(folder.parent)), "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["inputs"]["adapter_kind"] == "lora"
    return _noise_norms(out)


def _config_file(folder):
    path = folder / "audit.yaml"
    path.write_text(json.dumps(FAST))  # JSON is YAML
    return path


def test_a_diffusers_lora_folder_is_audited_through_the_cli(diffusers_lora, base_norms):
    assert diffusers_lora != pytest.approx(base_norms, rel=1e-3)


def test_a_single_lora_file_with_its_own_name_is_the_same_lora(lora_layers, diffusers_lora, tiny_pipe_dir, prompts,
                                                               tmp_path):
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "dl"), unet_lora_layers=lora_layers,
                                              weight_name="style_v2.safetensors")
    norms = _audit(tiny_pipe_dir, tmp_path / "out", prompts=prompts, adapter=tmp_path / "dl" / "style_v2.safetensors")
    assert norms == pytest.approx(diffusers_lora, rel=1e-5)


def _kohya(layers: dict, prefix: str) -> dict:
    """kohya-ss names: lora_unet_<module path with '_'>.lora_down.weight / .lora_up.weight / .alpha."""
    out = {}
    for key, value in layers.items():
        module, _, part = key.rpartition(".lora_")
        name = prefix + module.replace(".", "_")
        out[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(value.shape[0] if part.startswith("A") else value.shape[1]))
    return out


def test_a_kohya_file_applies_every_layer(lora_layers, diffusers_lora, tiny_pipe_dir, prompts, tmp_path):
    from safetensors.torch import save_file

    state = _kohya(lora_layers, "lora_unet_")
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight" in state
    save_file(state, str(tmp_path / "kohya_style.safetensors"))
    norms = _audit(tiny_pipe_dir, tmp_path / "out", prompts=prompts, adapter=tmp_path / "kohya_style.safetensors")
    # The same weights as the diffusers LoRA: the same output shows that no layer was dropped in the conversion.
    assert norms == pytest.approx(diffusers_lora, rel=1e-4)


def test_a_peft_folder_for_unet_and_text_encoder(tiny_pipe, tiny_pipe_dir, prompts, base_norms, tmp_path):
    from peft import LoraConfig, get_peft_model

    folder = tmp_path / "peft"
    for part, targets, seed in (("unet", UNET_TARGETS, 3), ("text_encoder", TEXT_TARGETS, 4)):
        model = get_peft_model(copy.deepcopy(getattr(tiny_pipe, part)),
                               LoraConfig(r=2, lora_alpha=4, target_modules=targets))
        _randomize(model, seed)
        model.save_pretrained(str(folder / part))
    assert (folder / "unet" / "adapter_model.safetensors").is_file()
    norms = _audit(tiny_pipe_dir, tmp_path / "out", prompts=prompts, adapter=folder)
    assert norms != pytest.approx(base_norms, rel=1e-3)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["inputs"]["adapter_kind"] == "peft"


def test_a_flat_peft_folder_goes_to_the_component_its_keys_name(tiny_pipe, tiny_pipe_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from memcontrol.audit.loading import load_any_adapter
    from memcontrol.models import load_pipeline

    model = get_peft_model(copy.deepcopy(tiny_pipe.text_encoder), LoraConfig(r=2, target_modules=TEXT_TARGETS))
    _randomize(model, 5)
    model.save_pretrained(str(tmp_path / "te"))
    pipe = load_pipeline(tiny_pipe_dir)
    ids = pipe.tokenizer(["a lung"], padding="max_length", max_length=8, return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        assert load_any_adapter(pipe, tmp_path / "te") == "peft"
        after = pipe.text_encoder(ids)[0]
    assert not torch.allclose(before, after, atol=1e-4)
    assert not getattr(pipe.unet, "peft_config", None)


def test_a_fully_fine_tuned_diffusers_folder_is_a_model(tiny_pipe_dir, prompts, base_norms, tmp_path):
    from memcontrol.models import load_pipeline

    pipe = load_pipeline(tiny_pipe_dir)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "attn2" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    pipe.save_pretrained(str(tmp_path / "tuned"), safe_serialization=True)
    assert _audit(tmp_path / "tuned", tmp_path / "out", prompts=prompts) != pytest.approx(base_norms, rel=1e-3)


def test_what_is_no_adapter_is_refused_naming_the_path_and_the_kinds(tiny_pipe, tiny_pipe_dir, tmp_path):
    from safetensors.torch import save_file

    from memcontrol.audit.loading import adapter_kind, load_any_adapter
    from memcontrol.errors import DataError, MaskError, MissingWeightsError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*no mask.json.*--adapter takes .*kohya.*peft"):
        adapter_kind(tmp_path / "empty")
    with pytest.raises(DataError, match="whole diffusers pipeline.*--model"):
        adapter_kind(tiny_pipe_dir)
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(1)}, str(tmp_path / "full.safetensors"))
    with pytest.raises(DataError, match="single-file checkpoint.*--model"):
        adapter_kind(tmp_path / "full.safetensors")
    with pytest.raises(MissingWeightsError, match="--adapter"):
        adapter_kind(tmp_path / "nowhere")
    # LoRA keys for layers this model does not have: an error, not an audit of the bare base model.
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_no_such_layer.lora_up.weight": torch.zeros(8, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(MaskError, match="other.safetensors: .*(no layer of this model matched|not found in the base)"):
        load_any_adapter(copy.deepcopy(tiny_pipe), tmp_path / "other.safetensors")
