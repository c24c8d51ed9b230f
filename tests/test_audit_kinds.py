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


@pytest.fixture(scope="module")
def tuned(tiny_pipe_dir, prompts, tmp_path_factory):
    """A fully fine-tuned model (cross-attention weights moved), saved by diffusers' save_pretrained, and its audit."""
    from memcontrol.models import load_pipeline

    root = tmp_path_factory.mktemp("kinds-tuned")
    pipe = load_pipeline(tiny_pipe_dir)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "attn2" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    pipe.save_pretrained(str(root / "tuned"), safe_serialization=True)
    return pipe, _audit(root / "tuned", root / "out", prompts=prompts)


def test_a_fully_fine_tuned_diffusers_folder_is_a_model(tuned, base_norms):
    assert tuned[1] != pytest.approx(base_norms, rel=1e-3)


def _original_layout(pipe) -> dict:
    """The pipeline's weights under the original Stable Diffusion (LDM) names that single-file checkpoints use:
    ``model.diffusion_model.`` (UNet in input/middle/output blocks), ``first_stage_model.`` (VAE),
    ``cond_stage_model.transformer.`` (CLIP)."""
    import re

    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as TABLE

    lpb = pipe.unet.config.layers_per_block
    up_attn = ["CrossAttn" in t for t in pipe.unet.config.up_block_types]
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
              ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]

    def unet_key(k):
        if k in TABLE["unet"]["layers"]:
            return TABLE["unet"]["layers"][k]
        if k.startswith("mid_block."):
            part, j, rest = re.match(r"mid_block\.(\w+)\.(\d+)\.(.*)", k).groups()
            if part == "attentions":
                return f"middle_block.1.{rest}"
            head = f"middle_block.{2 * int(j)}"
        else:
            side, b, part, j, rest = re.match(r"(down|up)_blocks\.(\d+)\.(\w+)\.(\d+)\.(.*)", k).groups()
            b, j = int(b), int(j)
            if part == "downsamplers":
                return f"input_blocks.{(b + 1) * (lpb + 1)}.0.op.{rest.removeprefix('conv.')}"
            if part == "upsamplers":
                return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if up_attn[b] else 1}.{rest}"
            block = f"input_blocks.{1 + b * (lpb + 1) + j}" if side == "down" else f"output_blocks.{b * (lpb + 1) + j}"
            if part == "attentions":
                return f"{block}.1.{rest}"
            head = f"{block}.0"
        for new, old in resnet:
            rest = rest.replace(new + ".", old + ".")
        return f"{head}.{rest}"

    n_up = len(pipe.vae.config.up_block_types)

    def vae_item(k, v):
        if k in TABLE["vae"]:
            return TABLE["vae"][k], v
        k = k.replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)",
                   lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                             ("to_out.0", "proj_out")):
                k = k.replace(f".{new}.", f".{old}.")
            v = v[:, :, None, None] if v.ndim == 2 else v  # 1x1 convolutions there
        return k, v

    out = {"model.diffusion_model." + unet_key(k): v for k, v in pipe.unet.state_dict().items()}
    out.update({"first_stage_model." + k: v for k, v in (vae_item(*kv) for kv in pipe.vae.state_dict().items())})
    # The original checkpoints nest CLIP's text tower under "text_model." (transformers >= 5.6 no longer does).
    out.update({"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
                for k, v in pipe.text_encoder.state_dict().items()})
    return {k: v.contiguous() for k, v in out.items()}


def test_a_single_file_checkpoint_with_its_config_folder(tuned, tiny_pipe_dir, prompts, tmp_path, capsys):
    from safetensors.torch import save_file

    pipe, tuned_norms = tuned
    save_file(_original_layout(pipe), str(tmp_path / "model.safetensors"))
    norms = _audit(tmp_path / "model.safetensors", tmp_path / "out", prompts=prompts, model_config=tiny_pipe_dir)
    # The fine-tuned weights, not the config folder's: the same output as the fine-tuned diffusers folder.
    assert norms == pytest.approx(tuned_norms, rel=1e-5)
    assert main(["audit", "--model", str(tmp_path / "model.safetensors"), "--prompts", str(prompts),
                 "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err.strip()
    assert "model.safetensors" in err and "--model-config" in err and len(err.splitlines()) == 1


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
    with pytest.raises(MaskError, match=r"other.safetensors: .*(no layer of this model matched|not found in the base)"):
        load_any_adapter(copy.deepcopy(tiny_pipe), tmp_path / "other.safetensors")


def test_a_lora_with_text_encoder_layers_loads_or_says_why(tiny_pipe, tmp_path):
    """diffusers loads text-encoder LoRA layers through transformers, which may refuse the installed peft: then the
    audit must stop with that reason (one line), not with a traceback or with the layers silently left out."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from memcontrol.audit.loading import load_any_adapter
    from memcontrol.errors import MaskError

    text = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=TEXT_TARGETS),
                                   copy.deepcopy(tiny_pipe.text_encoder))
    _randomize(text, 7)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "te"),
                                              text_encoder_lora_layers=get_peft_model_state_dict(text))
    pipe = copy.deepcopy(tiny_pipe)
    ids = pipe.tokenizer(["a lung"], padding="max_length", max_length=8, return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        try:
            assert load_any_adapter(pipe, tmp_path / "te") == "lora"
        except MaskError as err:
            assert "text-encoder layers" in str(err) and "peft" in str(err) and "\n" not in str(err)
            return
        assert not torch.allclose(before, pipe.text_encoder(ids)[0], atol=1e-4)


class _RunsCode:
    """What a malicious pickle holds: unpickling it would call os.mkdir."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        import os

        return os.mkdir, (self.target,)


def test_a_pickled_single_file_that_would_run_code_is_refused(tiny_pipe_dir, tmp_path):
    import pickle

    from memcontrol.errors import UnsafeCheckpointError
    from memcontrol.models import load_pipeline

    (tmp_path / "model.ckpt").write_bytes(pickle.dumps({"state_dict": _RunsCode(tmp_path / "pwned")}))
    with pytest.raises(UnsafeCheckpointError, match="model.ckpt: refused to load"):
        load_pipeline(tmp_path / "model.ckpt", config=tiny_pipe_dir)
    assert not (tmp_path / "pwned").exists()
