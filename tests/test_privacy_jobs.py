"""No patient identifier reaches any output of `search` and `finetune`, on DICOM files named by their accession
numbers (as hospital exports often are) and listed by a manifest without a key column: keys that come from file
names are pseudonymised with a salt kept in the run folder."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml

from fixtures_data import assert_no_identifiers
from fixtures_search import cheap_search_config, write_config
from memcontrol.data import ImageCaptionDataset, make_phantoms, patient_identifiers, pseudonym
from memcontrol.data.manifest import SALT_FILE


def _named_by_accession(src_manifest: Path, out: Path) -> Path:
    """Copy a phantom cohort's DICOM files to `<AccessionNumber>.dcm` and list them with file and text only."""
    out.mkdir(parents=True)
    rows = []
    with open(src_manifest, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            source = src_manifest.parent / row["file"]
            accession = str(pydicom.dcmread(source, stop_before_pixels=True).AccessionNumber)
            assert accession, "the phantom headers must carry an accession number for this test"
            shutil.copy(source, out / f"{accession}.dcm")
            rows.append({"file": f"{accession}.dcm", "text": row["text"]})
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return out / "manifest.csv"


@pytest.fixture(scope="module")
def named_cohort(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("named-cohort")
    train = _named_by_accession(make_phantoms(root / "a", patients=6, seed=21, duplicates=1, size=64), root / "train")
    heldout = _named_by_accession(make_phantoms(root / "b", patients=4, seed=22, size=64), root / "heldout")
    dicoms = sorted(train.parent.glob("*.dcm")) + sorted(heldout.parent.glob("*.dcm"))
    identifiers = patient_identifiers(dicoms)
    assert {p.stem for p in dicoms} <= identifiers  # the file names are identifiers themselves
    return {"train": train, "heldout": heldout, "identifiers": identifiers}


def _run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "memcontrol.cli", *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_keys_from_file_names_are_pseudonymised_unless_a_key_column_is_named(named_cohort, tmp_path):
    manifest = named_cohort["train"]
    plain = ImageCaptionDataset(manifest, resolution=16)
    salted = ImageCaptionDataset(manifest, resolution=16, salt="s1")
    assert salted.keys == [pseudonym(k, "s1") for k in plain.keys]
    assert not set(salted.keys) & named_cohort["identifiers"]
    assert ImageCaptionDataset(manifest, resolution=16, salt="s2").keys != salted.keys  # the salt matters
    assert len(set(salted.keys)) == len(salted.keys)
    # A key column the user names is kept as it is: it is their pseudonym.
    with_keys = tmp_path / "keyed.csv"
    with open(with_keys, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "text", "patient"])
        writer.writerows([e.path, e.caption, f"p{i}"] for i, e in enumerate(plain.entries))
    assert ImageCaptionDataset(with_keys, resolution=16, key_column="patient", salt="s1").keys == [
        f"p{i}" for i in range(len(plain))]


def test_a_skipped_file_is_recorded_under_its_pseudonym_not_its_name(named_cohort, tmp_path):
    """`skipped.csv` is an output too: a bad file named by its accession number is listed by pseudonym and line."""
    folder = tmp_path / "bad"
    shutil.copytree(named_cohort["train"].parent, folder)
    broken = sorted(folder.glob("*.dcm"))[0]
    broken.write_bytes(b"not a DICOM file")
    salted = ImageCaptionDataset(folder / "manifest.csv", resolution=16, on_error="skip", salt="s1")
    assert len(salted.skipped) == 1
    (shown, problem), = salted.skipped
    assert shown.startswith(pseudonym(broken.stem, "s1")) and "manifest.csv line" in shown
    assert broken.stem not in shown + problem
    # Without a salt (a user's own tool, no run folder) the record keeps the path, to find the file.
    unsalted = ImageCaptionDataset(folder / "manifest.csv", resolution=16, on_error="skip")
    assert unsalted.skipped[0][0] == str(broken)


def test_search_and_finetune_write_no_identifier(named_cohort, tiny_pipe_dir, tmp_path):
    data = {"train": named_cohort["train"], "heldout": named_cohort["heldout"]}
    # Baselines, a trial that fails (non-finite loss) and searched trials: every kind of output. (error.txt, the
    # traceback of an unexpected exception, is searched too whenever one is written.)
    cfg = write_config(tmp_path / "search.yaml", cheap_search_config(
        tiny_pipe_dir, data, search={"n_trials": 3, "enqueue": [{"lr": 1e30}]}, baselines={"enabled": True}))
    search_out = tmp_path / "search"
    printed = _run(["search", "--config", str(cfg), "--out", str(search_out)])

    neighbours = sorted(search_out.glob("*/*/neighbours.json"))
    statuses = [json.loads(p.read_text())["status"] for p in search_out.glob("trials/*/metrics.json")]
    assert neighbours and "failed" in statuses and "ok" in statuses
    assert (search_out / "report.html").is_file() and (search_out / "best").is_dir()
    salt = (search_out / SALT_FILE).read_text().strip()
    stems = {p.stem for p in named_cohort["train"].parent.glob("*.dcm")}
    keys = {row["key"] for path in neighbours for row in json.loads(path.read_text())}
    assert keys and keys <= {pseudonym(s, salt) for s in stems}  # pseudonyms of the training files, salted

    finetune_cfg = tmp_path / "finetune.yaml"
    finetune_cfg.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_pipe_dir), "device": "cpu"},
        "data": {"train": str(named_cohort["train"]), "resolution": 64},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-3},
        "mask": {"family": "lora", "params": {"rank": 2}, "sites": ["mid_block.attentions.0"]}}))
    finetune_out = tmp_path / "finetune"
    printed += _run(["finetune", "--config", str(finetune_cfg), "--out", str(finetune_out)])
    assert (finetune_out / "metrics.json").is_file() and (finetune_out / SALT_FILE).is_file()

    assert_no_identifiers([search_out, finetune_out, printed], named_cohort["identifiers"])
