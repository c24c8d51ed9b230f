"""The audit job end to end on the tiny pipeline: outputs, skipped checks, the command line, adapters, and the
identifier guard on the phantom cohort's DICOM files."""

import base64
import csv
import json
import re

import pytest
import torch

from memcontrol.audit import SCHEMA_VERSION, read_prompts, run_audit
from memcontrol.cli import main

FAST = {"audit": {"device": "cpu", "max_prompts": 4,
                  "generation": {"n_per_prompt": 1, "steps": 2, "sampler": "ddim", "batch_size": 4},
                  "noise_norm": {"steps": 1},
                  "quality": {"kid_subsets": 5, "kid_subset_size": 4}}}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# audited prompts\npa chest radiograph\n\nsmall nodule left upper zone\nlarge effusion\n")
    return path


@pytest.fixture(scope="module")
def no_data_audit(tiny_pipe_dir, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit-no-data")
    return run_audit(tiny_pipe_dir, out, prompts=prompts_file, config=FAST), out


def test_without_a_manifest_only_the_noise_norm_runs_and_the_rest_is_explained(no_data_audit):
    metrics, out = no_data_audit
    assert metrics["schema_version"] == SCHEMA_VERSION
    assert set(metrics["checks"]) == {"noise_norm"}
    skipped = {s["check"]: s["reason"] for s in metrics["skipped"]}
    for check in ("copy_detection", "distance_ratio", "tiled_l2"):
        assert "--manifest" in skipped[check]
    assert "--heldout" in skipped["quality"] and "disabled" in skipped["extraction"]
    assert metrics["counts"] == {"prompts": 3, "samples": 3, "training_images": 0, "heldout_images": 0}
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert 0 < summary["mean_noise_norm_ci_low"] <= summary["mean_noise_norm"] <= summary["mean_noise_norm_ci_high"]
    with open(out / "prompts.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["prompt"] for r in rows] == ["pa chest radiograph", "small nodule left upper zone", "large effusion"]
    assert all(float(r["noise_norm"]) > 0 for r in rows)


def test_report_is_one_self_contained_file(no_data_audit):
    _, out = no_data_audit
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Checks not run" in html and "Noise norm" in html
    # Nothing is fetched from elsewhere: no external src/href; every image is an embedded PNG.
    assert not re.search(r'(src|href)="(?!data:)', html)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert images and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert (out / "figures" / "noise_norm.png").is_file()


def test_cli_runs_and_user_errors_are_one_line(tiny_pipe_dir, prompts_file, tmp_path, capsys):
    config = tmp_path / "audit.yaml"
    config.write_text(json.dumps(FAST))  # JSON is YAML
    assert main(["audit", "--model", str(tiny_pipe_dir), "--prompts", str(prompts_file), "--config", str(config),
                 "--out", str(tmp_path / "out")]) == 0
    assert "report:" in capsys.readouterr().out
    assert main(["audit", "--model", str(tmp_path / "nowhere"), "--prompts", str(prompts_file),
                 "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err.strip()
    assert "nowhere" in err and "--model" in err and len(err.splitlines()) == 1
    assert main(["audit", "--model", str(tiny_pipe_dir), "--out", str(tmp_path / "o3")]) == 1
    assert "--manifest" in capsys.readouterr().err


def test_prompts_files(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("id,prompt\n1,a lung\n2,\n3,a heart\n")
    assert read_prompts(csv_path) == ["a lung", "a heart"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert read_prompts(jsonl) == ["one", "two"]
    from memcontrol.errors import DataError

    (tmp_path / "bad.csv").write_text("id,file\n1,x.png\n")
    with pytest.raises(DataError, match="column"):
        read_prompts(tmp_path / "bad.csv")


def test_adapter_is_loaded(tiny_pipe, tiny_pipe_dir, prompts_file, tmp_path, no_data_audit):
    import copy

    from memcontrol.export import export_adapter
    from memcontrol.masks import Mask, adaptable_sites, apply_mask

    unet = copy.deepcopy(tiny_pipe.unet)
    sites = [s for s in adaptable_sites(unet, "lora", "role") if s.kind == "attn2"]
    mask = Mask(sites, "lora", {"rank": 4, "alpha": 4})
    applied = apply_mask(unet, mask)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    export_adapter(tiny_pipe, applied, mask, tmp_path / "adapter")
    metrics = run_audit(tiny_pipe_dir, tmp_path / "out", prompts=prompts_file, adapter=tmp_path / "adapter",
                        config=FAST)
    base, _ = no_data_audit
    assert metrics["inputs"]["adapter"].endswith("adapter")
    assert metrics["checks"]["noise_norm"]["mean"] != pytest.approx(base["checks"]["noise_norm"]["mean"], rel=1e-3)
    from memcontrol.errors import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="--adapter"):
        run_audit(tiny_pipe_dir, tmp_path / "o", prompts=prompts_file, adapter=tmp_path / "none", config=FAST)


def test_no_patient_identifier_reaches_any_output(phantom_cohort, tiny_pipe_dir, tmp_path, capsys):
    from fixtures_data import assert_no_identifiers

    out = tmp_path / "audit"
    config = {"audit": dict(FAST["audit"], features=[{"type": "vae", "tau": "heldout"}, {"type": "pixels"}],
                            extraction={"enabled": True, "n_per_prompt": 3, "max_prompts": 2, "min_clique": 2})}
    config_path = tmp_path / "audit.yaml"
    config_path.write_text(json.dumps(config))
    # The same cohort as training set and held-out set: every check runs, every output file is written.
    code = main(["audit", "--model", str(tiny_pipe_dir), "--manifest", str(phantom_cohort.manifest),
                 "--heldout", str(phantom_cohort.manifest), "--config", str(config_path), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"noise_norm", "copy_detection", "distance_ratio", "tiled_l2", "extraction", "quality"} <= set(
        metrics["checks"])
    assert metrics["counts"]["training_images"] == phantom_cohort.patients + phantom_cohort.duplicates
    # Every headline figure carries its 95% interval (the maximum-free summary has one for each).
    summary = metrics["summary"]
    figures = [k for k in summary if not k.endswith(("_ci_low", "_ci_high"))]
    assert {"KID[vae]", "tiled_l2_fraction", "copy_fraction[vae]"} <= set(figures)
    for name in figures:
        assert summary[f"{name}_ci_low"] <= summary[f"{name}_ci_high"], name
    assert "95% interval" in (out / "report.html").read_text(encoding="utf-8")
    assert_no_identifiers([out, captured.out, captured.err], phantom_cohort.identifiers)


def test_example_config_is_valid(tiny_pipe):
    from pathlib import Path

    from memcontrol.audit import audit_settings
    from memcontrol.metrics import build_embedder

    settings = audit_settings(Path(__file__).resolve().parent.parent / "configs" / "audit.yaml")
    names = [build_embedder(f.model_dump(exclude={"tau"}), pipe=tiny_pipe).name for f in settings.features]
    assert names == ["vae", "pixels64"]


def test_misspelt_setting_is_refused():
    from memcontrol.audit import audit_settings
    from memcontrol.errors import ConfigError

    with pytest.raises(ConfigError, match=r"`audit.generation.step`: unknown; did you mean `steps`\?"):
        audit_settings({"audit": {"generation": {"step": 5}}})
