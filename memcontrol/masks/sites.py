"""Sites: the named parts of a UNet that a mask switches on or off.

A site is a sub-module named by its diffusers module path. At ``block`` granularity the sites are the elements of
each block's module lists (``down_blocks.0.attentions.0``, ``down_blocks.0.resnets.1``, ``mid_block.attentions.0``,
``up_blocks.3.resnets.2``, ``down_blocks.0.downsamplers.0``...) plus the stem layers outside the blocks
(``conv_in``, ``time_embedding``, ``conv_norm_out``, ``conv_out``): all sites together cover every parameter.
At ``role`` granularity each attention site is split by role: ``proj_in``, ``proj_out``, per transformer block
``attn1`` (self-attention), ``attn2`` (cross-attention) and ``ff``, and one ``norms`` site grouping the attention
site's normalisation layers. Each site compiles to a regular expression that full-matches the names of its module
and everything below it, which is how masks are stored and applied.

Sites depend on module names and types only, never on widths, so SD 1.5 and the tiny preset (same layout, other
widths) have the same sites and the same layout fingerprint.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch

GRANULARITIES = ("block", "role")
BLOCK_CONTAINERS = ("down_blocks", "mid_block", "up_blocks")
LIST_KINDS = {"attentions": "attention", "resnets": "resnet", "downsamplers": "downsampler",
              "upsamplers": "upsampler"}
NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm)
NORMS_SUFFIX = ".norms"


@dataclass(frozen=True)
class Site:
    """One switchable part of a UNet.

    ``name`` is the module path (for a ``norms`` site: the attention site's path + ``.norms``), ``kind`` one of
    stem, attention, resnet, downsampler, upsampler (block level) or proj_in, proj_out, attn1, attn2, ff, norms
    (role level), ``block`` the enclosing block (``down_blocks.1``, ``mid_block``, ``stem``), ``module_type`` the
    class name of the site's module, and ``pattern`` the regex that full-matches every module inside the site.
    """

    name: str
    kind: str
    block: str
    module_type: str
    pattern: str


def site_pattern(name: str) -> str:
    """The regex of a site: its module and all descendants; for a ``norms`` site, the attention site's own norm
    and the norms of its transformer blocks (``norm1``..``norm3`` in diffusers)."""
    if name.endswith(NORMS_SUFFIX):
        owner = name[: -len(NORMS_SUFFIX)]
        return re.escape(owner) + r"\.(?:norm|transformer_blocks\.\d+\.norm\d+)"
    return re.escape(name) + r"(?:\..+)?"


def _module_site(name: str, kind: str, block: str, module: torch.nn.Module) -> Site:
    return Site(name, kind, block, type(module).__name__, site_pattern(name))


def _has_parameters(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _block_sites(unet: torch.nn.Module) -> list[tuple[Site, torch.nn.Module]]:
    """Block-level sites in data-flow order: stem in, down blocks, mid block, up blocks, stem out (diffusers
    registers ``mid_block`` after ``up_blocks``)."""
    stem_in, stem_out, blocks = [], [], {c: [] for c in BLOCK_CONTAINERS}
    for top_name, top in unet.named_children():
        if top_name in BLOCK_CONTAINERS:
            named = [(top_name, top)] if top_name == "mid_block" else [
                (f"{top_name}.{i}", block) for i, block in enumerate(top)]
            for block_name, block in named:
                for list_name, items in block.named_children():
                    if not isinstance(items, torch.nn.ModuleList):
                        continue
                    kind = LIST_KINDS.get(list_name, list_name)
                    for j, item in enumerate(items):
                        if _has_parameters(item):
                            name = f"{block_name}.{list_name}.{j}"
                            blocks[top_name].append((_module_site(name, kind, block_name, item), item))
        elif _has_parameters(top):
            seen_blocks = any(blocks.values())
            (stem_out if seen_blocks else stem_in).append((_module_site(top_name, "stem", "stem", top), top))
    return stem_in + [s for c in BLOCK_CONTAINERS for s in blocks[c]] + stem_out


def _role_sites(site: Site, module: torch.nn.Module) -> list[Site]:
    """An attention site split into its roles; its norm layers form one ``norms`` site."""
    roles, has_norms = [], False
    norms_name = f"{site.name}{NORMS_SUFFIX}"
    norms_pattern = re.compile(site_pattern(norms_name))
    for rel, child in module.named_modules():
        if not rel or not _has_parameters(child):
            continue
        if isinstance(child, NORM_TYPES) and norms_pattern.fullmatch(f"{site.name}.{rel}"):
            has_norms = True
            continue
        parent, _, leaf = rel.rpartition(".")
        # Roles are the direct children of the attention site (proj_in/out) and of each transformer block
        # (attn1, attn2, ff); deeper modules belong to them.
        if parent == "" and not isinstance(child, torch.nn.ModuleList):
            roles.append(_module_site(f"{site.name}.{rel}", rel, site.block, child))
        elif re.fullmatch(r"transformer_blocks\.\d+", parent):
            roles.append(_module_site(f"{site.name}.{rel}", leaf, site.block, child))
    if has_norms:
        roles.append(Site(norms_name, "norms", site.block, "norms", norms_pattern.pattern))
    return roles


def enumerate_sites(unet: torch.nn.Module, granularity: str = "block") -> list[Site]:
    """The sites of a UNet in module order. Works on a meta-device model (only names and types are read)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    out = []
    for site, module in _block_sites(unet):
        if granularity == "role" and site.kind == "attention":
            out.extend(_role_sites(site, module))
        else:
            out.append(site)
    return out


def layout_fingerprint(unet: torch.nn.Module) -> str:
    """A short hash of the UNet's site layout: block-level site names with their module types, and role-level
    site names.

    Widths, head counts and dtypes do not enter it, so a mask moves between models of one layout (SD 1.5 and the
    tiny preset; SD 1.x and 2.x, whose ``proj_in``/``proj_out`` differ in type, conv or linear, but not in name)."""
    lines = sorted(f"{s.name}:{s.module_type}" for s in enumerate_sites(unet, "block"))
    lines += sorted(s.name for s in enumerate_sites(unet, "role"))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
