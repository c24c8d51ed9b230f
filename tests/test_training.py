import copy
import dataclasses

import pytest
import torch
from accelerate.utils import set_seed
from fixtures_masks import CAPTIONS, make_dataset

from memcontrol.errors import ConfigError, DataError
from memcontrol.masks import FAMILIES, Mask, adaptable_sites, apply_mask, enumerate_sites
from memcontrol.training import (CachedData, InMemoryDataset, TrainConfig, cache_training_data, encode_images,
                                 encode_prompts, finetune, pipeline_with_unet)
from memcontrol.training.loop import _target

QUICK = TrainConfig(steps=3, batch_size=2, lr=1e-2, caption_dropout=0.5, seed=1)


def _mask(unet, family):
    roles = {"attn1", "attn2", "ff", "proj_in", "norms"}
    sites = [s for s in enumerate_sites(unet, "role") if s.kind in roles and s.block in ("down_blocks.1", "mid_block")]
    sites += [s for s in enumerate_sites(unet, "block") if s.name in ("up_blocks.2.resnets.1", "conv_out")]
    usable = {s.name for s in adaptable_sites(unet, family, "role")}
    return Mask([s for s in sites if s.name in usable], family)


class _Counter:
    """Counts forward calls of a module through a forward hook."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def _base_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_masked_parameters_change(tiny_pipe, tiny_cached, family):
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    mask = _mask(tiny_pipe.unet, family)
    # The masked model as training starts: adapters are initialised from the run's seed.
    set_seed(QUICK.seed)
    start = apply_mask(copy.deepcopy(tiny_pipe.unet), mask).unet.state_dict()
    result = finetune(tiny_pipe, mask, tiny_cached, QUICK, progress=False)
    assert result.status == "ok" and result.steps == 3 and len(result.losses) == 3
    unet = result.applied.unet
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert sum(p.numel() for n, p in unet.named_parameters() if n in trainable) == result.applied.trainable
    after = unet.state_dict()
    assert set(after) == set(start)
    # Adapters wrap layers (peft renames a wrapped weight to ...base_layer.weight); no base tensor goes away.
    assert {_base_name(n) for n in after} >= set(before)
    changed = {n for n in after if not torch.equal(after[n], start[n])}
    assert changed == trainable
    assert all(torch.equal(after[n], before[_base_name(n)]) for n in after if n not in trainable
               and _base_name(n) in before)
    if family in ("bitfit_norm", "unfreeze"):
        assert set(after) == set(before)
    else:
        assert all(".memcontrol" in n for n in trainable)
    # The pipeline's own UNet is left as it was: trials can run one after another on one loaded pipeline.
    assert all(torch.equal(v, before[k]) for k, v in tiny_pipe.unet.state_dict().items())
    assert not any(hasattr(m, "base_layer") for m in tiny_pipe.unet.modules())


def test_second_cache_run_does_no_encoder_work(tiny_pipe, tmp_path):
    dataset = make_dataset(3, seed=5)
    vae_calls, text_calls = _Counter(tiny_pipe.vae.encoder), _Counter(tiny_pipe.text_encoder)
    try:
        first = cache_training_data(tiny_pipe, dataset, tmp_path, progress=False)
        assert vae_calls.calls > 0 and text_calls.calls > 0
        vae_calls.calls = text_calls.calls = 0
        second = cache_training_data(tiny_pipe, dataset, tmp_path, progress=False)
        assert (vae_calls.calls, text_calls.calls) == (0, 0)
        assert second.path == first.path and second.keys == first.keys == dataset.keys
        assert torch.equal(second.latents, first.latents) and torch.equal(second.text_embeds, first.text_embeds)
        assert torch.equal(second.empty_embed, first.empty_embed)
        # Another caption is another cache entry, encoded afresh.
        edited = InMemoryDataset(dataset.images, [CAPTIONS[5]] + dataset.captions[1:], dataset.keys)
        third = cache_training_data(tiny_pipe, edited, tmp_path, progress=False)
        assert third.path != first.path and vae_calls.calls > 0
    finally:
        vae_calls.handle.remove()
        text_calls.handle.remove()
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_cached_tensors_are_the_encoders_outputs(tiny_pipe, tiny_cached, mask_dataset):
    pixels = torch.stack([mask_dataset[i]["pixel_values"] for i in range(len(mask_dataset))])
    assert torch.allclose(tiny_cached.latents, encode_images(tiny_pipe, pixels), atol=1e-6)
    assert torch.allclose(tiny_cached.text_embeds, encode_prompts(tiny_pipe, mask_dataset.captions), atol=1e-6)
    assert torch.allclose(tiny_cached.empty_embed, encode_prompts(tiny_pipe, [""]), atol=1e-6)
    assert tiny_cached.captions == mask_dataset.captions


def test_bad_items_and_empty_sets_are_data_errors(tiny_pipe, tmp_path):
    with pytest.raises(DataError, match="empty"):
        cache_training_data(tiny_pipe, InMemoryDataset(torch.zeros(0, 3, 64, 64), [], []), tmp_path)
    with pytest.raises(DataError, match="pixel_values"):
        cache_training_data(tiny_pipe, [{"image": 1}], tmp_path)


def test_same_seed_same_run_and_checkpointing_changes_nothing(tiny_pipe, tiny_cached):
    mask = _mask(tiny_pipe.unet, "lora")
    a = finetune(tiny_pipe, mask, tiny_cached, QUICK, progress=False)
    b = finetune(tiny_pipe, mask, tiny_cached, QUICK.model_copy(update=dict(gradient_checkpointing=True)),
                 progress=False)
    assert a.losses == pytest.approx(b.losses, abs=1e-6)
    c = finetune(tiny_pipe, mask, tiny_cached, QUICK.model_copy(update=dict(seed=2)), progress=False)
    assert a.losses != c.losses


def test_non_finite_loss_fails_the_run_without_raising(tiny_pipe, tiny_cached):
    poisoned = dataclasses.replace(tiny_cached, latents=torch.full_like(tiny_cached.latents, float("nan")))
    result = finetune(tiny_pipe, _mask(tiny_pipe.unet, "unfreeze"), poisoned, QUICK, progress=False)
    assert result.status == "failed" and "loss is nan" in result.reason and result.steps == 0


def test_callback_sees_the_unet_and_can_stop_the_run(tiny_pipe, tiny_cached):
    seen = []

    def callback(step, unet):
        seen.append((step, unet.training, torch.is_grad_enabled()))
        return "noise norm too high" if step == 2 else None

    cfg = QUICK.model_copy(update=dict(steps=6))
    result = finetune(tiny_pipe, _mask(tiny_pipe.unet, "lora"), tiny_cached, cfg, callback=callback,
                      callback_every=1, progress=False)
    assert result.status == "stopped" and result.reason == "noise norm too high" and result.steps == 2
    assert seen == [(1, False, False), (2, False, False)]


def test_v_prediction_target_and_run(tiny_pipe, tiny_cached):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(tiny_pipe.scheduler.config, prediction_type="v_prediction")
    latents, noise, t = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(_target(sched, latents, noise, t), a * noise - s * latents, atol=1e-6)
    eps = DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    assert torch.equal(_target(eps, latents, noise, t), noise)
    vpipe = copy.copy(tiny_pipe)
    vpipe.scheduler = sched
    assert finetune(vpipe, _mask(tiny_pipe.unet, "lora"), tiny_cached, QUICK, progress=False).status == "ok"


def test_bf16_autocast_after_full_precision(tiny_pipe, tiny_cached):
    result = finetune(tiny_pipe, _mask(tiny_pipe.unet, "bitfit_norm"), tiny_cached,
                      QUICK.model_copy(update=dict(mixed_precision="bf16", schedule="cosine", warmup=1)),
                      progress=False)
    assert result.status == "ok" and all(torch.isfinite(torch.tensor(result.losses)))


def test_trained_unet_drives_a_pipeline(tiny_pipe, tiny_cached):
    result = finetune(tiny_pipe, _mask(tiny_pipe.unet, "lora"), tiny_cached, QUICK, progress=False)
    trained = pipeline_with_unet(tiny_pipe, result.applied.unet)
    assert trained.vae is tiny_pipe.vae and trained.unet is result.applied.unet
    images = trained(["pa chest radiograph"], num_inference_steps=2, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


@pytest.mark.parametrize("data, message", [
    ({"steps": 0}, "steps"), ({"lr": 0}, "lr"), ({"schedule": "linear"}, "schedule"),
    ({"mixed_precision": "fp8"}, "mixed_precision"), ({"caption_dropout": 1.0}, "caption_dropout"),
    ({"learning_rate": 1e-4}, "`train.learning_rate`: unknown"),
])
def test_bad_train_configs_are_config_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(data)


def test_cached_data_batches(tiny_cached):
    assert isinstance(tiny_cached, CachedData) and len(tiny_cached) == 4
    latents, embeds = tiny_cached.batch(torch.tensor([2, 0]))
    assert torch.equal(latents[0], tiny_cached.latents[2]) and torch.equal(embeds[1], tiny_cached.text_embeds[0])


def test_in_memory_cache_and_full_fine_tuning_on_a_chosen_device(tiny_pipe, mask_dataset):
    cached = cache_training_data(tiny_pipe, mask_dataset, None, progress=False, device="cpu")
    assert cached.path is None and cached.latents.shape == (4, 4, 16, 16)
    mask = Mask.full_unet(tiny_pipe.unet)
    result = finetune(tiny_pipe, mask, cached, QUICK.model_copy(update=dict(device="cpu")), progress=False)
    assert result.applied.trainable == result.applied.total
    assert result.merged_unet() is result.applied.unet and not result.applied.unet.conv_in.weight.requires_grad


def test_merged_unet_is_a_plain_unet_with_the_same_output(tiny_pipe, tiny_cached):
    result = finetune(tiny_pipe, _mask(tiny_pipe.unet, "lora"), tiny_cached, QUICK, progress=False)
    merged = result.merged_unet()
    assert not any(hasattr(m, "base_layer") for m in merged.modules())
    assert any(hasattr(m, "base_layer") for m in result.applied.unet.modules())
    assert set(merged.state_dict()) == set(tiny_pipe.unet.state_dict())
    gen = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 16, 16, generator=gen), tiny_cached.text_embeds[:2]
    with torch.no_grad():
        expected = result.applied.unet(x, 50, emb).sample
        assert torch.allclose(merged(x, 50, emb).sample, expected, atol=1e-5)
        assert not torch.allclose(tiny_pipe.unet(x, 50, emb).sample, expected, atol=1e-4)
