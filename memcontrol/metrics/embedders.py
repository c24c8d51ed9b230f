"""Image embedders: images in, feature rows out, as the network gives them.

Every embedder takes float images N x 3 x H x W in [-1, 1] (Stable Diffusion's convention), runs in batches with a
progress bar, and returns an N x D float32 matrix of the network's features, not normalised: the Fréchet distance
and KID must see the features themselves (normalising rows changes what they measure), and cosine similarity
normalises where it is taken (``nearest_neighbours``). Weights always come from local files: a missing file is a
``MissingWeightsError`` naming the file and the option to pass; nothing is downloaded.

Kinds (the ``type`` of a spec given to ``build_embedder``):
  pixels       raw pixels, optionally area-downsampled to ``size`` x ``size``
  vae          the latent means of the model's own VAE encoder (always available with a pipeline)
  open_clip    an open_clip image tower: ``model`` (architecture name), ``checkpoint`` (local file), optional
               ``config`` (a model-config JSON for architectures open_clip does not ship)
  transformers any ``transformers`` vision model saved in a local folder (DINOv2, RAD-DINO, ViT...): ``path``
  torchscript  a TorchScript file (SSCD copy-detection models ship that way): ``path``, optional ``size``, ``mean``,
               ``std`` (ImageNet statistics by default)
  inception    Inception-v3 pool features from a local state dict: ``weights``; the pytorch-fid FID-Inception
               layout (1008 classes, TF-ported pooling) or torchvision's ``inception_v3`` layout, detected from the
               file or forced with ``layout``
  metric_net   one of the synthetic hospital's own networks (``memcontrol.metrics.metric_nets``), a folder:
               ``path`` (``data/metric_nets/domain`` for quality, ``data/metric_nets/copy_detector`` for copies)
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError, MissingWeightsError
from .metric_nets import load_metric_net, to_grey

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4:
        raise ValueError(f"expected images N x C x H x W, got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    return images


def resize_normalise(images: torch.Tensor, size: int | tuple[int, int] | None, mean, std,
                     interpolation: str = "bicubic") -> torch.Tensor:
    """[-1, 1] images -> resized, then standardised with a model's own mean and std (given for [0, 1] pixels).

    ``bicubic`` is antialiased (no aliasing when shrinking); ``bilinear`` is plain bilinear, ``align_corners=False``
    and no antialiasing: pytorch-fid's resize, which FID must reproduce to match published numbers."""
    x = (as_rgb(images) + 1) / 2
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode=interpolation, align_corners=False,
                              antialias=interpolation == "bicubic")
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def file_fingerprint(path: Path) -> str:
    """Path, size and modification time: cheap, and enough to notice a replaced weight file."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def batches_of(images) -> tuple[int, Any]:
    """Length and a batch getter for a tensor or a dataset whose items are tensors or dicts with pixel_values."""
    if isinstance(images, torch.Tensor):
        return len(images), lambda a, b: images[a:b]

    def get(a, b):
        items = [images[i] for i in range(a, b)]
        return torch.stack([it["pixel_values"] if isinstance(it, dict) else it for it in items])

    return len(images), get


class Embedder:
    """Base class: subclasses set ``name`` and implement ``_features`` on a batch of [-1, 1] images."""

    name = "embedder"

    def __init__(self, batch_size: int = 32, device: str | torch.device = "cpu"):
        self.batch_size = batch_size
        self.device = torch.device(device)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """What the features depend on besides the images, for the feature cache."""
        return self.name

    @torch.no_grad()
    def embed(self, images, desc: str | None = None) -> torch.Tensor:
        n, get = batches_of(images)
        out = []
        for start in tqdm(range(0, n, self.batch_size), desc=desc or f"embed [{self.name}]", unit="batch",
                          leave=False):
            batch = get(start, min(n, start + self.batch_size)).to(self.device, torch.float32)
            out.append(self._features(batch).float().flatten(1).cpu())
        if not out:
            return torch.zeros(0, 0)
        return torch.cat(out)


class PixelEmbedder(Embedder):
    def __init__(self, size: int | None = None, **kw):
        super().__init__(**kw)
        self.size = size
        self.name = f"pixels{size}" if size else "pixels"

    def _features(self, images):
        x = as_rgb(images)
        if self.size and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="area")
        return x


class VaeEmbedder(Embedder):
    """Latent means of the model's VAE: needs no extra weights, so every audit has a feature space."""

    name = "vae"

    def __init__(self, vae, **kw):
        super().__init__(**kw)
        self.vae = vae
        self._fingerprint = None

    def fingerprint(self):
        if self._fingerprint is None:
            h = hashlib.sha256()
            for key, tensor in sorted(self.vae.state_dict().items()):
                if key.startswith(("encoder.", "quant_conv.")):
                    h.update(key.encode())
                    h.update(tensor.detach().float().cpu().numpy().tobytes())
            self._fingerprint = f"vae:{h.hexdigest()}"
        return self._fingerprint

    def _features(self, images):
        dtype = next(self.vae.parameters()).dtype
        return self.vae.encode(as_rgb(images).to(dtype)).latent_dist.mean


class ModuleEmbedder(Embedder):
    """A vision network with its own input size and normalisation."""

    def __init__(self, module, name: str, fingerprint: str, size, mean, std, interpolation: str = "bicubic", **kw):
        super().__init__(**kw)
        self.module = module.eval().to(self.device)
        self.name = name
        self._fingerprint = fingerprint
        self.size, self.mean, self.std, self.interpolation = size, mean, std, interpolation

    def fingerprint(self):
        return self._fingerprint

    def _forward(self, x):
        return self.module(x)

    def _features(self, images):
        return self._forward(resize_normalise(images, self.size, self.mean, self.std, self.interpolation))


class OpenClipEmbedder(ModuleEmbedder):
    def _forward(self, x):
        return self.module.encode_image(x)


class TransformersEmbedder(ModuleEmbedder):
    """CLS token of the last hidden state for transformers (the DINOv2 / RAD-DINO convention), pooled output for
    convolutional models whose last hidden state is a feature map."""

    def __init__(self, *args, pool: str = "auto", **kw):
        super().__init__(*args, **kw)
        if pool not in ("auto", "cls", "mean", "pooler"):
            raise ConfigError(f"transformers embedder: pool must be auto, cls, mean or pooler, not '{pool}'")
        self.pool = pool

    def _forward(self, x):
        out = self.module(pixel_values=x)
        hidden = out.last_hidden_state
        if self.pool == "pooler" or (self.pool == "auto" and hidden.ndim != 3):
            return out.pooler_output
        if self.pool == "mean":
            return hidden[:, 1:].mean(1) if hidden.ndim == 3 else hidden.flatten(2).mean(-1)
        return hidden[:, 0]


class MetricNetEmbedder(Embedder):
    """A shipped metric network: grey images at its own input size, its features as it gives them."""

    def __init__(self, net, fingerprint: str, **kw):
        super().__init__(**kw)
        self.net = net.to(self.device)
        self.name = net.config.kind
        self._fingerprint = fingerprint

    def fingerprint(self):
        return self._fingerprint

    def _features(self, images):
        return self.net(to_grey(images, self.net.config.size))


def _need_file(spec: dict, key: str, what: str, folder: bool = False) -> Path:
    value = spec.get(key)
    option = f"'{key}' in the {spec['type']} embedder spec"
    if not value:
        raise ConfigError(f"the {spec['type']} embedder needs {option}: {what}")
    path = Path(value).expanduser()
    if not (path.is_dir() if folder else path.is_file()):
        raise MissingWeightsError(what, path, option)
    return path


def _open_clip(spec, device, batch_size):
    import open_clip

    checkpoint = _need_file(spec, "checkpoint", "open_clip checkpoint file")
    model_name = spec.get("model")
    if not model_name:
        raise ConfigError("the open_clip embedder needs 'model' (an architecture name such as ViT-B-32)")
    if spec.get("config"):
        config = _need_file(spec, "config", "open_clip model config JSON")
        open_clip.add_model_config(config)
    if model_name not in open_clip.list_models():
        raise ConfigError(f"open_clip has no architecture '{model_name}'; give its model config JSON as 'config'")
    try:
        # An absolute path is never mistaken for one of open_clip's download tags.
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint.resolve()),
                                                            device="cpu")
    except RuntimeError as err:
        raise DataError(checkpoint, f"does not load into open_clip '{model_name}': {str(err).splitlines()[0]}") \
            from None
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    return OpenClipEmbedder(model, f"open_clip:{model_name}", f"open_clip:{model_name}:{file_fingerprint(checkpoint)}",
                            cfg.get("size", model.visual.image_size), cfg.get("mean", IMAGENET_MEAN),
                            cfg.get("std", IMAGENET_STD), device=device, batch_size=batch_size)


def _transformers(spec, device, batch_size):
    from transformers import AutoConfig, AutoModel

    folder = _need_file(spec, "path", "transformers vision model folder", folder=True)
    if not (folder / "config.json").is_file():
        raise MissingWeightsError("'config.json' of a transformers model", folder / "config.json",
                                  "'path' in the transformers embedder spec (a folder written by save_pretrained)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except OSError as err:
        raise DataError(folder, f"no safetensors weights that transformers can load ({str(err).splitlines()[0]})") \
            from None
    size = getattr(config, "image_size", 224)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    prep = folder / "preprocessor_config.json"
    if prep.is_file():
        p = json.loads(prep.read_text())
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
        crop = p.get("crop_size") if p.get("do_center_crop") else None
        target = crop or p.get("size") or {}
        if isinstance(target, dict):
            size = target.get("height") or target.get("shortest_edge") or size
        elif isinstance(target, int):
            size = target
    size = spec.get("size", size)
    weights = sorted(folder.glob("*.safetensors"))
    print_id = ";".join(file_fingerprint(w) for w in weights)
    return TransformersEmbedder(model, f"transformers:{folder.name}", f"transformers:{print_id}", size, mean, std,
                                pool=spec.get("pool", "auto"), device=device, batch_size=batch_size)


def _torchscript(spec, device, batch_size):
    path = _need_file(spec, "path", "TorchScript model file")
    try:
        # TorchScript archives hold TorchScript code, not arbitrary Python: the format SSCD is published in. Torch
        # 2.14 calls the loader deprecated; it still loads, and the published files exist only in this format.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as err:
        raise DataError(path, f"not a TorchScript archive ({str(err).splitlines()[0]})") from None
    return ModuleEmbedder(module, f"torchscript:{path.stem}", f"torchscript:{file_fingerprint(path)}",
                          spec.get("size"), tuple(spec.get("mean", IMAGENET_MEAN)),
                          tuple(spec.get("std", IMAGENET_STD)), device=device, batch_size=batch_size)


def _inception(spec, device, batch_size):
    from .inception import build_inception

    path = _need_file(spec, "weights", "Inception-v3 weight file")
    model, layout = build_inception(path, spec.get("layout", "auto"))
    # Both layouts expect pixels scaled to [-1, 1] at 299 x 299 (torchvision's ImageNet weights bake the
    # ImageNet-statistics step into transform_input, which amounts to the same scaling). FID resizes as pytorch-fid
    # does (bilinear, align_corners=False, no antialiasing), so that its numbers match pytorch-fid's on the same
    # images; the torchvision network, whose numbers match nothing published, keeps the antialiased bicubic resize.
    if layout == "pytorch-fid":
        name, interpolation = "inception", "bilinear"
    else:
        name, interpolation = "inception-torchvision", "bicubic"
    return ModuleEmbedder(model, name, f"{name}:{interpolation}:{file_fingerprint(path)}", 299, (0.5, 0.5, 0.5),
                          (0.5, 0.5, 0.5), interpolation=interpolation, device=device, batch_size=batch_size)


def _metric_net(spec, device, batch_size):
    folder = _need_file(spec, "path", "metric network folder", folder=True)
    net = load_metric_net(folder)
    return MetricNetEmbedder(net, f"metric_net:{file_fingerprint(folder / 'model.safetensors')}", device=device,
                             batch_size=batch_size)


def build_embedder(spec: dict | str, pipe=None, device: str | torch.device = "cpu", batch_size: int = 32) -> Embedder:
    """An embedder from a spec such as {"type": "pixels", "size": 32} or {"type": "vae"} (see the module doc)."""
    if isinstance(spec, str):
        spec = {"type": spec}
    spec = dict(spec)
    kind = spec.get("type")
    batch_size = int(spec.get("batch_size", batch_size))
    if kind == "pixels":
        return PixelEmbedder(spec.get("size"), device=device, batch_size=batch_size)
    if kind == "vae":
        if pipe is None:
            raise ConfigError("the vae embedder needs the pipeline under test")
        return VaeEmbedder(pipe.vae, device=device, batch_size=batch_size)
    builders = {"open_clip": _open_clip, "transformers": _transformers, "torchscript": _torchscript,
                "inception": _inception, "metric_net": _metric_net}
    if kind not in builders:
        raise ConfigError(f"unknown embedder type '{kind}' (use one of: pixels, vae, {', '.join(builders)})")
    return builders[kind](spec, device, batch_size)


def content_hash(images) -> str:
    """A hash of the pixels (as float32) of a tensor or a dataset, read batch by batch: the same images give the same
    hash whichever holds them, so that the audit and the search find each other's features."""
    n, get = batches_of(images)
    h = hashlib.sha256(str(n).encode())
    for start in range(0, n, 64):
        batch = get(start, min(n, start + 64)).detach().to(torch.float32).contiguous().cpu()
        h.update(str(tuple(batch.shape[1:])).encode())
        h.update(batch.numpy().tobytes())
    return h.hexdigest()


# Part of every feature-cache key: feature files written when embedders still normalised rows are never read back.
FEATURE_FORMAT = "raw"


def feature_cache_key(embedder: Embedder, content_digest: str) -> str:
    """The name part of a cached feature file: what the embedder depends on and what it was given."""
    return hashlib.sha256(f"{FEATURE_FORMAT}|{embedder.fingerprint()}|{content_digest}".encode()).hexdigest()[:24]


def cached_embed(embedder: Embedder, images, cache_dir: str | Path | None, desc: str | None = None) -> torch.Tensor:
    """Features of a fixed image set (training or held-out images; a tensor or a dataset), computed once: the file
    name is a hash of the pixels and of what the embedder depends on (its weights), so a changed image or weight file
    is a cache miss. The one feature cache of the project: the search and the audit share it."""
    if cache_dir is None:
        return embedder.embed(images, desc=desc)
    from safetensors.torch import load_file, save_file

    key = feature_cache_key(embedder, content_hash(images))
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in embedder.name)
    path = Path(cache_dir) / f"features-{safe_name}-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["features"]
    feats = embedder.embed(images, desc=desc)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"features": feats.contiguous()}, str(tmp), metadata={"embedder": embedder.name})
    tmp.replace(path)
    return feats
