"""What an audit writes: ``metrics.json`` (its fields are ``SCHEMA``), ``prompts.csv``, ``samples.csv`` and the
self-contained ``report.html``, from the results the checks gathered in an ``AuditRun``."""

from __future__ import annotations

import csv
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..metrics import distance_name
from ..metrics.intervals import format_interval
from ..report import HtmlReport

SCHEMA_VERSION = 1

# What metrics.json holds (schema_version 1); the README documents each field.
SCHEMA = {
    "schema_version": "int: 1",
    "tool": "'memcontrol audit' and the package version",
    "created": "UTC time, ISO 8601",
    "inputs": "model, model_config, adapter, adapter_kind, manifest, heldout, prompts file (paths as given)",
    "config": "the audit settings in effect (defaults merged with the config file)",
    "counts": "prompts, samples, training_images, heldout_images",
    "summary": "headline numbers: copy fraction and mean similarity per feature space, distance-ratio and "
               "tiled-L2 fractions, extraction fraction, mean noise norm, FD/FID and KID; each with its 95% interval "
               "as <name>_ci_low and <name>_ci_high (Wilson for fractions, bootstrap over generated samples else)",
    "checks": "one entry per check that ran: noise_norm, copy_detection (per feature space), distance_ratio, "
              "tiled_l2, extraction, quality (per-sample lists are in samples.csv, not here)",
    "skipped": "list of {check, reason}",
    "warnings": "list of strings",
    "files": "names of the files written, relative to the output folder",
}


def summary(run) -> dict:
    """Headline numbers, each with its 95% interval (``<name>_ci_low``, ``<name>_ci_high``) where it has one."""
    m = run.state.metrics
    out = {}

    def put(name: str, result: dict, key: str) -> None:
        out[name] = result[key]
        for suffix in ("_ci_low", "_ci_high"):
            if key + suffix in result:
                out[name + suffix] = result[key + suffix]

    for name, r in m.get("copy_detection", {}).items():
        put(f"copy_fraction[{name}]", r, "fraction")
        put(f"mean_similarity[{name}]", r, "mean")
    for check in ("distance_ratio", "tiled_l2", "extraction"):
        if check in m:
            put(f"{check}_fraction", m[check], "fraction")
    if "noise_norm" in m:
        put("mean_noise_norm", m["noise_norm"], "mean")
    if "quality" in m:
        put(m["quality"]["fd_name"], m["quality"], "fd")
        put(distance_name(m["quality"]["features"], "kid"), m["quality"], "kid")
    return out


def write_outputs(run) -> dict:
    """metrics.json, prompts.csv, samples.csv and report.html in the output folder; returns what metrics.json holds."""
    files = {"metrics": "metrics.json", "per_prompt": "prompts.csv", "per_sample": "samples.csv",
             "report": "report.html",
             "figures": [str(p.relative_to(run.out)) for _, _, p in run.state.figures]}
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "tool": f"memcontrol audit {__version__}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": {"python": platform.python_version(), "torch": torch.__version__},
        "inputs": run.inputs,
        "config": run.s.model_dump(mode="json"),
        "counts": {"prompts": len(run.prompts), "samples": len(run.prompt_of_sample),
                   "training_images": len(run.train.images) if run.train else 0,
                   "heldout_images": len(run.heldout.images) if run.heldout else 0},
        "summary": summary(run),
        "checks": run.state.metrics,
        "skipped": run.state.skipped,
        "warnings": run.state.warnings,
        "files": files,
    }
    (run.out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n",
                                          encoding="utf-8")
    _write_csv(run.out, "prompts.csv", {"prompt_index": list(range(len(run.prompts))), "prompt": run.prompts,
                                        **run.state.prompt_columns})
    _write_csv(run.out, "samples.csv", {"sample_index": list(range(len(run.prompt_of_sample))),
                                        **run.state.sample_columns})
    _write_report(run, metrics)
    return metrics

def _write_csv(folder: Path, name: str, columns: dict) -> None:
    with open(folder / name, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(columns))
        for row in zip(*columns.values()):
            writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])

def _write_report(run, metrics: dict) -> None:
    r = HtmlReport("Memorization audit")
    inputs = metrics["inputs"]
    adapter = f" with adapter {inputs['adapter']} ({inputs['adapter_kind']})" if inputs["adapter"] else ""
    r.add_text(f"Model: {inputs['model']}" + adapter
               + f". {metrics['counts']['prompts']} prompts, {metrics['counts']['samples']} generated samples, "
               f"{metrics['counts']['training_images']} training images, "
               f"{metrics['counts']['heldout_images']} held-out images. Created {metrics['created']}.")
    r.add_heading("Summary")
    summary_ = metrics["summary"]
    r.add_table([{"measure": k, "value [95% interval]": format_interval(
        v, summary_.get(f"{k}_ci_low"), summary_.get(f"{k}_ci_high"))}
        for k, v in summary_.items() if not k.endswith(("_ci_low", "_ci_high"))])
    r.add_text("95% intervals: Wilson intervals for fractions; for the other figures, a bootstrap over the "
               "generated samples (over sampling seeds, then samples within them), the training and held-out "
               "images fixed. Two audits whose intervals overlap are not shown apart by these samples.")
    for w in metrics["warnings"]:
        r.add_text(w, note=True)
    if metrics["skipped"]:
        r.add_heading("Checks not run")
        r.add_table(metrics["skipped"])
    explanations = {
        "noise_norm": "Text-conditional noise norm (Wen et al., ICLR 2024): how far the prompt pulls the first "
                      "denoising step away from the unconditional one. Needs no training data; high values "
                      "flag prompts the model may reproduce.",
        "copy_detection": "Each generated image's cosine similarity to its nearest training image in a feature "
                          "space; above tau it counts as a copy. The held-out baseline shows how similar real "
                          "unseen images are to the training set.",
        "distance_ratio": "Pixel-space test: a sample is memorized when its nearest training image is more "
                          "than 3 times closer than the second nearest (identical training records collapsed).",
        "tiled_l2": "The image is cut into tiles; the largest per-tile RMS difference to the nearest training "
                    "image. Below delta the sample is a near-exact copy everywhere.",
    }
    for name in ("noise_norm", "copy_detection", "distance_ratio", "tiled_l2", "extraction", "quality"):
        if name not in metrics["checks"]:
            continue
        r.add_heading(name.replace("_", " ").capitalize())
        if name in explanations:
            r.add_text(explanations[name])
        result = metrics["checks"][name]
        if name == "copy_detection":
            for feat, res in result.items():
                r.add_heading(f"Feature space: {feat}", level=3)
                r.add_table(_flat_rows(res, skip=("attribution",)))
                r.add_table(run.state.tables.get(f"attribution[{feat}]", []), columns=["key", "copies"],
                            caption="Training items copied, and how often", max_rows=30)
        else:
            r.add_table(_flat_rows(result, skip=("attribution",)))
            for table_name in (f"attribution[{name}]", name):
                rows = run.state.tables.get(table_name)
                if rows:
                    r.add_table(rows, max_rows=30)
        for sec, caption, path in run.state.figures:
            if sec == name:
                r.add_figure(path, caption=caption)
    r.add_heading("Settings")
    r.add_table(_flat_rows(metrics["config"]))
    r.write(run.out / "report.html")




def _flat_rows(d: dict, prefix: str = "", skip=()) -> list[dict]:
    """A nested mapping as (field, value) rows; ``skip`` leaves out keys shown as tables of their own."""
    rows = []
    for k, v in d.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            rows.extend(_flat_rows(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            rows.append({"field": f"{prefix}{k}", "value": json.dumps(v, default=_json_default)})
        else:
            rows.append({"field": f"{prefix}{k}", "value": v if not isinstance(v, list) else ", ".join(map(str, v))})
    return rows


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


