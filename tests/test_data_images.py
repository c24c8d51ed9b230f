"""PNG, JPEG and TIFF reading, and the tensors the dataset hands to the model."""

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from memcontrol.data import read_image, to_model_tensor
from memcontrol.errors import ConfigError, DataError

RAMP8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))  # 48 x 64
RAMP16 = (RAMP8.astype(np.uint16) * 257)


def test_png_8_and_16_bit_scale_by_their_full_range(tmp_path):
    Image.fromarray(RAMP8).save(tmp_path / "g8.png")
    Image.fromarray(RAMP16).save(tmp_path / "g16.png")
    np.testing.assert_allclose(read_image(tmp_path / "g8.png"), RAMP8 / 255, atol=1e-6)
    g16 = read_image(tmp_path / "g16.png")
    assert g16.dtype == np.float32 and g16.shape == (48, 64)
    np.testing.assert_allclose(g16, RAMP16 / 65535, atol=1e-6)


def test_colour_modes_become_rgb(tmp_path):
    rgb = np.stack([RAMP8, RAMP8[:, ::-1], np.full_like(RAMP8, 7)], -1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full_like(RAMP8, 255)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    for name in ("rgb.png", "rgba.png"):
        np.testing.assert_allclose(read_image(tmp_path / name), rgb / 255, atol=1e-6)
    assert read_image(tmp_path / "palette.png").shape == (48, 64, 3)
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    jpeg = read_image(tmp_path / "photo.jpg")
    assert jpeg.shape == (48, 64, 3) and np.abs(jpeg - rgb / 255).mean() < 0.02


def test_tiff_8_16_bit_planar_and_pages(tmp_path):
    tifffile.imwrite(tmp_path / "g8.tif", RAMP8)
    tifffile.imwrite(tmp_path / "g16.tiff", RAMP16)
    np.testing.assert_allclose(read_image(tmp_path / "g8.tif"), RAMP8 / 255, atol=1e-6)
    np.testing.assert_allclose(read_image(tmp_path / "g16.tiff"), RAMP16 / 65535, atol=1e-6)
    planar = np.stack([RAMP8, RAMP8, RAMP8])
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    assert read_image(tmp_path / "planar.tif").shape == (48, 64, 3)
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:
        tif.write(RAMP8)
        tif.write(255 - RAMP8)
    with pytest.raises(DataError, match="has 2 frames"):
        read_image(tmp_path / "pages.tif")
    np.testing.assert_allclose(read_image(tmp_path / "pages.tif", frame=1), (255 - RAMP8) / 255, atol=1e-6)


def test_float_images_must_already_be_in_unit_range(tmp_path):
    tifffile.imwrite(tmp_path / "ok.tif", (RAMP8 / 255).astype(np.float32))
    np.testing.assert_allclose(read_image(tmp_path / "ok.tif"), RAMP8 / 255, atol=1e-6)
    tifffile.imwrite(tmp_path / "hu.tif", RAMP8.astype(np.float32) * 10 - 1000)
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        read_image(tmp_path / "hu.tif")


def test_unreadable_images_get_one_clear_line(tmp_path):
    Image.fromarray(RAMP8).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "notes.txt").write_text("not an image either")
    tifffile.imwrite(tmp_path / "complex.tif", np.zeros((8, 8), dtype=np.complex64))
    tifffile.imwrite(tmp_path / "bands.tif", np.zeros((8, 8, 5), dtype=np.uint8), photometric="minisblack",
                     planarconfig="contig")
    cases = {"truncated.png": "cannot read PNG", "text.png": "cannot read PNG", "notes.txt": "not a supported image",
             "complex.tif": "unsupported pixel type complex64", "bands.tif": "unsupported image shape (8, 8, 5)",
             "missing.png": "file not found"}
    for name, problem in cases.items():
        with pytest.raises(DataError) as info:
            read_image(tmp_path / name)
        assert problem in info.value.problem and name in str(info.value) and "\n" not in str(info.value), name


def test_format_comes_from_the_bytes_not_the_suffix(tmp_path):
    Image.fromarray(RAMP8).save(tmp_path / "really_a_png.jpg", format="PNG")
    np.testing.assert_allclose(read_image(tmp_path / "really_a_png.jpg"), RAMP8 / 255, atol=1e-6)


def test_model_tensor_centre_crop_and_squash():
    pixels = np.zeros((40, 80), dtype=np.float32)
    pixels[:, 20:60] = 1.0  # the centre square is white, the sides black
    centre = to_model_tensor(pixels, 16, channels=3, crop="center")
    assert centre.shape == (3, 16, 16) and centre.dtype == torch.float32
    # The centre square survives (only the outermost columns blend with the black cut away beside them).
    assert torch.allclose(centre[:, :, 1:-1], torch.ones(3, 16, 14)) and centre.min() > 0.5
    squashed = to_model_tensor(pixels, 16, channels=1, crop="none")
    assert squashed.shape == (1, 16, 16)
    assert squashed[0, :, 0].max() < -0.9 and squashed[0, :, 8].min() > 0.9
    assert squashed.min() >= -1.0 and squashed.max() <= 1.0


def test_model_tensor_channels_and_exact_size_passthrough():
    gray = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    out = to_model_tensor(gray, 64, channels=3)
    assert torch.equal(out[0], out[2])
    np.testing.assert_allclose(out[0].numpy(), gray * 2 - 1, atol=1e-6)
    rgb = np.stack([np.ones((8, 8)), np.zeros((8, 8)), np.zeros((8, 8))], -1).astype(np.float32)
    np.testing.assert_allclose(to_model_tensor(rgb, 8, channels=1).numpy(), 0.299 * 2 - 1, atol=1e-6)
    with pytest.raises(ConfigError):
        to_model_tensor(gray, 64, channels=2)
    with pytest.raises(ConfigError):
        to_model_tensor(gray, 64, crop="random")
