"""From decoded pixels ([0, 1], H x W or H x W x 3) to the tensors a Stable Diffusion VAE expects."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

CROPS = ("center", "none")
# ITU-R BT.601 luma: how a colour image becomes one channel.
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def to_model_tensor(pixels: np.ndarray, resolution: int, channels: int = 3, crop: str = "center") -> torch.Tensor:
    """float32 C x resolution x resolution in [-1, 1].

    crop="center" scales the shorter side to `resolution` and cuts the centre square (aspect kept);
    crop="none" scales the whole image to the square (aspect changed, nothing lost).
    """
    check_options(resolution, channels, crop)
    image = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
    if channels == 1 and image.shape[0] == 3:
        image = (image * _LUMA).sum(0, keepdim=True)
    elif channels == 3 and image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    image = _resize(image, resolution, crop)
    return (image.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def check_options(resolution: int, channels: int, crop: str) -> None:
    if not isinstance(resolution, int) or resolution < 1:
        raise ConfigError(f"resolution must be a positive integer, got {resolution!r}")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    if crop not in CROPS:
        raise ConfigError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")


def _resize(image: torch.Tensor, resolution: int, crop: str) -> torch.Tensor:
    height, width = image.shape[-2:]
    if crop == "none":
        size = (resolution, resolution)
    else:
        scale = resolution / min(height, width)
        size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    if size != (height, width):
        # Antialiasing matters when a 2-3k px radiograph shrinks to 64-512 px: without it fine lines alias.
        image = F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", align_corners=False,
                              antialias=True).squeeze(0)
    top = (image.shape[-2] - resolution) // 2
    left = (image.shape[-1] - resolution) // 2
    return image[:, top:top + resolution, left:left + resolution]
