"""The synthetic hospital: determinism, patients that differ, findings that show, reports the tokenizer knows,
and DICOM files that read back as the rendered images."""

import csv
import re

import numpy as np
import pydicom
import pytest

from memcontrol.data import (describe_patient, make_phantoms, patient_seeds, read_dicom, render_phantom,
                             render_phantoms)
from memcontrol.data.hospital import MANIFEST_COLUMNS, Encoding
from memcontrol.data.phantoms import render_patients
from memcontrol.errors import ConfigError
from memcontrol.tokenizer import BASE_WORDS


@pytest.fixture(scope="module")
def cohort300():
    seeds = patient_seeds(123, 300)
    images, reports = render_phantoms(seeds, 64)
    return seeds, images, reports


def read_manifest(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_round_trip_through_dicom_for_every_encoding(phantom_cohort):
    rows = read_manifest(phantom_cohort.manifest)
    seeds = patient_seeds(phantom_cohort.seed, phantom_cohort.patients)
    seen = set()
    for index, row in enumerate(rows[: phantom_cohort.patients]):
        image = read_dicom(phantom_cohort.root / row["file"])
        expected, report = render_phantom(seeds[index], 64)
        encoding = Encoding.for_index(index)
        low, high = encoding.stored_range()
        # Exact up to rounding to the stored bit depth.
        assert np.abs(image.pixels - expected).max() <= 0.5 / (high - low) + 1e-6, row["file"]
        assert report == row["text"]
        fields = image.fields
        seen.add((fields["PhotometricInterpretation"], fields["BitsStored"], fields.get("VOILUTFunction"),
                  (fields["RescaleSlope"], fields["RescaleIntercept"])))
    assert {(p, b) for p, b, _, _ in seen} == {(p, b) for p in ("MONOCHROME1", "MONOCHROME2")
                                               for b in (8, 10, 12, 16)}
    assert {v for _, _, v, _ in seen} == {"LINEAR", "LINEAR_EXACT", None}
    assert len({s for _, _, _, s in seen}) >= 3


def test_manifest_has_pseudonyms_and_duplicate_records(phantom_cohort):
    rows = read_manifest(phantom_cohort.manifest)
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert len(rows) == phantom_cohort.patients + phantom_cohort.duplicates
    duplicates = [r for r in rows if r["duplicate"] == "1"]
    assert len(duplicates) == phantom_cohort.duplicates
    for dup in duplicates:
        original = next(r for r in rows if r["subject"] == dup["subject"] and r["duplicate"] == "0")
        assert dup["file"] != original["file"] and dup["text"] == original["text"]
        a, b = (read_dicom(phantom_cohort.root / r["file"]).pixels for r in (original, dup))
        assert np.array_equal(a, b)
    for row in rows:
        ds = pydicom.dcmread(phantom_cohort.root / row["file"], stop_before_pixels=True)
        assert re.fullmatch(r"sub-\d{4}", row["subject"]) and str(ds.PatientID) not in row["subject"]
        assert ds.PatientName and re.fullmatch(r"MRN\d{8}", ds.PatientID) and len(ds.PatientBirthDate) == 8


def test_same_seed_same_files_other_seed_other_patients(tmp_path):
    a = make_phantoms(tmp_path / "a", 5, seed=11, duplicates=1)
    b = make_phantoms(tmp_path / "b", 5, seed=11, duplicates=1)
    c = make_phantoms(tmp_path / "c", 5, seed=12, duplicates=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 7  # 5 patients + 1 duplicate + manifest
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a.read_text() == b.read_text() != c.read_text()
    first = np.array_equal(render_phantom(patient_seeds(11, 1)[0])[0], render_phantom(patient_seeds(12, 1)[0])[0])
    assert not first
    # A bigger cohort with the same seed starts with the same patients.
    assert patient_seeds(11, 3) == patient_seeds(11, 8)[:3]


def test_every_patient_is_far_from_every_other_compared_with_its_own_copies(cohort300):
    seeds, images, _ = cohort300
    flat = images.reshape(len(images), -1).astype(np.float64)
    sq = (flat ** 2).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * flat @ flat.T, 0.0))
    np.fill_diagonal(dist, np.inf)
    nearest = dist.min(1)
    # Rendering is deterministic, and an 8-bit DICOM copy moves a pixel by at most 1/470: a copy sits ~0.1 away,
    # while the closest other patient must be more than 20 times farther.
    again, _ = render_phantom(seeds[0], 64)
    assert np.array_equal(again, images[0])
    copy_distance = np.sqrt(64 * 64) * (0.5 / 235)
    assert nearest.min() > 20 * copy_distance, nearest.min()
    # Patients are spread out rather than clumped: the closest pair is not far below the typical neighbour.
    assert nearest.min() > 0.4 * np.median(nearest)


def test_anatomy_is_the_same_at_every_size():
    seed = patient_seeds(5, 2)
    small, _ = render_phantoms(seed, 64)
    large, _ = render_phantoms(seed, 128)
    pooled = large.reshape(2, 64, 2, 64, 2).mean(axis=(2, 4))
    same = np.sqrt(((pooled - small) ** 2).mean(axis=(1, 2)))
    other = np.sqrt(((pooled[::-1] - small) ** 2).mean(axis=(1, 2)))
    assert same.max() < 0.02 and other.min() > 2 * same.max(), (same, other)


def test_reports_use_the_tokenizer_words_and_mostly_differ(cohort300):
    seeds, _, reports = cohort300
    vocabulary = set(BASE_WORDS)
    for report in reports:
        assert set(re.findall(r"[a-z]+", report)) <= vocabulary, report
        assert len(report.split()) <= 40
    assert len(set(reports)) >= 0.8 * len(reports)
    for seed, report in zip(seeds, reports):
        patient = describe_patient(seed)
        assert report == patient.report and patient.view.lower() in report
        for finding in patient.findings:
            assert finding.grade in report
            if finding.kind == "nodule":
                assert f"{finding.side} {finding.zone} zone" in report
            elif finding.kind == "effusion":
                assert finding.side in report and "effusion" in report
            else:
                assert "cardiomegaly" in report or "enlarged" in report
        if not patient.findings:
            assert "impression" in report


def test_findings_change_the_image_where_they_are(cohort300):
    seeds, _, _ = cohort300
    patients = [describe_patient(s) for s in seeds]
    with_nodule = next(p for p in patients if any(f.kind == "nodule" and f.grade == "large" for f in p.findings))
    with_effusion = next(p for p in patients if any(f.kind == "effusion" and f.grade == "large"
                                                    for f in p.findings))
    for patient, name, column in ((with_nodule, "nodule", 3), (with_effusion, "effusion", 3)):
        image = render_patients([patient], 64)[0]
        patient.anatomy[name] = patient.anatomy[name].copy()
        patient.anatomy[name][column] = 0.0  # the same patient without the finding
        healthy = render_patients([patient], 64)[0]
        diff = image - healthy
        assert diff.max() > 0.1, name
        if name == "nodule":
            assert (np.abs(diff) > 0.02).mean() < 0.03  # a small spot, nothing else changes
        else:
            effusion = next(f for f in patient.findings if f.kind == "effusion")
            # The patient's right is on the image's left.
            half = diff[:, :32] if effusion.side == "right" else diff[:, 32:]
            rest = diff[:, 32:] if effusion.side == "right" else diff[:, :32]
            assert half[32:].mean() > 0.02 and np.abs(rest).max() < 0.01


@pytest.mark.parametrize("kwargs, message", [
    ({"patients": 0}, "patients must be at least 1"),
    ({"patients": 3, "duplicates": 4}, "duplicates must be between 0"),
    ({"patients": 3, "size": 8}, "size must be at least 16"),
])
def test_bad_cohort_options(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_phantoms(tmp_path, seed=0, **kwargs)
