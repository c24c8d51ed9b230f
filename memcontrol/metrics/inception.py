"""Inception-v3 pool features (2048-d) from a local state dict, in either of the two common layouts.

* pytorch-fid's FID-Inception (``pt_inception-2015-12-05-*.pth``): torchvision's module tree and parameter names with
  a 1008-class head and no auxiliary classifier, but the pooling of the original TensorFlow graph: the average pools
  inside the Mixed blocks ignore padding, and the last block (Mixed_7c) max-pools its pool branch. Only features from
  this network are the "FID" of the literature.
* torchvision's ``inception_v3`` (1000 classes, optionally with ``AuxLogits``): its ImageNet weights are a different
  network, so its Fréchet distance is reported under its own name.

The layout is read from the file (head size) unless forced.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.models import inception as tv

from ..errors import ConfigError, DataError
from ..weights import load_state_dict


def _avg_pool_no_pad(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class TfPoolInceptionA(tv.InceptionA):
    def _forward(self, x):
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool_no_pad(x))]


class TfPoolInceptionC(tv.InceptionC):
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        return [self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_no_pad(x))]


class TfPoolInceptionE(tv.InceptionE):
    """Mixed_7b (average pool without padding) or, with ``max_pool``, Mixed_7c."""

    def __init__(self, in_channels, max_pool: bool = False, **kw):
        super().__init__(in_channels, **kw)
        self.max_pool = max_pool

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_no_pad(x)
        return [self.branch1x1(x), b3, bd, self.branch_pool(pooled)]


class InceptionPool(torch.nn.Module):
    """The network up to its global average pool."""

    def __init__(self, net: tv.Inception3):
        super().__init__()
        self.net = net

    def forward(self, x):
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1, n.Conv2d_4a_3x3,
                      n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d,
                      n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c, n.avgpool):
            x = layer(x)
        return torch.flatten(x, 1)


def detect_layout(state: dict) -> str:
    head = state.get("fc.weight")
    if head is None:
        raise ValueError("no 'fc.weight' entry: not an Inception-v3 state dict")
    return "pytorch-fid" if head.shape[0] == 1008 else "torchvision"


def build_inception(path: str | Path, layout: str = "auto") -> tuple[InceptionPool, str]:
    state = load_state_dict(path, "Inception-v3 weight file", "'weights' in the inception embedder spec")
    if layout == "auto":
        try:
            layout = detect_layout(state)
        except ValueError as err:
            raise DataError(path, str(err)) from None
    if layout not in ("pytorch-fid", "torchvision"):
        raise ConfigError(f"inception layout must be auto, pytorch-fid or torchvision, not '{layout}'")
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
    aux = any(k.startswith("AuxLogits.") for k in state)
    if layout == "pytorch-fid":
        blocks = [tv.BasicConv2d, TfPoolInceptionA, tv.InceptionB, TfPoolInceptionC, tv.InceptionD,
                  TfPoolInceptionE, tv.InceptionAux]
        net = tv.Inception3(num_classes=num_classes, aux_logits=aux, init_weights=False, inception_blocks=blocks)
        net.Mixed_7c = TfPoolInceptionE(2048, max_pool=True)
    else:
        net = tv.Inception3(num_classes=num_classes, aux_logits=aux, init_weights=False)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DataError(path, f"does not match the {layout} Inception-v3 layout ({str(err).splitlines()[0]})") \
            from None
    return InceptionPool(net).eval(), layout
