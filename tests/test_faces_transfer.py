"""The real-face cohorts (data/faces, from scikit-image's lfw_subset) and the mask-transfer bench on them
(bench/transfer_faces.py) at tiny sizes, with the real bundled base model."""

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
FACES = REPO / "data" / "faces"


def _module(folder: str, name: str):
    sys.path.insert(0, str(REPO / folder))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / folder))


def _rows(split: str) -> list[dict]:
    with (FACES / split / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_faces_split_as_stated_and_named_by_index_only():
    make = _module("pipelines", "make_faces")
    private, heldout = _rows("private"), _rows("heldout")
    records = {}
    for row in private:
        records[row["subject"]] = records.get(row["subject"], 0) + 1
    assert sorted(records.values(), reverse=True) == [8, 8, 8, 8, 1, 1, 1, 1]
    assert len(private) == 36 and len(heldout) == 92 and len(records) + len(heldout) == 100
    for row in private + heldout:
        assert re.fullmatch(r"images/\d{4}\.png", row["file"]), row["file"]
        assert re.fullmatch(r"face-\d{4}", row["subject"]), row["subject"]
        assert row["text"] == make.CAPTION
    on_disk = {p.relative_to(FACES).as_posix() for p in FACES.rglob("*") if p.is_file()}
    assert all(re.fullmatch(r"(private|heldout)/(manifest\.csv|images/\d{4}\.png)", p) for p in on_disk), on_disk
    assert len(on_disk) == 2 + 8 + 92
    # The two splits hold different faces: positions in lfw_subset, and the images themselves.
    private_idx, heldout_idx = make.split_faces()
    assert not set(private_idx) & set(heldout_idx) and len(set(private_idx) | set(heldout_idx)) == 100


def test_committed_faces_are_what_the_pipeline_writes(tmp_path):
    make = _module("pipelines", "make_faces")
    make.main(["--out", str(tmp_path)])
    for path in FACES.rglob("*"):
        if path.is_file():
            assert (tmp_path / path.relative_to(FACES)).read_bytes() == path.read_bytes(), path


def test_private_and_heldout_faces_are_disjoint_images():
    bench = _module("bench", "transfer_faces")
    from memcontrol.config import read_config

    faces = bench.Faces.load(read_config(REPO / "configs" / "transfer_faces.yaml"))
    assert faces.private.shape == (8, 3, 64, 64) and faces.heldout.shape == (92, 3, 64, 64)
    # Pearson correlation on 32 x 32 grey, computed independently: no held-out face is a private face.
    def grey32(x):
        return torch.nn.functional.interpolate(x.mean(1, keepdim=True), size=32, mode="area").flatten(1).numpy()

    corr = np.corrcoef(np.concatenate([grey32(faces.heldout), grey32(faces.private)]))[:92, 92:]
    assert corr.max() < 0.99, corr.max()
    measure = bench.Measure(faces, samples=6, resamples=50)
    # tau is the largest held-out correlation (1% of 92 held-out faces rounds down to none above it).
    assert measure.tau == pytest.approx(corr.max(), abs=1e-5)


def test_transfer_bench_gives_every_row_with_intervals(tmp_path):
    bench = _module("bench", "transfer_faces")
    kw = dict(lrs=(1e-3, 5e-3), samples=6, controls=1, lora=True, steps=2,
              sampling={**bench.SAMPLING, "steps": 2}, resamples=200)
    result = bench.run(None, REPO / "configs" / "transfer_faces.yaml", tmp_path, **kw)
    table = result["table"]
    assert list(table) == ["base model", "full fine-tuning", "transferred mask, re-evaluated", "random mask 1",
                           "LoRA on all attention"]
    assert result["lr"] in kw["lrs"] and set(result["search"]) == {"0.001", "0.005"}
    for label, row in table.items():
        assert row["n"] == 6
        for name in ("copy_rate", "similarity"):
            assert row[f"{name}_ci_low"] <= row[name] + 1e-9 and row[name] <= row[f"{name}_ci_high"] + 1e-9, \
                (label, name, row)
        # FD's bootstrap interval need not hold its point value (a resample repeats rows, which inflates FD).
        assert 0 <= row["fd_ci_low"] < row["fd_ci_high"] < np.inf and row["fd"] > 0, (label, row)
    assert table["full fine-tuning"]["percent"] == pytest.approx(100.0)
    mask, control = table["transferred mask, re-evaluated"], table["random mask 1"]
    assert abs(control["percent"] / mask["percent"] - 1) <= 0.25
    assert table["LoRA on all attention"]["percent"] > mask["percent"]
    assert {"FD base - full fine-tuning", "fd mask - random mask 1"} <= set(result["comparisons"])
    # The re-evaluation draws from seeds the search did not use.
    name = f"mask-lr{result['lr']:g}"
    from safetensors.torch import load_file

    search = load_file(str(tmp_path / f"{name}.seed0.samples.safetensors"))["samples"]
    fresh = load_file(str(tmp_path / f"{name}.seed{result['fresh_seed']}.samples.safetensors"))["samples"]
    assert result["fresh_seed"] == 6 and not torch.allclose(search, fresh)
    # A re-run reuses the finished rows and gives the same figures.
    again = bench.run(None, REPO / "configs" / "transfer_faces.yaml", tmp_path, **kw)
    assert json.dumps(again["table"], sort_keys=True) == json.dumps(table, sort_keys=True)
    assert (tmp_path / "samples.png").stat().st_size > 0
