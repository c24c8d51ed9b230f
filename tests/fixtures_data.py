"""Shared test fixtures of the data area (registered in conftest.py).

`phantom_cohort` is a small synthetic hospital on disk (24 patients + 4 duplicate records, 64 px DICOM) with the
fake identifiers of its headers; `assert_no_identifiers` is the identifier guard other areas' tests reuse:

    from fixtures_data import assert_no_identifiers

    def test_audit_leaks_nothing(phantom_cohort, tmp_path, capsys):
        ...run the job on phantom_cohort.manifest, writing to tmp_path...
        out = capsys.readouterr()
        assert_no_identifiers([tmp_path, out.out, out.err], phantom_cohort.identifiers)

The cohort is shared by the whole session: tests must not modify its files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

COHORT_SEED, COHORT_PATIENTS, COHORT_DUPLICATES = 7, 24, 4


@dataclass(frozen=True)
class PhantomCohort:
    root: Path
    manifest: Path
    dicom_paths: tuple[Path, ...]
    identifiers: frozenset[str]  # fake names, name parts, IDs, birth dates and accession numbers of the headers
    seed: int = COHORT_SEED
    patients: int = COHORT_PATIENTS
    duplicates: int = COHORT_DUPLICATES


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory) -> PhantomCohort:
    from memcontrol.data import make_phantoms, patient_identifiers

    root = tmp_path_factory.mktemp("phantom-cohort")
    manifest = make_phantoms(root, COHORT_PATIENTS, COHORT_SEED, duplicates=COHORT_DUPLICATES, size=64)
    dicom_paths = tuple(sorted((root / "images").glob("*.dcm")))
    return PhantomCohort(root, manifest, dicom_paths, frozenset(patient_identifiers(dicom_paths)))


def assert_no_identifiers(paths_or_texts, identifiers) -> None:
    """Fail if any identifier occurs (case-insensitively) in the given texts or in the files under the given paths.

    `Path` items are files or folders (searched recursively, bytes included); `str` items are texts such as
    captured stdout. DICOM files (the inputs, which hold the identifiers by design) are not searched.
    """
    from memcontrol.data import is_dicom_file

    needles = [i.lower() for i in identifiers if i]
    assert needles, "no identifiers to look for: the guard would pass vacuously"
    searched = 0
    for item in paths_or_texts:
        if isinstance(item, Path):
            files = [item] if item.is_file() else sorted(p for p in item.rglob("*") if p.is_file())
            for path in files:
                if is_dicom_file(path):
                    continue
                data = path.read_bytes().lower()
                searched += 1
                leaked = [n for n in needles if n.encode("utf-8") in data]
                assert not leaked, f"patient identifiers {leaked} found in {path}"
        else:
            searched += 1
            leaked = [n for n in needles if n in str(item).lower()]
            assert not leaked, f"patient identifiers {leaked} found in output text: {str(item)[:300]!r}"
    assert searched, "nothing was searched"
