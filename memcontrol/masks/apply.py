"""Applying a mask to a UNet: peft adapters on the selected layers, or ``requires_grad`` on selected parameters.

``apply_mask`` changes the module it is given (adapters are injected in place, parameters frozen or unfrozen):
pass a copy when the original must stay as it was (``memcontrol.training.finetune`` does).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch

from ..errors import MaskError
from .sites import NORM_TYPES, Site, enumerate_sites, layout_fingerprint
from .spec import PEFT_FAMILIES, Mask

log = logging.getLogger(__name__)

ADAPTER_NAME = "memcontrol"


@dataclass
class AppliedMask:
    """The outcome of applying a mask. ``trainable`` and ``percent`` count the parameters that training updates
    (adapter weights for peft families), ``total`` the UNet's own parameters; ``unmatched`` lists the mask's sites
    that matched nothing (only with ``allow_partial``); ``targets`` the adapted layers (peft families) or the
    trainable parameter names (bitfit_norm, unfreeze)."""

    unet: torch.nn.Module
    trainable: int
    total: int
    percent: float
    unmatched: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    layout: str = ""

    def summary(self) -> str:
        return f"{self.trainable:,} trainable parameters ({self.percent:.3f}% of {self.total:,})"


def adapts(family: str, module: torch.nn.Module) -> bool:
    """Whether a peft family puts an adapter on this layer."""
    if family == "oft":
        # peft 0.21's OFT on a kxk convolution (k > 1) folds overlapping patches back by summing them, so it is not
        # the identity at initialisation; OFT therefore adapts linear and 1x1 convolution layers only.
        return isinstance(module, torch.nn.Linear) or (
            isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1))
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


def adaptable_sites(unet: torch.nn.Module, family: str, granularity: str = "block") -> list[Site]:
    """The sites where ``family`` has something to train: for peft families, sites holding a layer it adapts
    (``conv_norm_out`` and ``norms`` sites hold none); for bitfit_norm, sites with a bias or norm; else all."""
    modules = list(unet.named_modules())
    out = []
    for site in enumerate_sites(unet, granularity):
        pattern = re.compile(site.pattern)
        inside = [m for n, m in modules if pattern.fullmatch(n)]
        if family in PEFT_FAMILIES:
            keep = any(adapts(family, m) for m in inside)
        else:
            keep = any(_selected_by_requires_grad(family, m) for m in inside)
        if keep:
            out.append(site)
    return out


def _selected_by_requires_grad(family: str, module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    params = list(module.named_parameters(recurse=False))
    if family == "unfreeze":
        return params
    # bitfit_norm: biases everywhere in the site, and the affine weights of normalisation layers.
    return [(n, p) for n, p in params if n == "bias" or isinstance(module, NORM_TYPES)]


def peft_config(mask: Mask, targets: list[str]):
    """The peft config of a mask; ``target_modules`` is a regex that full-matches exactly ``targets``."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig

    regex = "|".join(re.escape(t) for t in targets)
    p = mask.params
    if mask.family == "lora":
        return LoraConfig(r=p["rank"], lora_alpha=p["alpha"], lora_dropout=p["dropout"], target_modules=regex,
                          init_lora_weights=True)
    if mask.family == "loha":
        return LoHaConfig(r=p["rank"], alpha=p["alpha"], rank_dropout=p["rank_dropout"],
                          module_dropout=p["module_dropout"], target_modules=regex, init_weights=True)
    if mask.family == "lokr":
        return LoKrConfig(r=p["rank"], alpha=p["alpha"], rank_dropout=p["rank_dropout"],
                          module_dropout=p["module_dropout"], decompose_both=p["decompose_both"],
                          decompose_factor=p["decompose_factor"], target_modules=regex, init_weights=True)
    if mask.family == "oft":
        return OFTConfig(r=0, oft_block_size=p["block_size"], module_dropout=p["module_dropout"], coft=p["coft"],
                         eps=p["eps"], block_share=p["block_share"], target_modules=regex, init_weights=True)
    raise MaskError(f"family '{mask.family}' is not a peft family")


def apply_mask(unet: torch.nn.Module, mask: Mask, allow_partial: bool = False) -> AppliedMask:
    """Make exactly the mask's part of ``unet`` trainable (in place) and report what that is.

    A mask made on another layout, or a site that matches nothing (for peft families: no layer the family can
    adapt), is a ``MaskError``; with ``allow_partial`` these are logged and listed in ``unmatched`` instead. A mask
    of which nothing at all applies is always an error."""
    layout = layout_fingerprint(unet)
    if mask.layout and mask.layout != layout:
        problem = f"the mask was made on a UNet of layout {mask.layout}; this UNet's layout is {layout}"
        if not allow_partial:
            raise MaskError(problem + ". Pass --allow-partial (allow_partial=True) to apply the sites that exist.")
        log.warning("%s; applying the sites that match", problem)

    modules = list(unet.named_modules())
    total = sum(p.numel() for p in unet.parameters())
    unet.requires_grad_(False)
    peft = mask.family in PEFT_FAMILIES
    selected_modules, unmatched = {}, []
    for site in mask.sites:
        pattern = re.compile(mask.pattern_of(site))
        hits = [(n, m) for n, m in modules if pattern.fullmatch(n)]
        if peft:
            hits = [(n, m) for n, m in hits if adapts(mask.family, m)]
        if not hits:
            unmatched.append(site)
        selected_modules.update(hits)

    if unmatched:
        what = "no layer that " + mask.family + " adapts" if peft else "no module"
        problem = f"{len(unmatched)} site(s) of the mask match {what} in this UNet: {', '.join(unmatched)}"
        if not allow_partial:
            raise MaskError(problem + ". Pass --allow-partial (allow_partial=True) to train the rest.")
        log.warning("%s; they are skipped", problem)

    if peft:
        targets = sorted(selected_modules)
        if targets:
            unet.add_adapter(peft_config(mask, targets), adapter_name=ADAPTER_NAME)
    else:
        targets = []
        for name, module in selected_modules.items():
            for pname, param in _selected_by_requires_grad(mask.family, module):
                param.requires_grad_(True)
                targets.append(f"{name}.{pname}" if name else pname)
        targets.sort()
    trainable_params = [p for p in unet.parameters() if p.requires_grad]
    if not trainable_params:
        raise MaskError(f"the mask ({mask.describe()}) selects no trainable parameter in this UNet")
    # Trainable weights are kept in float32 whatever the model's dtype: updates to half-precision weights lose
    # most of their bits. Mixed precision runs the forward pass in half precision through autocast.
    for param in trainable_params:
        if param.dtype != torch.float32:
            param.data = param.data.float()
    trainable = sum(p.numel() for p in trainable_params)
    applied = AppliedMask(unet, trainable, total, 100.0 * trainable / total, unmatched, targets, layout)
    log.info("mask %s: %s", mask.describe(), applied.summary())
    return applied
