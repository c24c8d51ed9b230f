"""`memcontrol make-phantoms` and `memcontrol inspect-data`, and the identifier guard over everything they write."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom.data
from fixtures_data import assert_no_identifiers

from memcontrol.cli import main
from memcontrol.data import patient_identifiers

REPO = Path(__file__).resolve().parent.parent


def memcontrol_command() -> list[str]:
    """The installed console script; from a source checkout without `pip install -e`, the module."""
    script = Path(sys.executable).parent / "memcontrol"
    return [str(script)] if script.exists() else [sys.executable, "-m", "memcontrol.cli"]


def test_make_phantoms_then_inspect_data_leak_no_identifier(tmp_path, capsys):
    out = tmp_path / "hospital"
    assert main(["make-phantoms", "--out", str(out), "--patients", "10", "--seed", "3", "--duplicates", "2"]) == 0
    made = capsys.readouterr()
    assert "wrote 10 patients + 2 duplicate records" in made.out
    identifiers = patient_identifiers(sorted((out / "images").glob("*.dcm")))
    assert len(identifiers) >= 10 * 4  # name, its parts, ID, birth date (two forms), accession, physician

    assert main(["inspect-data", str(out), "--out", str(tmp_path / "run")]) == 0
    text = capsys.readouterr()
    lines = text.out.strip().splitlines()
    assert len(lines) == 13 and all(line.startswith("ok ") and "64x64 gray" in line for line in lines[:12])
    assert lines[-1] == f"inspect-data: 12 items, 12 ok, 0 errors (passed); results in {tmp_path / 'run'}"

    assert main(["inspect-data", str(out / "manifest.csv"), str(out / "images" / "sub-0001.dcm"), "--json"]) == 0
    as_json = capsys.readouterr()
    records = [json.loads(line) for line in as_json.out.splitlines()]
    assert [r["status"] for r in records[:-1]] == ["ok"] * 13 and records[0]["shape"] == [64, 64]
    assert records[-1]["summary"] == {"items": 13, "ok": 13, "errors": 0, "on_error": "fail", "skipped": [],
                                      "passed": True}
    assert_no_identifiers([tmp_path, made.out, made.err, text.out, text.err, as_json.out, as_json.err],
                          identifiers)


def test_bad_items_fail_or_are_skipped_into_the_run_folder(phantom_cohort, tmp_path, capsys):
    (tmp_path / "broken.dcm").write_text("not a DICOM file at all")
    (tmp_path / "bad.csv").write_text(f"file,text\n{phantom_cohort.dicom_paths[0]},fine\nnope.dcm,gone\n",
                                      encoding="utf-8")
    paths = [str(tmp_path / "broken.dcm"), str(tmp_path / "bad.csv"), str(phantom_cohort.dicom_paths[1])]
    assert main(["inspect-data", *paths]) == 1
    failed = capsys.readouterr().out.splitlines()
    assert failed[0] == f"error  {tmp_path / 'broken.dcm'}: not a DICOM file"
    assert failed[2] == f"error  {tmp_path / 'nope.dcm'}: file not found (bad.csv line 3)"
    assert failed[-1] == "inspect-data: 4 items, 2 ok, 2 errors (FAILED)"

    run = tmp_path / "run"
    assert main(["inspect-data", *paths, "--on-error", "skip", "--out", str(run)]) == 0
    skipped = capsys.readouterr().out.splitlines()
    assert skipped[-4:] == ["skipped 2 item(s):", f"  {tmp_path / 'broken.dcm'}: not a DICOM file",
                            f"  {tmp_path / 'nope.dcm'}: file not found (bad.csv line 3)",
                            f"inspect-data: 4 items, 2 ok, 2 skipped (passed); results in {run}"]
    with open(run / "skipped.csv", newline="", encoding="utf-8") as fh:
        assert list(csv.reader(fh)) == [["path", "problem"], [str(tmp_path / "broken.dcm"), "not a DICOM file"],
                                        [str(tmp_path / "nope.dcm"), "file not found (bad.csv line 3)"]]
    assert len((run / "inspect.jsonl").read_text().splitlines()) == 4
    assert_no_identifiers([run, "\n".join(failed + skipped)], phantom_cohort.identifiers)


def test_nothing_loadable_fails_even_when_skipping(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["inspect-data", str(tmp_path / "empty"), "--on-error", "skip"]) == 1
    assert capsys.readouterr().out.strip() == "inspect-data: 0 items, 0 ok, 0 skipped (FAILED)"
    assert main(["inspect-data", str(tmp_path / "absent")]) == 1
    assert "no such file or folder" in capsys.readouterr().out
    (tmp_path / "m.csv").write_text("picture,text\na.png,x\n", encoding="utf-8")
    assert main(["inspect-data", str(tmp_path / "m.csv")]) == 1
    assert "no image column" in capsys.readouterr().out


def test_pydicom_test_folder_gives_one_line_per_file(capsys):
    folder = Path(pydicom.data.__file__).parent / "test_files"
    assert main(["inspect-data", str(folder), "--json"]) == 1
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    summary = records.pop()["summary"]
    assert summary["items"] == len(records) > 100 and 0 < summary["ok"] < summary["items"]
    assert all(r["status"] == "ok" or (r["problem"] and "\n" not in r["problem"]) for r in records)


def test_the_guard_catches_a_leak(phantom_cohort, tmp_path):
    name = sorted(phantom_cohort.identifiers)[0]
    (tmp_path / "report.html").write_text(f"<p>nearest training image: {name.upper()}</p>", encoding="utf-8")
    for leaky in ([tmp_path], [f"log line about {name}"]):
        try:
            assert_no_identifiers(leaky, phantom_cohort.identifiers)
        except AssertionError as err:
            assert name.lower() in str(err)
        else:
            raise AssertionError("the guard missed a leaked identifier")


def test_installed_command_writes_and_checks_a_cohort_without_leaking(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "cohort"
    outputs = []
    for args in (["make-phantoms", "--out", str(out), "--patients", "6", "--seed", "9", "--duplicates", "1"],
                 ["inspect-data", str(out), "--on-error", "skip", "--out", str(tmp_path / "run")]):
        result = subprocess.run([*memcontrol_command(), *args], capture_output=True, text=True, env=env,
                                cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs += [result.stdout, result.stderr]
    assert "inspect-data: 7 items, 7 ok, 0 skipped (passed)" in outputs[2]
    assert_no_identifiers([tmp_path, *outputs], patient_identifiers(sorted((out / "images").glob("*.dcm"))))


def test_output_piped_to_a_closed_reader_ends_quietly():
    # `memcontrol inspect-data ... | head`: the reader is gone before the command writes. A real pipe whose read end
    # is closed; the command stops with the shell's code for SIGPIPE and no traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([*memcontrol_command(), "inspect-data", str(REPO / "data" / "hospital" / "private")],
                                stdout=write_end, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and "Traceback" not in result.stderr, result.stderr[-2000:]
