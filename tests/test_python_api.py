"""The jobs from Python (`memcontrol.search`, `memcontrol.audit`, `memcontrol.finetune`), checked against the files
they write; and the finished study read back through optuna-dashboard's HTTP API, as the README tells people to
look at it."""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import memcontrol
from fixtures_search import cheap_search_config

FAST_AUDIT = {"audit": {"device": "cpu", "max_prompts": 2,
                        "generation": {"n_per_prompt": 1, "steps": 1, "sampler": "ddim", "batch_size": 4},
                        "noise_norm": {"steps": 1}}}


def test_import_memcontrol_loads_no_heavy_library():
    code = ("import sys, memcontrol; heavy = [m for m in ('torch', 'diffusers', 'optuna') if m in sys.modules]; "
            "assert not heavy, heavy; assert callable(memcontrol.search) and callable(memcontrol.finetune)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def search_run(tiny_pipe_dir, search_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("api-search") / "run"
    cfg = cheap_search_config(tiny_pipe_dir, search_data, search={"n_trials": 2})
    result = memcontrol.search(cfg, out=out, storage=str(out / "study.log"), progress=False)
    return result, cfg


def test_search_returns_what_its_run_folder_holds(search_run):
    result, _ = search_run
    assert result.counts == {"complete": 2} and result.problem is None
    with open(result.trials_csv, newline="", encoding="utf-8") as fh:
        rows = {int(r["number"]): r for r in csv.DictReader(fh) if r["kind"] == "trial"}
    assert sorted(rows) == [t.number for t in result.trials]
    for t in result.trials:
        assert float(rows[t.number]["memorization"]) == pytest.approx(t.memorization, rel=1e-9)
        assert float(rows[t.number]["quality"]) == pytest.approx(t.quality, rel=1e-9)
    with open(result.pareto_csv, newline="", encoding="utf-8") as fh:
        assert [int(r["number"]) for r in csv.DictReader(fh)] == [r.number for r in result.front]
    selection = json.loads((result.best / "selection.json").read_text())
    assert selection["trial"] == result.chosen.number and result.chosen in result.front
    assert selection["explanation"] == result.selection.explanation
    assert result.report.is_file() and result.storage == f"journal:{result.out / 'study.log'}"


def test_search_of_a_finished_study_only_rebuilds_and_bad_options_raise(search_run, tmp_path):
    from memcontrol.errors import ConfigError

    result, cfg = search_run
    again = memcontrol.search(cfg, out=result.out, storage=str(result.out / "study.log"), progress=False)
    assert [(t.number, t.memorization) for t in again.trials] == [(t.number, t.memorization) for t in result.trials]
    assert again.chosen.number == result.chosen.number
    with pytest.raises(ConfigError, match="n-trials"):
        memcontrol.search(cfg, out=tmp_path / "bad", n_trials=0)
    assert not (tmp_path / "bad").exists()  # refused before any work


def test_audit_of_the_chosen_adapter(search_run, tiny_pipe_dir, tmp_path):
    result, _ = search_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("pa chest radiograph\nlarge effusion\n")
    audit = memcontrol.audit(tiny_pipe_dir, out=tmp_path / "audit", prompts=prompts, adapter=result.best,
                             config=FAST_AUDIT, seed=3)
    on_disk = json.loads(audit.metrics_file.read_text())
    assert on_disk["summary"] == audit.summary and on_disk["config"]["seed"] == 3
    assert on_disk["inputs"]["adapter_kind"] == "memcontrol" and audit.report.is_file()
    assert audit.summary["mean_noise_norm_ci_low"] <= audit.summary["mean_noise_norm"]


def test_finetune_returns_the_adapter_it_wrote(tiny_pipe_dir, search_data, tmp_path):
    from memcontrol.export import load_adapter
    from memcontrol.models import load_pipeline

    base = cheap_search_config(tiny_pipe_dir, search_data)
    cfg = {k: base[k] for k in ("model", "data")}
    cfg["train"] = {"steps": 2, "batch_size": 2, "lr": 1e-3, "seed": 0}
    mask = {"family": "lora", "params": {"rank": 2}, "sites": ["mid_block.attentions.0"]}
    result = memcontrol.finetune(cfg, out=tmp_path / "tuned", mask=mask)
    record = json.loads((result.adapter / "metrics.json").read_text())
    assert result.steps == record["result"]["steps"] == 2 and result.status == "ok"
    assert record["metrics"]["final_loss"] == pytest.approx(result.final_loss, rel=1e-12)
    assert result.training_items == record["data_size"] and result.skipped_sites == []
    pipe = load_adapter(load_pipeline(tiny_pipe_dir), result.adapter)
    assert any(hasattr(m, "lora_A") for m in pipe.unet.mid_block.modules())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_optuna_dashboard_serves_the_trials_and_their_metrics(search_run):
    """README: `optuna-dashboard DIR/study.log` for a journal file. Started on loopback against the finished study;
    its API must give every trial with both objectives and memcontrol's metrics as user attributes."""
    exe = shutil.which("optuna-dashboard") or str(Path(sys.executable).with_name("optuna-dashboard"))
    if not Path(exe).is_file():
        pytest.skip("optuna-dashboard is not installed (pip install -e '.[dev]')")
    result, _ = search_run
    port = _free_port()
    server = subprocess.Popen([exe, str(result.out / "study.log"), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"optuna-dashboard did not answer: {server.stderr.read()}") from None
                time.sleep(0.5)
        study = next(s for s in studies if s["study_name"] == "memcontrol")
        assert study["directions"] == ["minimize", "minimize"]
        detail = _get(f"{base}/api/studies/{study['study_id']}")
    finally:
        server.terminate()
        server.wait(timeout=10)
    served = {t["number"]: t for t in detail["trials"]}
    assert sorted(served) == [t.number for t in result.trials]
    for row in result.trials:
        trial = served[row.number]
        assert trial["state"] == "Complete" and trial["values"] == [row.memorization, row.quality]
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        numeric = {k: v for k, v in row.attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert {"trainable", "steps", "train_seconds"} <= set(numeric)
        for key, value in numeric.items():
            assert float(attrs[key]) == pytest.approx(value, rel=1e-12), key
    assert {t["number"] for t in detail["best_trials"]} == {r.number for r in result.front}
