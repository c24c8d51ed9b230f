"""Reading one image file (PNG, JPEG, TIFF or DICOM) into float32 intensities in [0, 1].

The file's own bytes decide its format (a PNG named .jpg is still read); the suffix only matters for files
whose first bytes match no format. Integer pixels are scaled by their type's full range (8 bit by 255, 16 bit
by 65535) so that one dataset shares one mapping; float pixels must already lie in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from ..errors import DataError
from .dicom import choose_frame, describe_exception, read_dicom

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff",
                  ".dcm": "dicom", ".dicom": "dicom"}
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
          (b"II+\x00", "tiff"), (b"MM\x00+", "tiff"))
# Pillow modes that Pillow itself converts to RGB without losing what the image shows.
_TO_RGB = {"P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"}


def image_format(path) -> str | None:
    """'png', 'jpeg', 'tiff', 'dicom' or None, from the first bytes, else from the suffix."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    if head[128:132] == b"DICM":
        return "dicom"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return IMAGE_SUFFIXES.get(Path(path).suffix.lower())


def read_image(path, frame: int | None = None) -> np.ndarray:
    """float32 H x W (grayscale) or H x W x 3 (colour) in [0, 1]; `DataError` naming the file otherwise.

    `frame` picks one frame of a multi-frame file (DICOM, TIFF pages, animated PNG); without it such files are
    refused.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a folder, not an image file")
    kind = image_format(path)
    if kind == "dicom":
        return read_dicom(path, frame).pixels
    if kind == "tiff":
        return _read_tiff(path, frame)
    if kind in ("png", "jpeg"):
        return _read_pillow(path, frame, kind)
    raise DataError(path, "not a supported image (PNG, JPEG, TIFF or DICOM)")


def _read_tiff(path: Path, frame: int | None) -> np.ndarray:
    try:
        with tifffile.TiffFile(path) as tif:
            pages = len(tif.pages)
            index = choose_frame(path, frame, pages)
            array = tif.pages[index].asarray()
    except DataError:
        raise
    except Exception as exc:  # tifffile raises many types on malformed files
        raise DataError(path, f"cannot read TIFF ({describe_exception(exc)})") from None
    return to_unit_range(_channels_last(array, path), path)


def _read_pillow(path: Path, frame: int | None, kind: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            index = choose_frame(path, frame, getattr(im, "n_frames", 1))
            im.seek(index)
            im.load()
            array = _pillow_array(im, path)
    except DataError:
        raise
    except Exception as exc:  # truncated or corrupt files, decompression bombs, unknown codecs
        raise DataError(path, f"cannot read {kind.upper()} ({describe_exception(exc)})") from None
    return to_unit_range(array, path)


def _pillow_array(im: Image.Image, path: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("1", "L"):
        return np.asarray(im.convert("L"))
    if mode == "LA":
        return np.asarray(im.getchannel("L"))
    if mode == "RGB":
        return np.asarray(im)
    if mode in _TO_RGB:
        return np.asarray(im.convert("RGB"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        return np.asarray(im)
    raise DataError(path, f"unsupported image mode {mode!r}")


def _channels_last(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (separate) colour planes
    if array.ndim == 3 and array.shape[-1] in (1, 2):
        array = array[..., 0]  # grayscale, with or without alpha
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]  # drop alpha
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3):
        return array
    raise DataError(path, f"unsupported image shape {tuple(array.shape)} (expected H x W or H x W x 3)")


def to_unit_range(array: np.ndarray, path) -> np.ndarray:
    """Integer or float pixels -> float32 in [0, 1]."""
    kind = array.dtype.kind
    if kind == "b":
        out = array.astype(np.float32)
    elif kind in "ui":
        if array.dtype.itemsize == 1 and kind == "u":
            out = array.astype(np.float32) / 255.0
        elif array.size and (array.min() < 0 or array.max() > 65535):
            raise DataError(path, f"{array.dtype} pixels outside 0..65535 are not supported; store 8 or 16 bit")
        else:
            out = array.astype(np.float32) / 65535.0
    elif kind == "f":
        out = array.astype(np.float32)
        if not np.isfinite(out).all():
            raise DataError(path, "pixel values are not finite")
        if out.size and (out.min() < 0.0 or out.max() > 1.0):
            raise DataError(path, f"float pixels range {out.min():.4g}..{out.max():.4g}, outside [0, 1]; scale "
                                  "them to [0, 1] or store 8/16-bit integers")
    else:
        raise DataError(path, f"unsupported pixel type {array.dtype}")
    if out.ndim == 2 or (out.ndim == 3 and out.shape[-1] == 3):
        return out
    raise DataError(path, f"unsupported image shape {tuple(out.shape)} (expected H x W or H x W x 3)")

