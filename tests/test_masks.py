import copy
import json
import re

import pytest
import torch

from memcontrol.errors import MaskError
from memcontrol.masks import (FAMILIES, Mask, adaptable_sites, adapts, apply_mask, enumerate_sites,
                              layout_fingerprint, load_mask)
from memcontrol.models import sd15_unet_meta


@pytest.fixture(scope="module")
def sd15():
    return sd15_unet_meta()


@pytest.fixture(scope="module")
def tiny_unet(tiny_pipe):
    return tiny_pipe.unet


def _fresh_tiny(tiny_unet):
    return copy.deepcopy(tiny_unet)


def _params_in(unet, site):
    pattern = re.compile(site.pattern)
    return {f"{m}.{p}" for m, mod in unet.named_modules() if pattern.fullmatch(m)
            for p, _ in mod.named_parameters(recurse=False)}


@pytest.mark.parametrize("granularity", ["block", "role"])
def test_tiny_and_sd15_have_the_same_sites(tiny_unet, sd15, granularity):
    tiny = enumerate_sites(tiny_unet, granularity)
    big = enumerate_sites(sd15, granularity)
    assert [(s.name, s.kind, s.pattern) for s in tiny] == [(s.name, s.kind, s.pattern) for s in big]
    assert layout_fingerprint(tiny_unet) == layout_fingerprint(sd15)
    assert next(sd15.parameters()).device.type == "meta"


def test_sd15_block_sites_match_its_published_layout(sd15):
    sites = enumerate_sites(sd15, "block")
    kinds = [s.kind for s in sites]
    # SD 1.5: 16 transformer blocks (6 down, 1 mid, 9 up), 2 resnets per down block, 3 per up block, 2 in the mid.
    assert kinds.count("attention") == 16
    assert kinds.count("resnet") == 4 * 2 + 2 + 4 * 3
    assert kinds.count("downsampler") == 3 and kinds.count("upsampler") == 3
    assert [s.name for s in sites if s.kind == "stem"] == ["conv_in", "time_embedding", "conv_norm_out", "conv_out"]
    names = [s.name for s in sites]
    assert names.index("down_blocks.3.resnets.1") < names.index("mid_block.attentions.0") < names.index(
        "up_blocks.0.resnets.0")


def test_block_sites_partition_every_parameter(tiny_unet):
    owners = {}
    for site in enumerate_sites(tiny_unet, "block"):
        for name in _params_in(tiny_unet, site):
            assert name not in owners, f"{name} is in {owners.get(name)} and {site.name}"
            owners[name] = site.name
    assert set(owners) == {n for n, _ in tiny_unet.named_parameters()}


def test_role_sites_split_each_attention_site(tiny_unet):
    blocks = {s.name: s for s in enumerate_sites(tiny_unet, "block") if s.kind == "attention"}
    roles = [s for s in enumerate_sites(tiny_unet, "role") if s.block != "stem"]
    name = "down_blocks.1.attentions.0"
    mine = [s for s in roles if s.name.startswith(name + ".")]
    assert sorted(s.kind for s in mine) == ["attn1", "attn2", "ff", "norms", "proj_in", "proj_out"]
    assert f"{name}.transformer_blocks.0.attn2" in {s.name for s in mine}
    covered = set().union(*(_params_in(tiny_unet, s) for s in mine))
    assert covered == _params_in(tiny_unet, blocks[name])
    norms = _params_in(tiny_unet, next(s for s in mine if s.kind == "norms"))
    assert norms and all(re.search(r"\.norm\d?\.(weight|bias)$", n) for n in norms)


def test_mask_json_round_trip(tmp_path, tiny_unet):
    sites = [s for s in enumerate_sites(tiny_unet, "role") if s.kind == "attn2"]
    mask = Mask(sites, "lora", {"rank": 8, "alpha": 16}, layout=layout_fingerprint(tiny_unet))
    path = mask.to_json(tmp_path / "mask.json")
    data = json.loads(path.read_text())
    assert data["schema"] == "memcontrol.mask" and data["version"] == 1
    assert data["params"] == {"rank": 8, "alpha": 16.0, "dropout": 0.0}
    assert data["sites"][0] == {"name": sites[0].name, "pattern": sites[0].pattern}
    assert Mask.from_json(path) == mask


def test_hand_written_mask_with_names_and_patterns(tiny_unet):
    mask = load_mask({"family": "bitfit_norm", "sites": ["mid_block.attentions.0", {"pattern": r"conv_(in|out)"}]})
    applied = apply_mask(_fresh_tiny(tiny_unet), mask)
    assert set(applied.targets) == {"conv_in.bias", "conv_out.bias", *(
        n for n, _ in tiny_unet.named_parameters()
        if n.startswith("mid_block.attentions.0.") and (n.endswith(".bias") or ".norm" in n))}


@pytest.mark.parametrize("data, message", [
    ({"family": "dora", "sites": ["conv_in"]}, "unknown adaptation family"),
    ({"family": "lora", "sites": ["conv_in"], "params": {"rank": 4, "r": 2}}, "unknown lora parameter"),
    ({"family": "lora", "sites": ["conv_in"], "params": {"rank": 0}}, "positive integer"),
    ({"family": "lora", "sites": ["conv_in"], "params": {"dropout": 1.5}}, r"\[0, 1\)"),
    ({"family": "oft", "sites": [{"pattern": "conv_(in"}]}, "not a valid regular expression"),
    ({"family": "lora", "sites": []}, "no site"),
    ({"family": "lora", "sites": ["conv_in"], "version": 99}, "newer"),
    ({"family": "lora", "sites": ["conv_in"], "rank": 4}, "unknown mask keys"),
])
def test_bad_masks_are_clear_errors(data, message):
    with pytest.raises(MaskError, match=message):
        Mask.from_dict(data)


def test_mask_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "mask.json"
    bad.write_text("{not json")
    with pytest.raises(MaskError, match=re.escape(str(bad)) + ".*not valid JSON"):
        Mask.from_json(bad)
    with pytest.raises(MaskError, match="not found"):
        Mask.from_json(tmp_path / "missing.json")


def test_other_layout_is_refused_unless_partial(tiny_unet, caplog):
    mask = Mask(["mid_block.attentions.0"], "unfreeze", layout="0123456789abcdef")
    with pytest.raises(MaskError, match="layout 0123456789abcdef.*--allow-partial"):
        apply_mask(_fresh_tiny(tiny_unet), mask)
    applied = apply_mask(_fresh_tiny(tiny_unet), mask, allow_partial=True)
    assert applied.trainable > 0 and "layout" in caplog.text


def test_unmatched_sites_are_refused_or_listed(tiny_unet):
    mask = Mask(["down_blocks.9.attentions.0", "mid_block.attentions.0"], "lora")
    with pytest.raises(MaskError, match="down_blocks.9.attentions.0"):
        apply_mask(_fresh_tiny(tiny_unet), mask)
    applied = apply_mask(_fresh_tiny(tiny_unet), mask, allow_partial=True)
    assert applied.unmatched == ["down_blocks.9.attentions.0"]
    assert applied.trainable > 0
    with pytest.raises(MaskError, match="no layer that lora adapts"):
        apply_mask(_fresh_tiny(tiny_unet), Mask(["mid_block.attentions.0.norms"], "lora"))


def _linear_and_conv(unet, sites, family):
    patterns = [re.compile(s.pattern) for s in sites]
    return {n: m for n, m in unet.named_modules() if any(p.fullmatch(n) for p in patterns) and adapts(family, m)}


def _dims(module):
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features, 1
    kh, kw = module.kernel_size
    return module.in_channels, module.out_channels, kh * kw


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_count_is_what_the_mask_selects(tiny_unet, family):
    all_sites = enumerate_sites(tiny_unet, "role")
    sites = [s for s in all_sites if s.kind in ("attn1", "attn2", "ff", "norms", "proj_out")] + [
        s for s in all_sites if s.name == "up_blocks.1.resnets.2"]
    if family in ("lora", "loha", "lokr", "oft"):
        sites = [s for s in sites if s.kind != "norms"]
    mask = Mask(sites, family, {"rank": 2} if family in ("lora", "loha", "lokr") else {})
    applied = apply_mask(_fresh_tiny(tiny_unet), mask)
    trainable = {n: p for n, p in applied.unet.named_parameters() if p.requires_grad}
    assert applied.trainable == sum(p.numel() for p in trainable.values())
    assert applied.total == sum(p.numel() for p in tiny_unet.parameters())
    assert applied.percent == pytest.approx(100 * applied.trainable / applied.total)
    layers = _linear_and_conv(tiny_unet, sites, family)
    if family == "lora":
        # r * (in * k + out) per layer: A is r x in x kh x kw, B is out x r.
        assert applied.trainable == sum(2 * (i * k + o) for i, o, k in map(_dims, layers.values()))
    elif family == "loha":
        # Two rank-r factor pairs per layer (the Hadamard product of two low-rank matrices).
        assert applied.trainable == sum(2 * 2 * (i * k + o) for i, o, k in map(_dims, layers.values()))
    elif family in ("lokr", "oft"):
        owners = {re.sub(r"\.(lokr_\w+|oft_R)(\.memcontrol)?(\.weight)?$", "", n) for n in trainable}
        assert owners == set(layers)
        if family == "oft":
            assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) for m in layers.values())
    else:
        selected = set().union(*(_params_in(tiny_unet, s) for s in sites))
        if family == "bitfit_norm":
            norm_modules = {n for n, m in tiny_unet.named_modules() if isinstance(m, (torch.nn.GroupNorm,
                                                                                       torch.nn.LayerNorm))}
            selected = {n for n in selected if n.endswith(".bias") or n.rsplit(".", 1)[0] in norm_modules}
        assert set(trainable) == selected == set(applied.targets)


@pytest.mark.parametrize("family", ["lora", "loha", "lokr", "oft"])
def test_adapters_start_as_the_identity(tiny_unet, family):
    sites = adaptable_sites(tiny_unet, family)
    left_out = {s.name for s in enumerate_sites(tiny_unet)} - {s.name for s in sites}
    if family == "oft":  # OFT adapts no kxk convolution: the stem convs and the up/down samplers are left out
        assert left_out == {"conv_in", "conv_norm_out", "conv_out", "down_blocks.0.downsamplers.0",
                            "down_blocks.1.downsamplers.0", "down_blocks.2.downsamplers.0",
                            "up_blocks.0.upsamplers.0", "up_blocks.1.upsamplers.0", "up_blocks.2.upsamplers.0"}
    else:
        assert left_out == {"conv_norm_out"}
    unet = _fresh_tiny(tiny_unet)
    apply_mask(unet, Mask(sites, family))
    gen = torch.Generator().manual_seed(0)
    x, emb = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 64, generator=gen)
    with torch.no_grad():
        adapted, original = unet(x, 10, emb).sample, tiny_unet(x, 10, emb).sample
        # Not bitwise: the copied weights may sit at other memory alignments, and some CPUs then take other SIMD
        # paths (seen: 9.8e-7 on an AMD EPYC, also where the adapter adds exactly zero). An adapter that did not
        # start as the identity changes the output by orders of magnitude more than 1e-5 (checked below).
        torch.testing.assert_close(adapted, original, rtol=1e-5, atol=1e-5)
        for name, param in unet.named_parameters():
            if param.requires_grad:
                param.add_(0.1)
        assert (unet(x, 10, emb).sample - original).abs().max() > 1e-3


def test_mask_made_on_tiny_applies_to_sd15(tmp_path, tiny_unet, sd15):
    sites = [s for s in enumerate_sites(tiny_unet, "role") if s.kind in ("attn1", "attn2")]
    path = Mask(sites, "lora", {"rank": 4}, layout=layout_fingerprint(tiny_unet)).to_json(tmp_path / "mask.json")
    big = sd15_unet_meta()
    applied = apply_mask(big, Mask.from_json(path))
    assert applied.unmatched == []
    linears = _linear_and_conv(sd15, sites, "lora")
    assert applied.trainable == sum(4 * (i + o) for i, o, _ in map(_dims, linears.values()))
    assert 0 < applied.percent < 1
