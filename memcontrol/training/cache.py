"""The training cache: VAE latents and text embeddings of a training set, computed once and kept on disk.

Neither the VAE nor the text encoder is trained, so what they make of the training set is the same for every trial
of a search. The cache file is named by a content hash of everything the tensors depend on (pixels, captions and
their token ids, the VAE and text-encoder weights, the scaling factor, the format version): the same data and
model find the file again, and any change makes a new one.

Latents are the mean of the VAE posterior times ``vae.config.scaling_factor``: deterministic, and in practice
almost equal to a sample, since the posterior of Stable Diffusion's VAE is very narrow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class CachedData:
    """Encoded training set: ``latents`` N x C x h x w (scaled), ``text_embeds`` N x L x D, ``empty_embed``
    1 x L x D (the empty prompt, for caption dropout), with the items' ``keys`` and ``captions``."""

    latents: torch.Tensor
    text_embeds: torch.Tensor
    empty_embed: torch.Tensor
    keys: list
    captions: list
    digest: str | None = None
    path: Path | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and text embeddings of the items at ``indices`` (on CPU; the loop moves them)."""
        return self.latents[indices], self.text_embeds[indices]


def subset_cached(cached: CachedData, indices: list[int]) -> CachedData:
    """Some items of a cached training set (no file behind it: ``path`` and ``digest`` are dropped)."""
    index = torch.as_tensor(list(indices), dtype=torch.long)
    return CachedData(cached.latents[index], cached.text_embeds[index], cached.empty_embed,
                      [cached.keys[i] for i in indices], [cached.captions[i] for i in indices])


class InMemoryDataset:
    """Training items from tensors already in memory: ``images`` N x C x H x W in [-1, 1], one caption each;
    keys default to ``item-000000``, ``item-000001``..."""

    def __init__(self, images: torch.Tensor, captions: list, keys: list | None = None):
        if len(captions) != len(images) or (keys is not None and len(keys) != len(images)):
            raise ValueError("images, captions and keys must have the same length")
        self.images = images
        self.captions = [str(c) for c in captions]
        self.keys = [str(k) for k in keys] if keys is not None else [f"item-{i:06d}" for i in range(len(images))]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "caption": self.captions[i], "key": self.keys[i]}


def _update_with_tensor(h, tensor: torch.Tensor) -> None:
    t = tensor.detach().contiguous().cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def module_digest(module: torch.nn.Module) -> str:
    """A hash of a module's weights (names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        _update_with_tensor(h, tensor)
    return h.hexdigest()


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _item(dataset, i: int) -> dict:
    item = dataset[i]
    pixels = item.get("pixel_values") if isinstance(item, dict) else None
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 3:
        raise DataError(f"item {i}", "a training item must be a dict with 'pixel_values' (C x H x W tensor), "
                                     "'caption' and 'key'")
    return item


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="img", **({} if progress else {"disable": True}))


def dataset_digest(pipe, dataset, progress: bool = False) -> str:
    """The content hash that names a dataset's cache file for this pipeline's VAE and text encoder."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"memcontrol-cache-v{CACHE_VERSION}".encode())
    h.update(f"scaling_factor={pipe.vae.config.scaling_factor}".encode())
    h.update(module_digest(pipe.vae).encode())
    h.update(module_digest(pipe.text_encoder).encode())
    captions = []
    bar = _bar(len(dataset), "hashing training set", progress)
    for i in range(len(dataset)):
        item = _item(dataset, i)
        _update_with_tensor(h, item["pixel_values"].float())
        h.update(json.dumps([item["caption"], item["key"]]).encode())
        captions.append(item["caption"])
        bar.update(1)
    bar.close()
    # Token ids carry the tokenizer into the hash: the same captions under another vocabulary embed differently.
    _update_with_tensor(h, tokenize(pipe.tokenizer, captions + [""]))
    return h.hexdigest()


@torch.no_grad()
def encode_prompts(pipe, captions: list[str]) -> torch.Tensor:
    ids = tokenize(pipe.tokenizer, captions).to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]


@torch.no_grad()
def encode_images(pipe, pixels: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


def _encode(pipe, dataset, batch_size: int, progress: bool) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    latents, embeds, keys, captions = [], [], [], []
    bar = _bar(len(dataset), "encoding training set", progress)
    for start in range(0, len(dataset), batch_size):
        items = [_item(dataset, i) for i in range(start, min(start + batch_size, len(dataset)))]
        pixels = torch.stack([it["pixel_values"] for it in items])
        latents.append(encode_images(pipe, pixels).float().cpu())
        embeds.append(encode_prompts(pipe, [it["caption"] for it in items]).float().cpu())
        keys += [str(it["key"]) for it in items]
        captions += [str(it["caption"]) for it in items]
        bar.update(len(items))
    bar.close()
    return torch.cat(latents), torch.cat(embeds), keys, captions


@contextmanager
def _encoders_on(pipe, device):
    """Run the VAE and text encoder on ``device`` for a while, then put them back where they were."""
    if device is None:
        yield
        return
    homes = [(m, next(m.parameters()).device) for m in (pipe.vae, pipe.text_encoder)]
    try:
        for module, _ in homes:
            module.to(device)
        yield
    finally:
        for module, home in homes:
            module.to(home)


def cache_training_data(pipe, dataset, cache_dir: str | Path | None, batch_size: int = 8, progress: bool = True,
                        device: str | torch.device | None = None) -> CachedData:
    """Latents and text embeddings of ``dataset`` for ``pipe``, from ``cache_dir`` when this data and model were
    encoded before, else computed and written there (``cache_dir=None``: computed, kept in memory only).

    ``dataset`` is any object with ``len()`` and ``ds[i] -> {"pixel_values": C x H x W in [-1, 1], "caption",
    "key"}`` (``memcontrol.data.ImageCaptionDataset``, ``InMemoryDataset``). The encoders run on ``device``
    (default: where they are) and are moved back afterwards."""
    from safetensors.torch import load_file, save_file

    if len(dataset) == 0:
        raise DataError(getattr(dataset, "source", "dataset"), "the training set is empty")
    if cache_dir is None:
        with _encoders_on(pipe, device):
            latents, embeds, keys, captions = _encode(pipe, dataset, batch_size, progress)
            empty = encode_prompts(pipe, [""]).float().cpu()
        return CachedData(latents, embeds, empty, keys, captions, digest=None)

    cache_dir = Path(cache_dir)
    digest = dataset_digest(pipe, dataset, progress)
    path = cache_dir / f"{digest}.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
        tensors = load_file(str(path))
        log.info("training cache hit: %s (%d items)", path, tensors["latents"].shape[0])
        return CachedData(tensors["latents"], tensors["text_embeds"], tensors["empty_embed"],
                          json.loads(meta["keys"]), json.loads(meta["captions"]), digest, path)

    with _encoders_on(pipe, device):
        latents, embeds, keys, captions = _encode(pipe, dataset, batch_size, progress)
        empty = encode_prompts(pipe, [""]).float().cpu()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"latents": latents.contiguous(), "text_embeds": embeds.contiguous(), "empty_embed": empty.contiguous()},
              str(tmp), metadata={"keys": json.dumps(keys), "captions": json.dumps(captions),
                                  "version": str(CACHE_VERSION)})
    # Written under a temporary name and renamed, so that an interrupted run never leaves a truncated cache that a
    # later run would trust.
    os.replace(tmp, path)
    log.info("training cache written: %s (%d items)", path, len(keys))
    return CachedData(latents, embeds, empty, keys, captions, digest, path)
