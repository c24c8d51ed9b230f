"""The synthetic hospital's own metric networks: small CNNs trained on the public phantom cohort only.

Two roles, one architecture (``pipelines/train_metric_nets.py`` trains both and ships them under
``data/metric_nets/``):

- ``domain``: a feature space for FD/KID in this world, the analogue of the chest-X-ray DenseNet the reference
  protocol uses. Few dimensions (64), so that hundreds of samples far outnumber them.
- ``copy_detector``: an embedding in the role of SSCD, trained contrastively so that the same patient under another
  acquisition (exposure, zoom, shift, noise, blur) lands close, and other patients far (cosine similarity).

A folder holds ``config.json`` (the architecture), ``model.safetensors`` (the encoder's weights),
``CHECKSUMS.sha256`` and ``provenance.json`` (how it was trained, on what, its measured accuracy).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import DataError, MissingWeightsError

KINDS = ("domain", "copy_detector")
CHECKSUMS = "CHECKSUMS.sha256"


@dataclass(frozen=True)
class MetricNetConfig:
    kind: str = field(metadata={"help": "domain (quality features) or copy_detector (memorization)"})
    size: int = field(default=32, metadata={"help": "input side in pixels; images are resized to it"})
    channels: tuple[int, ...] = field(default=(16, 32, 64),
                                      metadata={"help": "widths of the stride-2 stages (32 px -> 4 px)"})
    hidden: int = field(default=256, metadata={"help": "width of the layer before the embedding"})
    dim: int = field(default=64, metadata={"help": "embedding dimensions"})

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"metric network kind must be one of {', '.join(KINDS)}, not '{self.kind}'")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.size % 2 ** len(self.channels):
            raise ValueError(f"size {self.size} is not divisible by 2^{len(self.channels)} (one halving per stage)")


class MetricNet(nn.Module):
    """Grey image 1 x size x size in [-1, 1] -> ``dim`` features. The final map is flattened, not pooled: where
    anatomy sits is what tells one patient from another. GroupNorm rather than BatchNorm, so that a sample's
    features never depend on the other images of its batch."""

    def __init__(self, config: MetricNetConfig):
        super().__init__()
        self.config = config
        layers, width = [], 1
        for out in config.channels:
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(min(8, out // 4), out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(min(8, out // 4), out), nn.SiLU()]
            width = out
        self.trunk = nn.Sequential(*layers)
        side = config.size // 2 ** len(config.channels)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * side * side, config.hidden), nn.SiLU(),
                                  nn.Linear(config.hidden, config.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def save_metric_net(net: MetricNet, folder: str | Path, provenance: dict) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(asdict(net.config), indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"kind": net.config.kind})
    (folder / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    lines = [f"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}  {name}"
             for name in ("config.json", "model.safetensors")]
    (folder / CHECKSUMS).write_text("\n".join(lines) + "\n")
    return folder


def load_metric_net(folder: str | Path, option: str = "'path' in the metric_net embedder spec") -> MetricNet:
    """A shipped network from its folder (safetensors only; a missing file is named with the option to change)."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise MissingWeightsError(f"metric network '{name}'", folder / name, option)
    try:
        config = MetricNetConfig(**json.loads((folder / "config.json").read_text()))
    except (TypeError, ValueError) as err:
        raise DataError(folder / "config.json", f"not a metric network config ({err})") from None
    net = MetricNet(config)
    try:
        net.load_state_dict(load_file(str(folder / "model.safetensors")))
    except Exception as err:  # safetensors' own header errors, or torch's shape/key mismatch
        raise DataError(folder / "model.safetensors", f"does not fit its config.json ({str(err).splitlines()[0]})") \
            from None
    return net.eval().requires_grad_(False)


def to_grey(images: torch.Tensor, size: int) -> torch.Tensor:
    """[-1, 1] images N x C x H x W (RGB from a pipeline, or one channel) -> N x 1 x size x size in [-1, 1]."""
    x = images.mean(1, keepdim=True) if images.shape[1] != 1 else images
    if tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)
    return x
