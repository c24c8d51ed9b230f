"""Manifests (CSV, TSV, JSONL, Hugging Face metadata.jsonl, plain folders), bad rows, and the dataset on top."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from memcontrol.data import ImageCaptionDataset, read_entries, write_skipped
from memcontrol.errors import ConfigError, DataError


def save_png(path, value: int, size=(20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def pngs(tmp_path):
    for i, value in enumerate((0, 85, 170, 255)):
        save_png(tmp_path / "img" / f"p{i}.png", value)
    return tmp_path


def test_csv_manifest_with_relative_paths_and_subject_keys(pngs):
    (pngs / "m.csv").write_text("file,text,subject\n" + "".join(
        f"img/p{i}.png,report {i},sub-{i % 2}\n" for i in range(4)), encoding="utf-8")
    ds = ImageCaptionDataset(pngs / "m.csv", resolution=16)
    assert len(ds) == 4 and ds.captions == [f"report {i}" for i in range(4)]
    assert ds.keys == ["sub-0", "sub-1", "sub-0", "sub-1"] and ds.skipped == []
    item = ds[2]
    assert item["pixel_values"].shape == (3, 16, 16) and item["caption"] == "report 2" and item["key"] == "sub-0"
    assert torch.allclose(item["pixel_values"], torch.full((3, 16, 16), 170 / 255 * 2 - 1), atol=1e-5)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["key"][1] == "sub-1"


def test_jsonl_and_tsv_manifests_with_other_column_names(pngs):
    (pngs / "m.jsonl").write_text("".join(json.dumps({"image": f"img/p{i}.png", "caption": f"c{i}"}) + "\n"
                                          for i in range(3)), encoding="utf-8")
    ds = ImageCaptionDataset(pngs / "m.jsonl", resolution=8, channels=1)
    assert ds.captions == ["c0", "c1", "c2"] and ds.keys == ["p0", "p1", "p2"]  # no subject column: file stems
    assert ds[0]["pixel_values"].shape == (1, 8, 8)
    (pngs / "m.tsv").write_text("img\treport_text\nimg/p3.png\tlast one\n", encoding="utf-8")
    ds = ImageCaptionDataset(pngs / "m.tsv", image_column="img", text_column="report_text", resolution=8)
    assert ds.captions == ["last one"]
    with pytest.raises(DataError, match=r"no column 'caption_text' \(columns: img, report_text\)"):
        ImageCaptionDataset(pngs / "m.tsv", image_column="img", text_column="caption_text")
    (pngs / "nocol.csv").write_text("picture,text\nimg/p0.png,x\n", encoding="utf-8")
    with pytest.raises(DataError, match="no image column.*--image-column"):
        ImageCaptionDataset(pngs / "nocol.csv")


def test_huggingface_imagefolder_with_metadata_jsonl(pngs):
    folder = pngs / "img"
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"p{i}.png", "text": f"t{i}"}) + "\n"
                                                   for i in (3, 1)), encoding="utf-8")
    ds = ImageCaptionDataset(folder, resolution=8)
    assert ds.captions == ["t3", "t1"] and ds.keys == ["p3", "p1"]


def test_plain_folder_takes_captions_from_text_files_beside_the_images(pngs):
    folder = pngs / "img"
    (folder / "p0.txt").write_text("first\n", encoding="utf-8")
    (folder / "p1.txt").write_text("second", encoding="utf-8")
    (folder / "notes.md").write_text("not an image")
    entries = read_entries(folder)
    assert [e.path.name for e in entries] == ["p0.png", "p1.png", "p2.png", "p3.png"]
    ds = ImageCaptionDataset(folder, resolution=8, on_error="skip")
    assert ds.captions == ["first", "second"]
    assert [p for p, _ in ds.skipped] == [str(folder / "p2.png"), str(folder / "p3.png")]
    assert all("no caption" in problem for _, problem in ds.skipped)


def bad_csv(root):
    """One good row and one row per kind of bad input."""
    save_png(root / "ok.png", 100)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "fake.dcm").write_text("not dicom")
    lines = [b"file,text,subject", b"ok.png,good caption,s1", b"missing.png,a caption,s2", b"ok.png,,s3",
             b"ok.png,caf\xe9 latin-1,s4", b"corrupt.png,broken file,s5", b"fake.dcm,not dicom,s6", b",no path,s7"]
    (root / "bad.csv").write_bytes(b"\n".join(lines) + b"\n")
    return root / "bad.csv"


# Each names its manifest line once: after the problem when the row names a file, as the place when it names none.
EXPECTED_PROBLEMS = ["file not found (bad.csv line 3)", "empty caption (bad.csv line 4)",
                     "caption is not valid UTF-8 (bad.csv line 5)", "cannot read PNG",
                     "not a DICOM file (bad.csv line 7)", "empty image path (column 'file')"]


def test_bad_rows_fail_the_run_by_default_naming_file_and_line(tmp_path):
    manifest = bad_csv(tmp_path)
    with pytest.raises(DataError) as info:
        ImageCaptionDataset(manifest)
    assert str(info.value) == f"{tmp_path / 'missing.png'}: file not found (bad.csv line 3)"


def test_bad_rows_are_skipped_and_recorded_with_on_error_skip(tmp_path):
    ds = ImageCaptionDataset(bad_csv(tmp_path), on_error="skip", resolution=8)
    assert ds.keys == ["s1"] and ds.captions == ["good caption"]
    assert len(ds.skipped) == len(EXPECTED_PROBLEMS)
    for (path, problem), expected in zip(ds.skipped, EXPECTED_PROBLEMS):
        assert expected in problem, (path, problem)
        assert "\n" not in problem
    assert ds.skipped[1][0] == str(tmp_path / "ok.png") and ds.skipped[-1][0] == "bad.csv line 8"
    assert ds.skipped[3][1].endswith("(bad.csv line 6)")  # a file that does not decode names its line too
    assert all(problem.count(" line ") == 1 for _, problem in ds.skipped[:-1]) and " line " not in ds.skipped[-1][1]
    written = write_skipped(tmp_path / "run", ds.skipped)
    with open(written, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path", "problem"] and [tuple(r) for r in rows[1:]] == ds.skipped


def test_broken_jsonl_lines_are_row_problems(tmp_path):
    save_png(tmp_path / "a.png", 10)
    lines = [json.dumps({"file": "a.png", "text": "fine"}).encode(), b"{not json", b'{"file": "a.png", "text": "\xff"}',
             b"[1, 2]", json.dumps({"file": "a.png", "text": 42}).encode(), b""]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines))
    ds = ImageCaptionDataset(tmp_path / "m.jsonl", on_error="skip", resolution=8)
    assert ds.captions == ["fine"]
    invalid = "line is not valid JSON (Expecting property name enclosed in double quotes)"
    assert ds.skipped == [("m.jsonl line 2", invalid),
                          ("m.jsonl line 3", "line is not valid UTF-8 text"),
                          ("m.jsonl line 4", "line is not a JSON object"),
                          (str(tmp_path / "a.png"), "caption is not text (m.jsonl line 5)")]


def test_nothing_usable_and_bad_sources_raise(tmp_path):
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty manifest"):
        ImageCaptionDataset(tmp_path / "empty.csv")
    (tmp_path / "gone.csv").write_text("file,text\nnope.png,x\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no usable images \(1 listed\); first problem: .*nope.png: file not found"):
        ImageCaptionDataset(tmp_path / "gone.csv", on_error="skip")
    with pytest.raises(DataError, match="no such file or folder"):
        ImageCaptionDataset(tmp_path / "absent.csv")
    (tmp_path / "list.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match="not a manifest"):
        ImageCaptionDataset(tmp_path / "list.xlsx")
    with pytest.raises(ConfigError, match="on_error"):
        ImageCaptionDataset(tmp_path / "gone.csv", on_error="ignore")


def test_phantom_cohort_as_a_dataset(phantom_cohort):
    ds = ImageCaptionDataset(phantom_cohort.manifest, resolution=64)
    assert len(ds) == phantom_cohort.patients + phantom_cohort.duplicates and ds.skipped == []
    assert len(set(ds.keys)) == phantom_cohort.patients
    first = ds[0]["pixel_values"]
    assert first.shape == (3, 64, 64) and -1.0 <= first.min() < first.max() <= 1.0
    # A duplicate record is the same subject, the same caption and the same image.
    dup = next(i for i, e in enumerate(ds.entries) if e.path.stem.endswith("_dup1"))
    original = ds.keys.index(ds.keys[dup])
    assert ds.captions[dup] == ds.captions[original]
    assert torch.equal(ds[dup]["pixel_values"], ds[original]["pixel_values"])
