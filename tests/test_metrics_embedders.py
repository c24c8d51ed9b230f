"""Embedders: every kind loads from a local file (tiny random models written by the tests, nothing downloaded),
returns the reference model's own output unchanged (no normalisation), and a missing file is a clear error."""

import json

import pytest
import torch
import torch.nn.functional as F
from fixtures_metrics import random_inception
from safetensors.torch import save_file

from memcontrol.errors import ConfigError, MissingWeightsError
from memcontrol.metrics import build_embedder, cached_embed, distance_name
from memcontrol.metrics.embedders import resize_normalise


@pytest.fixture(scope="module")
def images():
    return torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_pixels(images):
    full = build_embedder({"type": "pixels"}).embed(images)
    small = build_embedder({"type": "pixels", "size": 8}).embed(images)
    assert full.shape == (5, 3 * 32 * 32) and small.shape == (5, 3 * 8 * 8)
    # The features are the pixels themselves: FD and KID must see them as they are, not as unit vectors.
    assert torch.equal(full, images.flatten(1))
    assert torch.allclose(small, F.avg_pool2d(images, 4).flatten(1), atol=1e-6)  # area vs. average pool, float32


def test_vae_is_the_models_latent_mean(tiny_pipe):
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    emb = build_embedder({"type": "vae", "batch_size": 2}, pipe=tiny_pipe)
    with torch.no_grad():
        expected = tiny_pipe.vae.encode(x).latent_dist.mean.flatten(1)
    assert emb.name == "vae" and torch.allclose(emb.embed(x), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="pipeline"):
        build_embedder({"type": "vae"})


def test_open_clip_from_a_local_checkpoint(tmp_path, images):
    import open_clip

    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    config_path = tmp_path / "tiny-test-clip.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip")
    ckpt = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    emb = build_embedder({"type": "open_clip", "model": "tiny-test-clip", "checkpoint": str(ckpt),
                          "config": str(config_path)})
    cfg = model.visual.preprocess_cfg
    with torch.no_grad():
        expected = model.eval().encode_image(resize_normalise(images, 32, cfg["mean"], cfg["std"]))
    feats = emb.embed(images)
    assert emb.name == "open_clip:tiny-test-clip" and feats.shape == (5, 16)
    assert torch.allclose(feats, expected, atol=1e-5)


def test_transformers_vision_model_from_a_folder(tmp_path, images):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, image_size=32, patch_size=8))
    folder = tmp_path / "tiny-dino"
    model.save_pretrained(folder)
    mean, std = [0.4, 0.4, 0.4], [0.2, 0.25, 0.3]
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": mean, "image_std": std, "size": {"shortest_edge": 24}, "do_center_crop": True,
         "crop_size": {"height": 24, "width": 24}}))
    emb = build_embedder({"type": "transformers", "path": str(folder)})
    with torch.no_grad():
        cls = model.eval()(pixel_values=resize_normalise(images, 24, mean, std)).last_hidden_state[:, 0]
    assert emb.name == "transformers:tiny-dino"
    assert torch.allclose(emb.embed(images), cls, atol=1e-5)


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return self.conv(x).relu().mean((2, 3))


def test_torchscript_file(tmp_path, images):
    torch.manual_seed(0)
    net = TinyNet().eval()
    path = tmp_path / "sscd_tiny.torchscript.pt"
    torch.jit.script(net).save(str(path))
    emb = build_embedder({"type": "torchscript", "path": str(path), "size": 16})
    from memcontrol.metrics.embedders import IMAGENET_MEAN, IMAGENET_STD

    with torch.no_grad():
        expected = net(resize_normalise(images, 16, IMAGENET_MEAN, IMAGENET_STD))
    assert emb.name == "torchscript:sscd_tiny.torchscript"
    assert torch.allclose(emb.embed(images), expected, atol=1e-5)


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    """Random Inception-v3 weights in both layouts: torchvision's (1000 classes, with the auxiliary head) and
    pytorch-fid's FID-Inception (torchvision's names, 1008 classes, no auxiliary head)."""
    folder = tmp_path_factory.mktemp("inception")
    tv = random_inception(num_classes=1000, aux_logits=True)
    fid = random_inception(num_classes=1008, aux_logits=False, seed=1)
    paths = {}
    for name, net in (("torchvision", tv), ("pytorch-fid", fid)):
        paths[name] = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(paths[name]))
    return paths


def test_inception_layouts(inception_files):
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1
    tv = build_embedder({"type": "inception", "weights": str(inception_files["torchvision"])})
    fid = build_embedder({"type": "inception", "weights": str(inception_files["pytorch-fid"])})
    assert (tv.name, distance_name(tv.name)) == ("inception-torchvision", "FD[inception-torchvision]")
    assert (fid.name, distance_name(fid.name)) == ("inception", "FID")
    f_tv, f_fid = tv.embed(x), fid.embed(x)
    assert f_tv.shape == (2, 2048) and f_fid.shape == (2, 2048)
    # The pytorch-fid network pools like the TensorFlow original: the same weights run through torchvision's
    # blocks give other features.
    forced = build_embedder({"type": "inception", "weights": str(inception_files["pytorch-fid"]),
                             "layout": "torchvision"})
    assert not torch.allclose(forced.embed(x), f_fid, atol=1e-4)
    # Reference: torchvision's own network on the same weights, up to its global pool.
    from torchvision.models import inception_v3

    from memcontrol.metrics.inception import InceptionPool
    from memcontrol.weights import load_state_dict

    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    net.load_state_dict(load_state_dict(inception_files["torchvision"]))
    with torch.no_grad():
        ref = InceptionPool(net.eval())(F.interpolate(x, size=(299, 299), mode="bicubic", antialias=True))
    assert torch.allclose(f_tv, ref, atol=1e-4)


@pytest.mark.parametrize("spec,option", [
    ({"type": "open_clip", "model": "ViT-B-32", "checkpoint": "missing/clip.safetensors"}, "'checkpoint'"),
    ({"type": "transformers", "path": "missing/dinov2"}, "'path'"),
    ({"type": "torchscript", "path": "missing/sscd.pt"}, "'path'"),
    ({"type": "inception", "weights": "missing/pt_inception.pth"}, "'weights'"),
])
def test_missing_weights_name_file_and_option(spec, option):
    with pytest.raises(MissingWeightsError) as err:
        build_embedder(spec)
    message = str(err.value)
    assert "missing/" in message and option in message and "\n" not in message


def test_unknown_type_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown embedder type 'sift'"):
        build_embedder({"type": "sift"})


def test_training_features_are_cached_by_content(tmp_path, images):
    emb = build_embedder({"type": "pixels", "size": 8})
    first = cached_embed(emb, images, tmp_path)
    files = list(tmp_path.glob("features-*.safetensors"))
    assert len(files) == 1 and torch.allclose(first, emb.embed(images))
    # The second call reads the file: planting other values in it shows they come back.
    save_file({"features": torch.zeros_like(first)}, str(files[0]))
    assert torch.count_nonzero(cached_embed(emb, images, tmp_path)) == 0
    # Other pixels, or another embedder, are another entry.
    cached_embed(emb, images.flip(0), tmp_path)
    cached_embed(build_embedder({"type": "pixels", "size": 4}), images, tmp_path)
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 3
