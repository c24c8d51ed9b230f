"""The DICOM reader: pydicom's bundled files, the display chain computed by hand, bad files, no identifiers out."""

from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from memcontrol.data import read_dicom
from memcontrol.data.dicom import TECHNICAL_TAGS, scrub
from memcontrol.errors import DataError

PYDICOM_FILES = Path(pydicom.data.__file__).parent


def bundled_dicom_files() -> list[Path]:
    """Every DICOM-looking file pydicom ships (read from its folder: get_testdata_files may download)."""
    return sorted(p for p in PYDICOM_FILES.rglob("*")
                  if p.is_file() and (p.suffix == ".dcm" or (p.suffix == "" and "." not in p.name)))


def expected_shape(path: Path):
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    rows, cols, samples = int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1))
    colour = samples == 3 or str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR"
    return (rows, cols, 3) if colour else (rows, cols)


def write_dicom(path: Path, stored: np.ndarray, bits_stored=None, signed=False, **tags) -> Path:
    """A minimal single-frame grayscale DICOM file with the given stored values and extra tags."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    ds.Modality = "OT"
    frames = stored.shape[0] if stored.ndim == 3 else 1
    ds.Rows, ds.Columns = stored.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's own warnings while the test reads the headers
def test_every_bundled_pydicom_file_loads_or_fails_with_a_clear_error():
    files = bundled_dicom_files()
    assert len(files) > 150
    loaded, rejected = 0, 0
    for path in files:
        try:
            pixels = read_dicom(path).pixels
        except DataError as err:
            assert str(path) in str(err) and "\n" not in str(err) and err.problem, path
            rejected += 1
            if "frames" in err.problem:  # multi-frame files load once a frame is chosen
                pixels = read_dicom(path, frame=1).pixels
                assert pixels.shape == expected_shape(path) and np.isfinite(pixels).all(), path
            continue
        assert pixels.dtype == np.float32 and pixels.shape == expected_shape(path), path
        assert np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0, path
        loaded += 1
    assert loaded >= 60 and rejected >= 50, (loaded, rejected)


def test_rle_and_big_endian_decode_to_the_same_pixels_as_the_plain_file():
    plain = read_dicom(PYDICOM_FILES / "test_files" / "MR_small.dcm").pixels
    for name in ("MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"):
        np.testing.assert_allclose(read_dicom(PYDICOM_FILES / "test_files" / name).pixels, plain, atol=1e-6)


def test_compressed_syntax_decodes_or_names_the_plugin_to_install():
    path = PYDICOM_FILES / "test_files" / "MR_small_jpeg_ls_lossless.dcm"
    if get_decoder(JPEGLSLossless).is_available:
        plain = read_dicom(PYDICOM_FILES / "test_files" / "MR_small.dcm").pixels
        np.testing.assert_allclose(read_dicom(path).pixels, plain, atol=1e-6)
    else:
        with pytest.raises(DataError, match=r"JPEG-LS.*pip install pylibjpeg pylibjpeg-libjpeg"):
            read_dicom(path)


def test_12_bit_jpeg_that_pillow_cannot_decode_names_another_decoder():
    path = PYDICOM_FILES / "test_files" / "JPEG-lossy.dcm"
    try:
        pixels = read_dicom(path).pixels
    except DataError as err:
        assert "pip install" in err.problem and "JPEG Extended" in err.problem
    else:
        assert pixels.shape == expected_shape(path)


# Stored values 0..250 with slope 2 and intercept -100 give modality values -100, 0, 100, 200, 300, 400.
STORED = np.array([[0, 50, 100], [150, 200, 250]], dtype=np.uint16)
RESCALE = {"RescaleSlope": 2, "RescaleIntercept": -100}


@pytest.mark.parametrize("window, expected", [
    # LINEAR, c=200, w=401: y = (v - 199.5) / 400 + 0.5, clipped.
    ({"WindowCenter": 200, "WindowWidth": 401}, [[0.0, 0.00125, 0.25125], [0.50125, 0.75125, 1.0]]),
    # LINEAR_EXACT, c=150, w=400: y = (v - 150) / 400 + 0.5, clipped.
    ({"WindowCenter": 150, "WindowWidth": 400, "VOILUTFunction": "LINEAR_EXACT"},
     [[0.0, 0.125, 0.375], [0.625, 0.875, 1.0]]),
    # SIGMOID, c=150, w=400: y = 1 / (1 + exp(-4 (v - 150) / 400)).
    ({"WindowCenter": 150, "WindowWidth": 400, "VOILUTFunction": "SIGMOID"},
     [[1 / (1 + np.exp(2.5)), 1 / (1 + np.exp(1.5)), 1 / (1 + np.exp(0.5))],
      [1 / (1 + np.exp(-0.5)), 1 / (1 + np.exp(-1.5)), 1 / (1 + np.exp(-2.5))]]),
])
def test_modality_lut_then_window_match_hand_computed_values(tmp_path, window, expected):
    path = write_dicom(tmp_path / "w.dcm", STORED, **RESCALE, **window)
    np.testing.assert_allclose(read_dicom(path).pixels, expected, atol=1e-6)
    inverted = write_dicom(tmp_path / "m1.dcm", STORED, **RESCALE, **window)
    ds = pydicom.dcmread(inverted)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(inverted)
    np.testing.assert_allclose(read_dicom(inverted).pixels, 1.0 - np.array(expected), atol=1e-6)


def test_without_window_the_stored_bit_range_maps_to_unit_range(tmp_path):
    clean = np.array([[0, 1000], [2048, 4095]], dtype=np.uint16)
    np.testing.assert_allclose(read_dicom(write_dicom(tmp_path / "a.dcm", clean, bits_stored=12)).pixels,
                               clean / 4095, atol=1e-6)
    # Bits above BitsStored are not part of the value (some writers leave overlay or garbage bits there).
    dirty = clean | np.uint16(0xF000)
    np.testing.assert_allclose(read_dicom(write_dicom(tmp_path / "b.dcm", dirty, bits_stored=12)).pixels,
                               clean / 4095, atol=1e-6)
    signed = np.array([[-2048, -1], [0, 2047]], dtype=np.int16)
    np.testing.assert_allclose(
        read_dicom(write_dicom(tmp_path / "c.dcm", signed, bits_stored=12, signed=True)).pixels,
        (signed + 2048) / 4095, atol=1e-6)


def test_voi_lut_sequence_is_applied(tmp_path):
    item = Dataset()
    item.LUTDescriptor = [4, 10, 8]  # 4 entries, first mapped value 10, 8 bits
    item.add_new("LUTData", "US", [0, 85, 170, 255])
    stored = np.array([[9, 10, 11], [12, 13, 20]], dtype=np.uint16)
    path = write_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=[item])
    np.testing.assert_allclose(read_dicom(path).pixels, [[0, 0, 1 / 3], [2 / 3, 1, 1]], atol=1e-6)


def test_multiframe_needs_an_explicit_frame(tmp_path):
    frames = np.stack([np.full((4, 5), v, dtype=np.uint8) for v in (0, 51, 255)])
    path = write_dicom(tmp_path / "mf.dcm", frames)
    with pytest.raises(DataError, match="has 3 frames.*--frame"):
        read_dicom(path)
    assert read_dicom(path, frame=1).pixels.shape == (4, 5)
    np.testing.assert_allclose(read_dicom(path, frame=1).pixels, 0.2, atol=1e-6)
    with pytest.raises(DataError, match="frame 3 does not exist"):
        read_dicom(path, frame=3)


def test_bad_files_get_one_clear_line(tmp_path, phantom_cohort):
    text = tmp_path / "notes.dcm"
    text.write_text("this is a text file, not an image\n")
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    good = phantom_cohort.dicom_paths[0].read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good[: len(good) - 3000])
    header_only = tmp_path / "header.dcm"
    ds = pydicom.dcmread(phantom_cohort.dicom_paths[0])
    del ds.PixelData
    ds.save_as(header_only)
    cases = {text: "not a DICOM file", empty: "not a DICOM file", truncated: "pixel data",
             header_only: "no pixel data", tmp_path / "missing.dcm": "file not found", tmp_path: "is a folder"}
    for path, problem in cases.items():
        with pytest.raises(DataError) as info:
            read_dicom(path)
        assert problem in info.value.problem and str(path) in str(info.value), (path, info.value)
        assert "\n" not in str(info.value)
        # Nothing from the header of the file the broken ones came from may appear in the message.
        assert not any(i.lower() in str(info.value).lower() for i in phantom_cohort.identifiers)


def test_fields_are_technical_only(phantom_cohort):
    image = read_dicom(phantom_cohort.dicom_paths[0])
    assert set(image.fields) <= set(TECHNICAL_TAGS) | {"TransferSyntaxUID"}
    assert image.fields["Rows"] == 64 and image.fields["Modality"] in ("CR", "DX")
    assert not any(i.lower() in repr(image.fields).lower() for i in phantom_cohort.identifiers)


def test_messages_are_scrubbed_of_the_files_identifiers(phantom_cohort):
    ds = pydicom.dcmread(phantom_cohort.dicom_paths[0], stop_before_pixels=True)
    family = str(ds.PatientName).split("^")[0]
    message = scrub(f"element value {ds.PatientName} / {family.upper()} / {ds.PatientID} is invalid", ds)
    assert family.lower() not in message.lower() and str(ds.PatientID) not in message
    assert message.count("<redacted>") == 3
