"""Shared test fixtures of the metrics area (registered in conftest.py).

`memorized_world` is the known truth the memorization metrics are judged against: a tiny Stable Diffusion pipeline
(SD 1.5's block layout, 32 px) deliberately over-trained until it reproduces a handful of training images from their
captions, saved as a diffusers folder, with PNG manifests of the training images and of held-out images.

How the world is made, and why this way on a CPU budget of about a minute:
* Training images are distinct synthetic pictures (coloured ellipses on a coloured background). The data area's
  phantoms are all chest radiographs and too alike at 32 px for a one-minute over-training to separate them.
* The VAE decoder is first fitted to the training images (a pretrained VAE would reconstruct them), then the UNet
  is over-trained on their latents, each caption always with its own image.
* The UNet predicts the clean sample (prediction_type "sample", a parameterisation diffusers' schedulers support):
  with it a few hundred steps give near-exact reproduction, where noise prediction needs thousands. The metrics
  only see the pipeline (and the noise norm converts any prediction type to noise).
* A "public" set of other images is trained alongside with captions drawn at random from the same vocabulary and
  paired at random: captions outside the memorized set carry no information about the image, as in a large
  pretraining set. Without it a model trained on six images maps every prompt to one of them, and nothing (not the
  noise norm, not a human) could tell a memorized prompt from an unseen one.

`build_memorized_world` is importable (bench/detect_cost.py uses it, also with `images="phantoms"`) and deterministic
for a given seed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

RESOLUTION = 32
WORDS = ("amber birch cedar delta ember frost grove haven ivory jade kelp lumen maple north opal pine quartz river "
         "sable tide umber vale willow yarrow zinc ash brook cliff dune fern glade heath isle juniper knoll "
         "larch").split()


@dataclass(frozen=True)
class MemorizedWorld:
    pipe_dir: Path
    train_manifest: Path
    heldout_manifest: Path
    train_images: torch.Tensor  # N x 3 x 32 x 32 in [-1, 1], as written to the PNG files
    train_captions: list
    train_keys: list
    heldout_images: torch.Tensor
    heldout_captions: list
    heldout_keys: list
    unseen_prompts: list  # never trained on, heldout_captions included


def synthetic_images(seeds, size: int = RESOLUTION) -> torch.Tensor:
    """One picture per seed: a coloured background with three coloured ellipses, in [-1, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        img = np.empty((3, size, size), np.float32)
        img[:] = rng.uniform(-1, 1, 3)[:, None, None]
        for _ in range(3):
            cy, cx = rng.uniform(0.2, 0.8, 2)
            ry, rx = rng.uniform(0.12, 0.35, 2)
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            img[:, inside] = rng.uniform(-1, 1, 3)[:, None]
        out.append(torch.from_numpy(img))
    return torch.stack(out)


def phantom_images(seeds, size: int = RESOLUTION) -> torch.Tensor:
    """Chest-radiograph phantoms of the data area (one patient per seed), grey in three channels, in [-1, 1]."""
    from memcontrol.data import render_phantoms

    pixels, _ = render_phantoms([int(s) for s in seeds], size=size)
    return torch.from_numpy(pixels * 2 - 1).float()[:, None].repeat(1, 3, 1, 1)


IMAGE_KINDS = {"shapes": synthetic_images, "phantoms": phantom_images}


def distinct_captions(count: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    captions: list = []
    while len(captions) < count:
        caption = " ".join(rng.choice(WORDS, 3, replace=False))
        if caption not in captions:
            captions.append(caption)
    return captions


def quantised(images: torch.Tensor) -> torch.Tensor:
    """The images as 8-bit PNG files store them."""
    return ((images + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1


def write_manifest(folder: Path, images: torch.Tensor, captions: list, keys: list) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "text", "subject"])
        for img, caption, key in zip(images, captions, keys):
            pixels = ((img.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{key}.png")
            writer.writerow([f"{key}.png", caption, key])
    return folder / "manifest.csv"


def fit_decoder(vae, images: torch.Tensor, steps: int, lr: float = 1e-3) -> None:
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
    opt = torch.optim.Adam(vae.decoder.parameters(), lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(vae.decode(latents).sample, images)
        opt.zero_grad()
        loss.backward()
        opt.step()


def overtrain_unet(pipe, latents, embeds, public_latents, public_embeds, steps: int, lr: float, seed: int,
                   memorized_per_batch: int = 6, public_per_batch: int = 2, caption_dropout: float = 0.1) -> None:
    """Clean-sample regression at uniform random timesteps; learning rate constant, then linearly to 0 over the
    last 30% of the steps (the decay is what turns a close match into a near-exact one)."""
    gen = torch.Generator().manual_seed(seed)
    alphas = pipe.scheduler.alphas_cumprod
    with torch.no_grad():
        empty = pipe.encode_prompt([""], "cpu", 1, False)[0]
    unet = pipe.unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (steps - k) / (0.3 * steps)))
    batch = memorized_per_batch + public_per_batch
    for _ in range(steps):
        idx = torch.randint(0, len(latents), (memorized_per_batch,), generator=gen)
        pub_img = torch.randint(0, len(public_latents), (public_per_batch,), generator=gen)
        pub_txt = torch.randint(0, len(public_embeds), (public_per_batch,), generator=gen)
        x0 = torch.cat([latents[idx], public_latents[pub_img]])
        text = torch.cat([embeds[idx], public_embeds[pub_txt]])
        text[torch.rand(batch, generator=gen) < caption_dropout] = empty[0]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas), (batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(pred, x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    unet.eval()


def build_memorized_world(root: Path, seed: int = 0, n_train: int = 6, n_heldout: int = 6, n_unseen: int = 18,
                          n_public: int = 48, unet_steps: int = 400, decoder_steps: int = 120,
                          lr: float = 3e-3, images: str = "shapes") -> MemorizedWorld:
    from diffusers import DDIMScheduler

    from memcontrol.models import save_pipeline, tiny_pipeline

    torch.manual_seed(seed)
    pipe = tiny_pipeline(seed=seed, words=WORDS, tokenizer_dir=root / "tokenizer", resolution=RESOLUTION)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    captions = distinct_captions(n_train + n_unseen + n_public, seed)
    train_captions = captions[:n_train]
    unseen = captions[n_train:n_train + n_unseen]
    public_captions = captions[n_train + n_unseen:]
    draw = IMAGE_KINDS[images]
    train_images = draw([seed * 10_000 + i for i in range(n_train)])
    heldout_images = draw([seed * 10_000 + 1000 + i for i in range(n_heldout)])
    public_images = draw([seed * 10_000 + 5000 + i for i in range(n_public)])
    fit_decoder(pipe.vae, train_images, decoder_steps)
    with torch.no_grad():
        latents = pipe.vae.encode(train_images).latent_dist.mean
        public_latents = pipe.vae.encode(public_images).latent_dist.mean
        embeds = pipe.encode_prompt(train_captions, "cpu", 1, False)[0]
        public_embeds = pipe.encode_prompt(public_captions, "cpu", 1, False)[0]
    overtrain_unet(pipe, latents, embeds, public_latents, public_embeds, unet_steps, lr=lr, seed=seed)
    pipe_dir = save_pipeline(pipe, root / "pipe")
    train_keys = [f"train-{i:02d}" for i in range(n_train)]
    heldout_keys = [f"held-{i:02d}" for i in range(n_heldout)]
    heldout_captions = unseen[:n_heldout]
    train_manifest = write_manifest(root / "train", train_images, train_captions, train_keys)
    heldout_manifest = write_manifest(root / "heldout", heldout_images, heldout_captions, heldout_keys)
    return MemorizedWorld(pipe_dir, train_manifest, heldout_manifest, quantised(train_images), train_captions,
                          train_keys, quantised(heldout_images), heldout_captions, heldout_keys, unseen)


@pytest.fixture(scope="session")
def memorized_world(tmp_path_factory) -> MemorizedWorld:
    return build_memorized_world(tmp_path_factory.mktemp("memorized-world"))


@pytest.fixture(scope="session")
def memorized_pipe(memorized_world):
    """The over-trained pipeline, loaded once (tests must not modify it)."""
    from memcontrol.models import load_pipeline

    return load_pipeline(memorized_world.pipe_dir)


def random_inception(num_classes: int, aux_logits: bool, seed: int = 0):
    """An Inception-v3 of torchvision's module tree with random He-initialised convolutions: activations stay of
    order 1 through its ~100 layers, where PyTorch's default initialisation shrinks them to ~1e-7 by the pool (and
    every comparison of features would pass trivially)."""
    from torchvision.models import inception_v3

    torch.manual_seed(seed)
    net = inception_v3(weights=None, aux_logits=aux_logits, init_weights=False, num_classes=num_classes)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    return net
