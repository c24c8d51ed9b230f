"""A whole search in this process on the tiny model: failing trials, baselines, selection, export, report, resume;
and early stopping on the noise-norm signal."""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from fixtures_search import cheap_search_config, write_config
from memcontrol.cli import main
from memcontrol.search import study as st

optuna.logging.set_verbosity(optuna.logging.WARNING)

MID = "mid_block.attentions.0"
REPO = Path(__file__).resolve().parent.parent
BASE_MODEL = REPO / "data" / "base_model"
HOSPITAL = REPO / "data" / "hospital"


def _load(out):
    return optuna.load_study(storage=f"sqlite:///{out / 'study.db'}", study_name="memcontrol")


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory, tiny_pipe_dir, search_data):
    """Four trials (two queued to fail: a mask that cannot apply, and a learning rate that makes the loss
    non-finite), the three baselines, then selection, export and report."""
    root = tmp_path_factory.mktemp("search-run")
    space = {"granularity": "role", "sites": ["mid_block.*"], "kinds": [], "group_by": "site"}
    switches = [f"on:{MID}.{r}" for r in ("proj_in", "transformer_blocks.0.attn1", "transformer_blocks.0.attn2",
                                           "transformer_blocks.0.ff", "proj_out", "norms")]
    only = lambda name: {s: s == name for s in switches} | {"on:mid_block.resnets.0": False,  # noqa: E731
                                                          "on:mid_block.resnets.1": False}
    cfg = cheap_search_config(
        tiny_pipe_dir, search_data, space=space,
        search={"n_trials": 4, "enqueue": [only(f"on:{MID}.norms") | {"lr": 1e-3},  # LoRA has no layer in norms
                                           only(f"on:{MID}.transformer_blocks.0.attn2") | {"lr": 1e30}]},
        baselines={"enabled": True})
    config = write_config(root / "search.yaml", cfg)
    out = root / "run"
    argv = ["search", "--config", str(config), "--out", str(out)]
    assert main(argv) == 0
    return {"out": out, "argv": argv, "config": cfg}


def test_failing_trials_are_recorded_and_the_study_finishes(finished_search):
    out = finished_search["out"]
    trials = _load(out).get_trials()
    assert len(trials) == 4 and sum(t.state == TrialState.COMPLETE for t in trials) == 2
    mask_error, nan = trials[0], trials[1]
    assert mask_error.state == TrialState.FAIL and "has a layer that lora can train" in mask_error.user_attrs["reason"]
    assert nan.state == TrialState.FAIL and "loss is" in nan.user_attrs["reason"]
    assert nan.user_attrs["steps"] < nan.user_attrs["step_budget"]
    for t in (mask_error, nan):
        recorded = json.loads((out / "trials" / str(t.number) / "metrics.json").read_text())
        assert recorded["status"] == "failed" and recorded["reason"] == t.user_attrs["reason"]


def test_baselines_share_the_budget_and_metrics(finished_search):
    out = finished_search["out"]
    storage = st.open_storage(f"sqlite:///{out / 'study.db'}")
    base = optuna.load_study(storage=storage, study_name="memcontrol.baselines").get_trials()
    # The untuned base model is measured beside them, always.
    assert sorted(t.user_attrs["baseline"] for t in base) == ["base_model", "bitfit_norm", "full_ft", "lora_attention"]
    assert next(t for t in base if t.user_attrs["baseline"] == "base_model").user_attrs["steps"] == 0
    base = [t for t in base if t.user_attrs["baseline"] != "base_model"]
    assert all(t.state == TrialState.COMPLETE for t in base)
    by_name = {t.user_attrs["baseline"]: t for t in base}
    assert by_name["full_ft"].user_attrs["trainable_percent"] == pytest.approx(100.0)
    assert by_name["bitfit_norm"].user_attrs["trainable_percent"] < by_name["lora_attention"].user_attrs[
        "trainable_percent"] < 100
    assert all(t.user_attrs["steps"] == t.user_attrs["step_budget"] == 4 for t in base)
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert [r["kind"] for r in rows].count("baseline") == 3 and [r["kind"] for r in rows].count("trial") == 4
    assert [r["kind"] for r in rows].count("base") == 1


def test_outputs_and_selection(finished_search):
    out = finished_search["out"]
    study = _load(out)
    complete = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    front = {t.number for t in study.best_trials}
    pareto = list(csv.DictReader(open(out / "pareto.csv")))
    assert {int(r["number"]) for r in pareto} == front
    chosen = [int(r["number"]) for r in pareto if r["chosen"] == "True"]
    assert len(chosen) == 1
    selection = json.loads((out / "best" / "selection.json").read_text())
    assert selection["trial"] == chosen[0] and selection["rule"] == "margin"
    # Adapters are kept for Pareto trials only.
    for t in complete:
        assert (out / "trials" / str(t.number) / "adapter").is_dir() == (t.number in front)
    html = (out / "pareto_front.html").read_text()
    assert "Pareto front" in html and "baseline: full fine-tuning" in html
    assert not re.search(r"<script[^>]*\bsrc=", html) and len(html) > 1_000_000  # plotly.js inlined: offline
    report = (out / "report.html").read_text()
    for text in ("Pareto front", "full fine-tuning", "LoRA on all attention", "bias + norm tuning",
                 "has a layer that lora can train", "data:image/png;base64,"):
        assert text in report
    assert (out / "trials" / str(chosen[0]) / "copy_pairs.png").is_file()


def test_every_figure_of_a_trial_carries_its_interval(finished_search):
    out = finished_search["out"]
    rows = [r for r in csv.DictReader(open(out / "trials.csv")) if r["state"] == "complete"]
    pareto = list(csv.DictReader(open(out / "pareto.csv")))
    assert len(rows) == 6 and pareto   # 2 trials, 3 baselines, the base model
    for r in rows + pareto:
        for name in ("memorization", "quality", "mean_similarity", "p95_similarity", "copy_fraction", "fd", "kid"):
            low, value, high = (float(r[f"{name}_ci_low"]), float(r[name]), float(r[f"{name}_ci_high"]))
            assert low <= high, (name, r)
            if name in ("memorization", "mean_similarity", "copy_fraction"):
                assert low <= value <= high, (name, r)   # a mean's percentile interval and a Wilson interval do
        # The objective's interval is the interval of the metric it is.
        assert (r["memorization_ci_low"], r["quality_ci_high"]) == (r["mean_similarity_ci_low"], r["fd_ci_high"])
    recorded = json.loads((out / rows[0]["folder"] / "metrics.json").read_text())["metrics"]
    assert {"fd_ci_low", "kid_ci_high", "copy_fraction_ci_low"} <= set(recorded) and "kid_std" not in recorded
    report = (out / "report.html").read_text()
    assert "quality [95% CI]" in report and re.search(r"\d \[[-\d.e]+, [-\d.e]+\]", report)


def test_exported_candidate_loads_in_a_fresh_diffusers_pipeline(finished_search, tiny_pipe_dir):
    from diffusers import StableDiffusionPipeline

    from memcontrol.export import load_adapter

    out = finished_search["out"]
    fresh = StableDiffusionPipeline.from_pretrained(str(tiny_pipe_dir), safety_checker=None,
                                                    requires_safety_checker=False)
    torch.manual_seed(0)
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 64)
    with torch.no_grad():
        before = fresh.unet(x, t, text).sample
        fresh.load_lora_weights(str(out / "best"))
        after = fresh.unet(x, t, text).sample
    assert not torch.allclose(before, after)
    # The same as the trained adapter of the chosen trial, loaded by memcontrol.
    trial = json.loads((out / "best" / "selection.json").read_text())["trial"]
    ours = StableDiffusionPipeline.from_pretrained(str(tiny_pipe_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    load_adapter(ours, out / "trials" / str(trial) / "adapter")
    with torch.no_grad():
        assert torch.allclose(ours.unet(x, t, text).sample, after, atol=1e-6)


def test_rerun_recomputes_nothing(finished_search, capsys):
    out = finished_search["out"]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/metrics.json")}
    before = [(t.number, t.state, t.values) for t in _load(out).get_trials()]
    assert main(finished_search["argv"]) == 0
    printed = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/metrics.json")} == stamps
    assert [(t.number, t.state, t.values) for t in _load(out).get_trials()] == before
    assert "full fine-tuning" in printed and f"report: {out / 'report.html'}" in printed


def test_finalize_on_two_machines_at_once_never_raises(finished_search):
    """Two machines finishing one shared run folder at the same moment rebuild its outputs together: neither
    fails, and the folder ends with a whole export and report."""
    import subprocess
    import sys

    loop = f"from memcontrol.cli import main\nfor _ in range(10):\n    assert main({finished_search['argv']!r}) == 0\n"
    procs = [subprocess.Popen([sys.executable, "-c", loop], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    for p in procs:
        output, _ = p.communicate(timeout=600)
        assert p.returncode == 0, output[-3000:]
    out = finished_search["out"]
    selection = json.loads((out / "best" / "selection.json").read_text())
    assert (out / "best" / "pytorch_lora_weights.safetensors").is_file() and "trial" in selection
    assert "</html>" in (out / "report.html").read_text()
    assert not list(out.glob("best.*")) and not list(out.glob(".*.tmp*"))  # no temporary left behind


def test_export_trains_again_an_adapter_made_on_another_machine(finished_search):
    """A trial run by a worker on another machine has no adapter in this run folder: the export trains it again
    from the stored parameters, and, training being seeded, gets the same weights (up to float rounding)."""
    from safetensors.torch import load_file

    out = finished_search["out"]
    trial = json.loads((out / "best" / "selection.json").read_text())["trial"]
    adapter = out / "trials" / str(trial) / "adapter"
    original = load_file(str(adapter / "pytorch_lora_weights.safetensors"))
    shutil.rmtree(adapter)
    assert main(finished_search["argv"]) == 0
    again = load_file(str(out / "best" / "pytorch_lora_weights.safetensors"))
    assert (out / "retrained" / str(trial) / "adapter").is_dir()
    assert again.keys() == original.keys()
    assert max((again[k] - original[k]).abs().max().item() for k in original) < 1e-5
    assert max(original[k].abs().max().item() for k in original if "lora_B" in k) > 1e-4  # it did train


def test_changed_space_is_refused_on_resume(finished_search, tmp_path, capsys):
    cfg = copy.deepcopy(finished_search["config"])
    cfg["space"]["sites"] = ["up_blocks.1.*"]
    config = write_config(tmp_path / "changed.yaml", cfg)
    assert main(["search", "--config", str(config), "--out", str(finished_search["out"])]) == 1
    assert "space changed" in capsys.readouterr().err


def test_early_stopping_stops_a_memorizing_trial(tmp_path):
    """On the bundled pretrained base model and the synthetic hospital's private cohort, with the same limit for
    both: a gentle candidate (LoRA on one block, lr 1e-4) keeps the probe prompts' noise norm at the base model's and
    trains its 12 steps; full fine-tuning at lr 1e-3, which memorizes fast, about doubles it within a few steps and is
    stopped there, without sampling or metrics."""
    from memcontrol.masks import enumerate_sites
    from memcontrol.models import load_pipeline

    if not (BASE_MODEL / "model_index.json").is_file():
        pytest.skip(f"the bundled base model is missing: {BASE_MODEL / 'model_index.json'}")
    switches = [f"on:{s.name}" for s in enumerate_sites(load_pipeline(BASE_MODEL).unet, "block")]
    space = {"granularity": "block", "kinds": [], "family": {"choices": ["lora", "unfreeze"]},
             "family_params": {"lora": {"rank": 2, "alpha": 2}}, "train": {"lr": {"choices": [1e-4, 1e-3]}}}
    gentle = {s: s == f"on:{MID}" for s in switches} | {"family": "lora", "lr": 1e-4}
    memorizing = {s: True for s in switches} | {"family": "unfreeze", "lr": 1e-3}
    data = {"train": HOSPITAL / "private" / "manifest.csv", "heldout": HOSPITAL / "heldout" / "manifest.csv"}
    cfg = cheap_search_config(
        BASE_MODEL, data, space=space, train={"steps": 12, "batch_size": 4},
        early_stop={"enabled": True, "every": 2, "probe_prompts": 4, "max_ratio": 1.5},
        search={"n_trials": 2, "enqueue": [gentle, memorizing]})
    out = tmp_path / "run"
    assert main(["search", "--config", str(write_config(tmp_path / "s.yaml", cfg)), "--out", str(out)]) == 0
    gentle, memorizing = _load(out).get_trials()
    assert gentle.state == TrialState.COMPLETE and gentle.user_attrs["steps"] == 12
    assert memorizing.state == TrialState.PRUNED, memorizing.user_attrs
    steps = memorizing.user_attrs["steps"]
    assert steps % 2 == 0 and steps < memorizing.user_attrs["step_budget"] == 12
    assert memorizing.user_attrs["early_stopped"] is True and memorizing.user_attrs["train_seconds"] > 0
    assert "noise norm" in memorizing.user_attrs["reason"]
    assert "sample_seconds" not in memorizing.user_attrs and not (out / "trials" / "1" / "samples.png").exists()
    assert f"stopped 1 trial(s): {12 - steps} training steps not run" in (out / "report.html").read_text()
