"""DICOM reading: stored values -> display intensities in [0, 1], and nothing about the patient.

The pipeline follows the DICOM grayscale display chain: stored values (BitsStored respected, signed or not) ->
modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence) -> VOI (WindowCenter/Width with its
VOILUTFunction, or a VOI LUT Sequence) -> [0, 1], inverted for MONOCHROME1. Without any VOI in the file, the
full range the stored bits can hold (after the modality LUT) maps to [0, 1], so that every image of a dataset
gets the same mapping instead of a per-image stretch.

Patient identifiers never leave this module: `DicomImage.fields` is built from an allow-list of technical tags,
pydicom's warnings (which may quote element values, names included) are silenced while reading, and error
messages are scrubbed of the file's identifying values.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder, pixel_array

from ..errors import DataError

# Tags safe to report: how the pixels are encoded and displayed, never who or when.
TECHNICAL_TAGS = (
    "Modality", "SOPClassUID", "PhotometricInterpretation", "Rows", "Columns", "SamplesPerPixel",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames", "PlanarConfiguration",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth", "VOILUTFunction",
    "PixelSpacing", "ImagerPixelSpacing", "ViewPosition", "BodyPartExamined",
)

# Elements whose values identify a patient or a visit; used to scrub messages and by the identifier guard.
IDENTIFYING_TAGS = (
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber",
    "ReferringPhysicianName", "PatientAddress", "PatientTelephoneNumbers",
)

PIP_NAMES = {"gdcm": "python-gdcm"}


@dataclass
class DicomImage:
    pixels: np.ndarray  # float32 in [0, 1]: H x W (grayscale) or H x W x 3 (colour)
    fields: dict = field(default_factory=dict)  # technical tags only (TECHNICAL_TAGS + TransferSyntaxUID)


def read_dicom(path, frame: int | None = None) -> DicomImage:
    """Read one DICOM image; raise `DataError` naming the file for anything that cannot become pixels."""
    path = Path(path)
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = _open(path)
            try:
                stored = _decode(ds, path, frame)
                pixels = _display_values(stored, ds, path)
            except DataError as err:
                raise DataError(path, scrub(err.problem, ds)) from None
            except Exception as exc:  # a malformed file can break pydicom anywhere; report it, do not crash
                raise DataError(path, scrub(f"cannot decode pixel data ({describe_exception(exc)})", ds)) from None
            fields = technical_fields(ds)
    finally:
        pydicom_log.setLevel(level)
    if not np.isfinite(pixels).all():
        raise DataError(path, "pixel values are not finite")
    return DicomImage(pixels.astype(np.float32, copy=False), fields)


def is_dicom_file(path) -> bool:
    """True for files with the DICOM Part 10 marker ('DICM' after the 128-byte preamble)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def technical_fields(ds) -> dict:
    out = {}
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        out["TransferSyntaxUID"] = str(meta.TransferSyntaxUID)
    for name in TECHNICAL_TAGS:
        try:
            value = ds.get(name)
        except Exception:  # an unparsable value is left out rather than failing the read
            continue
        if value is not None and value != "":
            out[name] = _plain(value)
    return out


def patient_identifiers(dicom_paths) -> set[str]:
    """Every identifying string in the headers of these files (names, their parts, IDs, dates in both forms).

    Used by the identifier guard: none of these may appear in anything memcontrol writes or prints.
    """
    found: set[str] = set()
    for path in dicom_paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        found |= identifying_values(ds)
    return found


def identifying_values(ds) -> set[str]:
    values: set[str] = set()
    for name in IDENTIFYING_TAGS:
        try:
            value = ds.get(name)
        except Exception:
            continue
        items = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
        for item in items:
            text = str(item or "").strip()
            if not text:
                continue
            values.add(text)
            if name.endswith("Name"):
                # A leak may print the name re-ordered, so each part (family, given, ...) counts on its own.
                values |= {part for part in re.split(r"[\^=\s]+", text) if len(part) >= 3}
            if name == "PatientBirthDate" and re.fullmatch(r"\d{8}", text):
                values.add(f"{text[:4]}-{text[4:6]}-{text[6:]}")
    return values


def scrub(message: str, ds) -> str:
    for value in sorted(identifying_values(ds), key=len, reverse=True):
        message = re.sub(re.escape(value), "<redacted>", message, flags=re.IGNORECASE)
    return message


def _open(path: Path):
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a folder, not a DICOM file")
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    except Exception as exc:
        raise DataError(path, f"cannot read DICOM file ({describe_exception(exc)})") from None
    # Files without the preamble (older exports) are still DICOM: read them forced, but only accept the result
    # if it holds a recognisable DICOM element, since forcing makes pydicom parse any bytes at all.
    try:
        ds = pydicom.dcmread(path, force=True)
        if any(tag in ds for tag in ("SOPClassUID", "Rows", "Modality")):
            return ds
    except Exception:
        pass
    raise DataError(path, "not a DICOM file")


def _ensure_transfer_syntax(ds) -> None:
    """Files without a file meta header carry native pixels in the encoding their header was read with."""
    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = ds.original_encoding
    ds.file_meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit else
                                      uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)


def _decode(ds, path: Path, frame: int | None) -> np.ndarray:
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID")
        kind = f" ({sop.name})" if sop is not None and hasattr(sop, "name") else ""
        raise DataError(path, f"no pixel data: not an image{kind}")
    _ensure_transfer_syntax(ds)
    syntax = ds.file_meta.TransferSyntaxUID
    _check_decoder(syntax, path)
    frames = _number_of_frames(ds)
    index = choose_frame(path, frame, frames)
    try:
        return pixel_array(ds, index=index if frames > 1 else None)
    except Exception as exc:
        if not syntax.is_compressed:
            raise
        # pydicom lists each installed plugin's complaint after its first line: keep them, and name the others.
        details = "; ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip())
        details = details or describe_exception(exc)
        others = " or ".join(_pip_commands(get_decoder(syntax).missing_dependencies))
        hint = f"; another decoder may succeed: {others}" if others else ""
        raise DataError(path, f"cannot decode {syntax.name} pixel data ({details[:300]}){hint}") from None


def choose_frame(path: Path, frame: int | None, frames: int) -> int:
    """The frame to read. Multi-frame files need an explicit choice: silently taking the first frame could
    train on the wrong image."""
    if frames > 1 and frame is None:
        raise DataError(path, f"has {frames} frames; choose one with the frame option (--frame K, K from 0 to "
                              f"{frames - 1})")
    index = 0 if frame is None else frame
    if not 0 <= index < frames:
        raise DataError(path, f"frame {index} does not exist (the file has {frames} frame(s))")
    return index


def _check_decoder(syntax, path: Path) -> None:
    if not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DataError(path, f"transfer syntax {syntax} ({syntax.name}) is not supported") from None
    if not decoder.is_available:
        raise DataError(path, f"pixel data is compressed as {syntax.name} and no decoder for it is installed; "
                              f"install one: {' or '.join(_pip_commands(decoder.missing_dependencies))}")


def _pip_commands(missing: list[str]) -> list[str]:
    """pydicom's missing-dependency lines as pip commands, e.g. 'pylibjpeg - requires pylibjpeg>=2.0 and
    pylibjpeg-libjpeg>=2.1' -> 'pip install pylibjpeg pylibjpeg-libjpeg'."""
    commands = []
    for line in missing:
        _, _, needs = line.partition("requires")
        packages = [re.split(r"[<>=!~ ]", p.strip())[0] for p in needs.split(" and ")]
        packages = [PIP_NAMES.get(p, p) for p in packages if p and p != "numpy"]
        if packages:
            commands.append(f"pip install {' '.join(packages)}")
    return commands


def _number_of_frames(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _display_values(stored: np.ndarray, ds, path: Path) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds)
        return rgb.astype(np.float64) / (255.0 if rgb.dtype == np.uint8 else 65535.0)
    if stored.ndim == 3:
        if photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
            raise DataError(path, f"unsupported colour photometric interpretation {photometric!r}")
        if stored.shape[-1] != 3:
            raise DataError(path, f"{stored.shape[-1]} samples per pixel; only 1 (grayscale) or 3 (colour) "
                                  "are supported")
        return np.clip(stored.astype(np.float64) / _stored_max(ds, stored), 0.0, 1.0)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(path, f"unsupported photometric interpretation {photometric!r} for one-sample pixels")
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    shown = _voi(values, ds)
    if shown is None:
        low, high = _modality_range(stored, ds)
        shown = (values - low) / (high - low) if high > low else np.zeros_like(values)
    shown = np.clip(shown, 0.0, 1.0)
    return 1.0 - shown if photometric == "MONOCHROME1" else shown


def _stored_max(ds, stored: np.ndarray) -> float:
    bits = int(ds.get("BitsStored") or stored.dtype.itemsize * 8)
    return float(2 ** bits - 1)


def _voi(values: np.ndarray, ds) -> np.ndarray | None:
    """VOI transform to [0, 1]: the first window if the file has one, else its first VOI LUT, else None."""
    center, width = _first_number(ds, "WindowCenter"), _first_number(ds, "WindowWidth")
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if center is not None and width is not None:
        if function == "SIGMOID" and width > 0:
            return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        if function == "LINEAR_EXACT" and width > 0:
            return (values - center) / width + 0.5
        if width > 1:  # LINEAR (the default), PS3.3 C.11.2.1.2.1
            return (values - (center - 0.5)) / (width - 1) + 0.5
        if width == 1:
            return (values >= center - 0.5).astype(np.float64)
    luts = ds.get("VOILUTSequence")
    if luts:
        return _apply_lut(values, luts[0])
    return None


def _apply_lut(values: np.ndarray, item) -> np.ndarray:
    table, first, bits = _lut_table(item)
    # Some writers state 16 bits for 8-bit tables or the reverse; the table's own values settle it.
    top = max(2.0 ** bits - 1, float(table.max(initial=0)))
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, len(table) - 1)
    return table[index] / top


def _lut_table(item) -> tuple[np.ndarray, int, int]:
    """(table, first mapped value, bits per entry) of a Modality or VOI LUT Sequence item."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    if isinstance(data, bytes):
        data = np.frombuffer(data, dtype="<u2" if bits > 8 else np.uint8)
    return np.asarray(data, dtype=np.float64).reshape(-1)[:entries or 65536], first, bits


def _modality_range(stored: np.ndarray, ds) -> tuple[float, float]:
    """The lowest and highest modality value the stored bits can produce."""
    if stored.dtype.kind == "f":
        return float(stored.min()), float(stored.max())
    luts = ds.get("ModalityLUTSequence")
    if luts:
        table = _lut_table(luts[0])[0]
        return float(table.min()), float(table.max())
    bits = int(ds.get("BitsStored") or stored.dtype.itemsize * 8)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    low, high = (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0 ** bits - 1)
    slope = _first_number(ds, "RescaleSlope")
    intercept = _first_number(ds, "RescaleIntercept")
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return ends[0], ends[1]


def _first_number(ds, name: str) -> float | None:
    try:
        value = ds.get(name)
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0] if len(value) else None
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _plain(value):
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value) if isinstance(value, int) else float(value)
    return str(value)


def describe_exception(exc: Exception) -> str:
    """One short line for a library exception, for messages about bad input files."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
