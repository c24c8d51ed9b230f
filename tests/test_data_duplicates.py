"""The training-data audit (memcontrol.data.duplicates, `memcontrol audit-data`) on the bundled private cohort, whose
planted duplicate records are known from the manifest and cohorts.PRIVATE, and on a planted leak: a held-out film
re-exported as real DICOM at another bit depth and window and listed in a training manifest."""

from __future__ import annotations

import csv
import shutil
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml

from memcontrol.cli import main
from memcontrol.data import load_source
from memcontrol.data.cohorts import PRIVATE
from memcontrol.data.duplicates import PIXEL_THRESHOLD, audit_datasets, check_duplicates, deduplicate, pairs_above
from memcontrol.data.hospital import Encoding, _write_dicom
from memcontrol.data.images import read_image
from memcontrol.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
PRIVATE_DIR = REPO / "data" / "hospital" / "private"
HELDOUT_DIR = REPO / "data" / "hospital" / "heldout"


def _rows(manifest: Path) -> list[dict]:
    with open(manifest, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _planted_pairs(manifest: Path) -> set[frozenset]:
    """Manifest lines (header = line 1) of the records the synthetic hospital repeated, paired within a patient."""
    lines = defaultdict(list)
    for line, row in enumerate(_rows(manifest), start=2):
        lines[row["subject"]].append(line)
    groups = [v for v in lines.values() if len(v) > 1]
    assert len(groups) == PRIVATE["duplicates"] and {len(g) for g in groups} == {PRIVATE["records"]}
    return {frozenset(p) for g in groups for p in combinations(g, 2)}


@pytest.fixture(scope="module")
def private_sets():
    train = load_source({"source": str(PRIVATE_DIR / "manifest.csv")}, 64)
    heldout = load_source({"source": str(HELDOUT_DIR / "manifest.csv")}, 64)
    return train, heldout


def test_the_range_search_returns_every_pair_above_the_threshold_exactly():
    # Blocks and chunks smaller than the sets, so that pairs straddle block borders; compared with the whole matrix.
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(300, 16, generator=gen), dim=1)
    a[250:] = torch.nn.functional.normalize(a[:50] + 0.05 * torch.randn(50, 16, generator=gen), dim=1)
    b = torch.nn.functional.normalize(torch.cat([a[:20] + 0.05, torch.randn(100, 16, generator=gen)]), dim=1)
    for refs, same in ((a, True), (b, False)):
        sims = a @ refs.T
        expected = {(i, j) for i, j in zip(*np.nonzero((sims >= 0.9).numpy())) if not (same and j <= i)}
        got = pairs_above(a, refs, 0.9, same_set=same, block=64, chunk_size=37, progress=False)
        assert expected and {(i, j) for i, j, _ in got} == expected
        assert all(abs(s - float(sims[i, j])) < 1e-5 for i, j, s in got)


def test_finds_exactly_the_planted_duplicates_from_the_images_alone(private_sets):
    train, heldout = private_sets
    planted = _planted_pairs(PRIVATE_DIR / "manifest.csv")
    result = audit_datasets(train, heldout, progress=False)
    found = {frozenset((p.a.line, p.b.line)) for p in result.pairs if p.kind == "near_duplicate"}
    true_positives = len(found & planted)
    precision, recall = true_positives / len(found), true_positives / len(planted)
    assert (precision, recall) == (1.0, 1.0), (sorted(map(sorted, found - planted)), len(planted - found))
    # The subject column tells the same story, and the two splits (distinct patients) share no image.
    assert {frozenset((p.a.line, p.b.line)) for p in result.pairs if p.kind == "same_patient"} == planted
    assert result.duplicate_pairs == len(planted)  # each pair is both: counted once
    assert result.leaks == 0
    assert len(result.groups) == PRIVATE["duplicates"]
    keep = deduplicate(result)
    assert len(keep) == len(train) - PRIVATE["duplicates"] * (PRIVATE["records"] - 1)
    kept_keys = [train.keys[i] for i in keep]
    assert len(set(kept_keys)) == len(kept_keys) == PRIVATE["patients"]


def test_the_threshold_separates_the_bundled_cohorts_other_patients(private_sets):
    """Precision holds with room to spare: the most similar two *different* patients of the private cohort stay
    below the threshold calibrated on other patients (bench/calibrate_duplicates.py)."""
    train, _ = private_sets
    from memcontrol.data.duplicates import feature_rows

    rows = feature_rows(train, {"type": "pixels"})
    sims = (rows @ rows.T).numpy()
    subjects = np.array(train.keys)
    different = subjects[:, None] != subjects[None, :]
    assert sims[different].max() < PIXEL_THRESHOLD
    assert sims[~different].min() > PIXEL_THRESHOLD


def _reexport(source: Path, target: Path, index: int) -> None:
    """A film written again as DICOM with another bit depth, photometric interpretation, rescale and display
    window (its brightest and darkest 3% clipped), as a second export of one study would be."""
    image = read_image(source)
    windowed = np.clip((image - 0.03) / 0.94, 0, 1).astype(np.float32)
    identity = {"PatientName": "Leak^Planted", "PatientID": "MRN55550001", "PatientBirthDate": "19600101",
                "PatientSex": "F", "ReferringPhysicianName": "Doe^Jane", "accession": 12345678,
                "StudyDate": "20200101"}
    _write_dicom(target, windowed, Encoding.for_index(index), identity, "AP", 0, "leak", 0)


@pytest.fixture
def leaky_manifest(tmp_path) -> tuple[Path, int]:
    """The private cohort plus one held-out film re-exported (16-bit, MONOCHROME1 where the original is 8-bit
    MONOCHROME2) under a new subject and an MRN-like file name. Returns the manifest and the planted line."""
    root = tmp_path / "train"
    shutil.copytree(PRIVATE_DIR, root)
    held = _rows(HELDOUT_DIR / "manifest.csv")[2]
    assert held["bits_stored"] != "16"
    _reexport(HELDOUT_DIR / held["file"], root / "images" / "MRN55550001.dcm", 7)  # 16 bits, MONOCHROME1
    assert pydicom.dcmread(root / "images" / "MRN55550001.dcm").BitsStored == 16
    rows = _rows(root / "manifest.csv")
    rows.append({**held, "file": "images/MRN55550001.dcm", "subject": "sub-9001", "duplicate": 0})
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv", len(rows) + 1


def test_audit_data_finds_a_planted_leak_and_names_no_patient(leaky_manifest, tmp_path, capsys):
    manifest, line = leaky_manifest
    out = tmp_path / "audit"
    code = main(["audit-data", "--manifest", str(manifest), "--heldout", str(HELDOUT_DIR / "manifest.csv"),
                 "--out", str(out)])
    assert code == 3, capsys.readouterr()  # found something
    pairs = _rows(out / "pairs.csv")
    leaks = [p for p in pairs if p["kind"].startswith("leak")]
    assert [(p["kind"], p["key_a"], p["line_a"], p["line_b"]) for p in leaks] == [("leak_image", "sub-9001",
                                                                                    str(line), "4")]
    assert float(leaks[0]["similarity"]) >= PIXEL_THRESHOLD
    assert sum(p["kind"] == "near_duplicate" for p in pairs) == len(_planted_pairs(PRIVATE_DIR / "manifest.csv"))
    groups = _rows(out / "groups.csv")
    assert len({g["group"] for g in groups}) == PRIVATE["duplicates"]
    assert (out / "pairs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert "Training-data audit" in html and "leak image" in html
    printed = capsys.readouterr()
    for text in [html, (out / "pairs.csv").read_text(), printed.out, printed.err]:
        for secret in ("MRN55550001", "Leak^Planted", "Doe^Jane", "Leak"):
            assert secret not in text


def test_a_patient_in_both_splits_is_a_leak_only_with_shared_pseudonyms(private_sets):
    train, heldout = private_sets
    # The bundled cohorts number subjects per folder: the same "sub-0001" names two different patients.
    assert set(train.keys) & set(heldout.keys)
    assert audit_datasets(train, heldout, progress=False).count("leak_patient") == 0
    shared = audit_datasets(train, heldout, shared_patients=True, progress=False)
    common = set(train.keys) & set(heldout.keys)
    assert shared.count("leak_patient") == sum(train.keys.count(k) for k in common)


def test_bad_manifest_is_refused_before_any_output(tmp_path, capsys):
    bad = tmp_path / "nope.csv"
    assert main(["audit-data", "--manifest", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    other = tmp_path / "other.csv"
    other.write_text("caption\nhello\n")
    assert main(["audit-data", "--manifest", str(PRIVATE_DIR / "manifest.csv"), "--heldout", str(other),
                 "--out", str(tmp_path / "o")]) == 1
    assert "no image column" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # A listed file that is missing: named with its manifest line, still before the output folder exists.
    missing = tmp_path / "missing.csv"
    missing.write_text(f"image,text\n{PRIVATE_DIR / 'images' / 'sub-0001.dcm'},a\nnot-there.dcm,b\n")
    assert main(["audit-data", "--manifest", str(missing), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "not-there.dcm: file not found (missing.csv line 3)" in err and not (tmp_path / "o").exists()
    assert main(["audit-data", "--manifest", str(PRIVATE_DIR / "manifest.csv"), "--features",
                 '{"type": "vae"}', "--out", str(tmp_path / "o")]) == 1
    assert "--threshold" in capsys.readouterr().err


def test_on_duplicates_error_stops_finetune_before_training(tmp_path, capsys):
    result = audit_datasets(load_source({"source": str(PRIVATE_DIR / "manifest.csv")}, 32), progress=False)
    with pytest.raises(ConfigError, match=f"{result.duplicate_pairs} near-duplicate"):
        check_duplicates(result, "error", "finetune")
    assert str(result.duplicate_pairs) in check_duplicates(result, "warn", "finetune")
    assert check_duplicates(result, "ignore", "finetune") is None
    cfg = {"model": {"path": str(tmp_path / "no-model-needed-yet"), "device": "cpu"},
           "data": {"train": str(PRIVATE_DIR / "manifest.csv"), "resolution": 32},
           "data_audit": {"on_duplicates": "error"}, "mask": {"family": "bitfit_norm", "sites": ["mid_block"]}}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["finetune", "--config", str(path), "--out", str(tmp_path / "ft")]) == 1
    err = capsys.readouterr().err
    # Refused on the data, before the (missing) model was even looked for.
    assert f"{result.duplicate_pairs} near-duplicate" in err and "on_duplicates is 'error'" in err


def test_a_job_trains_on_one_record_per_group_when_asked(private_sets, capsys):
    from memcontrol.config import read_config
    from memcontrol.data.duplicates import audit_job_data

    train, heldout = private_sets
    audit = read_config({"data_audit": {"deduplicate": True}}).data_audit.model_dump()
    kept, result = audit_job_data(train, heldout, audit, "finetune")
    printed = capsys.readouterr().out
    assert f"warning: finetune: the training data holds {result.duplicate_pairs} near-duplicate" in printed
    assert len(kept) == PRIVATE["patients"] and sorted(set(kept.keys)) == sorted(set(train.keys))
    assert [kept[i]["key"] for i in range(len(kept))] == kept.keys  # the subset's items are the kept records
    with pytest.raises(ConfigError, match="threshold is needed"):
        read_config({"data_audit": {"features": {"type": "metric_net", "path": "x"}}})
