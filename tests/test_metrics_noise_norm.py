"""Noise norm and seeded generation on the real tiny pipeline: the score is the definition, computed by hand here;
the UNet-only form, peft-wrapped UNets and other prediction types give the same numbers."""

import copy

import pytest
import torch

from memcontrol.errors import ConfigError
from memcontrol.metrics import noise_norm
from memcontrol.sampling import generate_samples, noise_seed, sample_noise

PROMPTS = ["pa chest radiograph", "small nodule left upper zone", "large effusion"]


def _embeds(pipe, prompts):
    with torch.no_grad():
        return pipe.encode_prompt(prompts, "cpu", 1, False)[0], pipe.encode_prompt([""], "cpu", 1, False)[0]


def _by_hand(pipe, prompts, steps, seed=0, guidance=7.5, n_inference=50):
    """The definition, written out: the guided DDIM trajectory from the seeded start, mean of the norms."""
    cond, empty = _embeds(pipe, prompts)
    out = []
    for i in range(len(prompts)):
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_timesteps(n_inference)
        x = sample_noise(pipe, seed, 64, 64)[None] * sched.init_noise_sigma
        norms = []
        with torch.no_grad():
            for t in sched.timesteps[:steps]:
                e_c = pipe.unet(x, t, encoder_hidden_states=cond[i:i + 1]).sample
                e_u = pipe.unet(x, t, encoder_hidden_states=empty).sample
                norms.append((e_c - e_u).flatten().norm())
                x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
        out.append(torch.stack(norms).mean())
    return torch.stack(out)


@pytest.mark.parametrize("steps", [1, 3])
def test_noise_norm_is_the_definition(tiny_pipe, steps):
    got = noise_norm(tiny_pipe, PROMPTS, steps=steps, batch_size=2)
    expected = _by_hand(tiny_pipe, PROMPTS, steps)
    assert got.shape == (3,) and torch.all(got > 0)
    assert torch.allclose(got, expected, rtol=1e-4)


def test_noise_norm_per_prompt_value_does_not_depend_on_the_batch(tiny_pipe):
    alone = noise_norm(tiny_pipe, PROMPTS[1:2])
    together = noise_norm(tiny_pipe, PROMPTS, batch_size=3)
    assert torch.allclose(alone[0], together[1], rtol=1e-5)
    other_seed = noise_norm(tiny_pipe, PROMPTS[1:2], seed=5)
    assert not torch.allclose(alone, other_seed)


def test_unet_form_and_peft_wrapped_unets(tiny_pipe):
    from peft import LoraConfig, get_peft_model

    cond, empty = _embeds(tiny_pipe, PROMPTS)
    reference = noise_norm(tiny_pipe, PROMPTS, steps=2)
    bare = noise_norm(tiny_pipe.unet, cond, steps=2, uncond_embeds=empty, scheduler=tiny_pipe.scheduler)
    assert torch.allclose(bare, reference, rtol=1e-5)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"])
    # LoRA starts as the identity (B = 0): the wrapped model must give the base model's numbers.
    wrapped = get_peft_model(copy.deepcopy(tiny_pipe.unet), lora)
    assert torch.allclose(noise_norm(wrapped, cond, steps=2, uncond_embeds=empty, scheduler=tiny_pipe.scheduler),
                          reference, rtol=1e-4)
    injected = copy.deepcopy(tiny_pipe.unet)
    injected.add_adapter(lora)
    with torch.no_grad():
        for name, p in injected.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    changed = noise_norm(injected, cond, steps=2, uncond_embeds=empty, scheduler=tiny_pipe.scheduler)
    assert not torch.allclose(changed, reference, rtol=1e-3)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_other_prediction_types_are_converted_to_noise(tiny_pipe, prediction_type):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config, prediction_type=prediction_type)
    cond, empty = _embeds(tiny_pipe, PROMPTS[:1])
    got = noise_norm(tiny_pipe.unet, cond, steps=1, uncond_embeds=empty, scheduler=scheduler)
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[0]
    x = sample_noise(tiny_pipe, 0, 64, 64)[None]
    a = scheduler.alphas_cumprod[t]
    with torch.no_grad():
        o_c = tiny_pipe.unet(x, t, encoder_hidden_states=cond).sample
        o_u = tiny_pipe.unet(x, t, encoder_hidden_states=empty).sample
    # eps = (x - sqrt(a) x0) / sqrt(1 - a) for a clean-sample output; eps = sqrt(a) v + sqrt(1 - a) x for velocity.
    factor = -a.sqrt() / (1 - a).sqrt() if prediction_type == "sample" else a.sqrt()
    assert torch.allclose(got, (factor * (o_c - o_u)).flatten().norm()[None], rtol=1e-4)


def test_noise_norm_errors(tiny_pipe):
    with pytest.raises(ConfigError, match="steps"):
        noise_norm(tiny_pipe, PROMPTS, steps=0)
    with pytest.raises(ConfigError, match="bare UNet"):
        noise_norm(tiny_pipe.unet, PROMPTS)


def test_generate_samples_is_seeded_per_sample(tiny_pipe):
    both = generate_samples(tiny_pipe, PROMPTS[:2], n_per_prompt=2, steps=3, seed=4, batch_size=3)
    assert both.shape == (4, 3, 64, 64) and both.min() >= -1 and both.max() <= 1
    # Prompt 1's second sample, generated alone and in another batch layout, is the same image.
    alone = generate_samples(tiny_pipe, PROMPTS[1:2], n_per_prompt=2, steps=3, seed=4, batch_size=1)
    assert torch.allclose(alone[1], both[3], atol=1e-5)
    assert not torch.allclose(both[2], both[3], atol=1e-3)  # different seeds, different images
    again = generate_samples(tiny_pipe, PROMPTS[:1], n_per_prompt=1, steps=3, seed=4)
    assert torch.allclose(again[0], both[0], atol=1e-5)
    # Sample j of a prompt is sample 0 of the seed shifted by j (how samples.csv's seed column reproduces it).
    shifted = generate_samples(tiny_pipe, PROMPTS[1:2], n_per_prompt=1, steps=3, seed=5)
    assert torch.allclose(shifted[0], both[3], atol=1e-5)


def test_generate_samples_gives_each_prompt_its_own_noise(tiny_pipe):
    """FD and KID assume independent samples: the same seed must not give every prompt the same start."""
    assert noise_seed(PROMPTS[0], 4, 1) == noise_seed(PROMPTS[0], 5, 0)
    starts = torch.stack([sample_noise(tiny_pipe, noise_seed(p, 4, 0), 64, 64) for p in PROMPTS])
    corr = torch.corrcoef(starts.flatten(1)).fill_diagonal_(0)
    assert corr.abs().max() < 0.2  # independent N(0, I) draws, not one start shared by all prompts
    # generate_samples starts prompt 1 from exactly that noise.
    got = generate_samples(tiny_pipe, PROMPTS[:2], n_per_prompt=1, steps=3, seed=4)
    by_hand = tiny_pipe(PROMPTS[1:2], latents=starts[1:2], num_inference_steps=3, output_type="pt").images
    assert torch.allclose(got[1], (by_hand[0] * 2 - 1).clamp(-1, 1), atol=1e-5)


def test_generate_samples_few_step_samplers_keep_the_pipeline_scheduler(tiny_pipe):
    original = tiny_pipe.scheduler
    ddim = generate_samples(tiny_pipe, PROMPTS[:1], steps=4, sampler="ddim")
    dpm = generate_samples(tiny_pipe, PROMPTS[:1], steps=4, sampler="dpm")
    assert tiny_pipe.scheduler is original
    assert torch.isfinite(dpm).all() and not torch.allclose(ddim, dpm, atol=1e-4)
    with pytest.raises(ConfigError, match="unknown sampler"):
        generate_samples(tiny_pipe, PROMPTS[:1], steps=2, sampler="euler-magic")
