"""``report.html`` of a search: one self-contained page (pictures embedded) that says what was chosen and why,
how it compares with the baselines, what every trial cost, and shows the chosen candidate's closest copies."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .report import axis_names, comparison_rows, fmt, fmt_ci
from .results import Results, Row
from .settings import SearchSettings
from .study import hide_password
from .worker import baseline_dir, trial_dir

log = logging.getLogger(__name__)

MAX_PAIRS = 12
ROW_HEADER = ["candidate", "state", "memorization [95% CI]", "quality [95% CI]", "copy fraction [95% CI]",
              "trainable %", "family / sites",
              "lr", "steps / budget", "seconds", "reason"]


def _steps(r: Row) -> str:
    return f"{fmt(r.get('steps'))}/{fmt(r.get('step_budget'))}" if r.get("steps") is not None else "-"


def _cells(r: Row) -> list:
    return [("★ " if r.chosen else "") + r.label, r.state, fmt_ci(r, "memorization"), fmt_ci(r, "quality"),
            fmt_ci(r, "copy_fraction", ".2f"), fmt(r.get("trainable_percent"), ".3f"),
            f"{r.get('family', '-')} / {r.get('n_sites', '-')}", fmt(r.get("lr"), ".2e"), _steps(r),
            fmt(r.get("total_seconds"), ".1f"), (r.get("reason") or "")[:200]]


def _folder(settings: SearchSettings, r: Row) -> Path:
    from .followups import FOLLOWUP_ATTR, followup_dir

    if r.kind == "trial":
        return trial_dir(settings.out_dir, r.number)
    if r.kind in ("reevaluation", "control"):
        return followup_dir(settings.out_dir, r.get(FOLLOWUP_ATTR, ""))
    return baseline_dir(settings.out_dir, r.get("baseline", ""))


def _selection_text(settings: SearchSettings, results: Results) -> str:
    sel = settings.selection
    if sel["rule"] != "copy_bound":
        return f"Selection rule: {sel['rule']}."
    return (f"Selection rule copy_bound: among the candidates whose copy rate (share of memorization samples above "
            f"tau {settings.objectives['memorization']['tau']}) is at most {sel['copy_bound']:.0%}, the best quality; "
            "the untuned base model is always a candidate, and a fine-tuned one is chosen over it only when the upper "
            "end of its quality interval is below the base model's quality.")


def claim_section(rep, path: Path) -> None:
    """The claim (``memcontrol.search.claim``, written beside the report as claim.json and claim.md), when the
    search ran the base model and full fine-tuning."""
    if not path.is_file():
        return
    claim = json.loads(path.read_text())
    rep.add_heading("The claim: learns the site, does not copy its patients?")
    rep.add_table([[c["what"], c["figure_text"], c["target"], c["state"]] for c in claim["checks"]],
                  columns=["figure", "value [95% CI]", "target", "state"],
                  caption=f"The chosen candidate's figures: {claim['chosen_source']}. Quality gain recovered: "
                          "(Q_base - Q_chosen) / (Q_base - Q_full); copy rate cut: 1 - rate_chosen / rate_full.")
    if claim["comparisons"]:
        def diff(x):
            return f"{x['value']:.3g} [{x['low']:.3g}, {x['high']:.3g}]"

        rep.add_table([[c["label"], f"{diff(c['copy_difference'])} ({c['copy']})",
                        f"{diff(c['quality_difference'])} ({c['quality']})", "beats it" if c["beats"] else "does not"]
                       for c in claim["comparisons"]],
                      columns=["chosen against", "copy rate difference", "quality difference", "verdict"],
                      caption="Chosen minus row: negative is better for the chosen candidate; 'no different' when "
                              "the 95% interval holds 0. It beats a row when better on one objective and not worse "
                              "on the other.")


def _reevaluation_text(settings: SearchSettings, results: Results) -> str | None:
    again, chosen = results.reevaluation, results.chosen
    if again is None:
        return None
    if again.state != "complete":
        return f"The re-evaluation on fresh seeds did not complete ({again.state}: {again.get('reason', '')})."
    s = settings.sampling
    return (f"Re-evaluated on fresh sampling seeds (from {again.get('sampling_seed')}; every search run used seeds "
            f"{s['seed']} to {s['seed'] + s['per_prompt'] - 1}), so that it is not judged on the samples that made "
            f"it win: memorization {fmt_ci(chosen, 'memorization')} at search time, "
            f"{fmt_ci(again, 'memorization')} again; quality {fmt_ci(chosen, 'quality')} and "
            f"{fmt_ci(again, 'quality')}; copy rate {fmt_ci(chosen, 'copy_fraction', '.2f')} and "
            f"{fmt_ci(again, 'copy_fraction', '.2f')}.")


def copy_pairs_png(settings: SearchSettings, folder: Path) -> Path | None:
    """The candidate's samples beside their nearest training images, most similar first (``copy_pairs.png``)."""
    import numpy as np
    from PIL import Image

    from ..report import pairs_figure, save_figure
    from ..data import run_salt
    from .context import search_data

    path = folder / "neighbours.json"
    if not path.is_file():
        return None
    neighbours = json.loads(path.read_text())
    order = sorted(range(len(neighbours)), key=lambda i: -neighbours[i]["similarity"])[:MAX_PAIRS]
    try:
        train, _ = search_data(settings, run_salt(settings.out_dir))
    except Exception as err:  # noqa: BLE001 - the report is still useful without these pictures
        log.warning("copy pairs left out of the report: the training data cannot be read (%s)", err)
        return None
    generated = [torch.from_numpy(np.asarray(Image.open(folder / "samples" / f"{i:03d}.png").convert("RGB"),
                                             dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for i in order]
    nearest = [train[neighbours[i]["index"]]["pixel_values"] for i in order]
    labels = [f"{neighbours[i]['key']} sim {neighbours[i]['similarity']:.3f}" for i in order]
    return save_figure(pairs_figure(generated, nearest, labels, columns=min(4, len(order))), folder / "copy_pairs.png")


def data_audit_section(rep, settings: SearchSettings) -> None:
    """The training-data audit of the search's data as it was listed (before any de-duplication), with its pairs
    figure (``data_audit_pairs.png``)."""
    from ..data import load_source, run_salt
    from ..data.duplicates import audit_datasets, records_of
    from ..data.duplicates_report import pairs_png, report_section
    from ..report import save_figure

    data, audit, salt = settings.data, settings.data_audit, run_salt(settings.out_dir)
    try:
        train = load_source(data["train"], data["resolution"], data["max_train"], salt=salt)
        heldout = load_source(data["heldout"], data["resolution"], salt=salt)
    except Exception as err:  # noqa: BLE001 - the report is still useful without this section
        log.warning("training-data audit left out of the report: the data cannot be read (%s)", err)
        return
    result = audit_datasets(train, heldout, audit["features"], audit["threshold"], audit["shared_patients"],
                            data["cache_dir"], progress=False)
    fig = pairs_png(result, train, heldout)
    figure = save_figure(fig, settings.out_dir / "data_audit_pairs.png") if fig is not None else None
    report_section(rep, result, figure, records_of(train, "train"))


def write_report(settings: SearchSettings, results: Results, path: Path) -> Path:
    from ..report import HtmlReport

    xlabel, ylabel = axis_names(settings)
    chosen = results.chosen
    counts = results.counts()
    rep = HtmlReport("MemControl search")
    rep.add_text(f"Study '{settings.study_name}' in {hide_password(settings.storage_url)}: budget "
                 f"{settings.n_trials} trials; " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) +
                 f". Memorization: {xlabel}, on samples of training captions. Quality: {ylabel}, on samples of "
                 "held-out captions. Both are lower-is-better. Brackets: 95% intervals (bootstrap over the generated "
                 "samples, the held-out side fixed; Wilson intervals for rates); runs whose intervals overlap are "
                 "not shown apart by these samples.")
    if chosen is not None and results.selection.do_not_finetune:
        rep.add_heading("Do not fine-tune")
        rep.add_text(f"{results.selection.explanation}. {_selection_text(settings, results)} The base model: "
                     f"memorization {fmt_ci(chosen, 'memorization')}, quality {fmt_ci(chosen, 'quality')}, copy rate "
                     f"{fmt_ci(chosen, 'copy_fraction', '.2f')}. No adapter was exported ({settings.out_dir / 'best'} "
                     "says why).", note=True)
    elif chosen is not None:
        rep.add_heading("Chosen candidate")
        rep.add_text(f"{chosen.label}: {results.selection.explanation}. {_selection_text(settings, results)} "
                     "Memorization "
                     f"{fmt_ci(chosen, 'memorization')}, quality {fmt_ci(chosen, 'quality')}, "
                     f"{chosen.get('family')} on {chosen.get('n_sites')} site(s), "
                     f"{fmt(chosen.get('trainable_percent'), '.3f')}% of the UNet trainable. Exported to "
                     f"{settings.out_dir / 'best'}.")
        candidate = _folder(settings, chosen) / "candidate.json"
        if candidate.is_file():
            spec = json.loads(candidate.read_text())
            rep.add_table([[site] for site in spec["sites"]], columns=[f"trained sites ({spec['granularity']} level)"])
            rep.add_text(f"{spec['family']} {spec['family_params']}; training overrides {spec['train']}")
    if chosen is not None and _reevaluation_text(settings, results):
        rep.add_text(_reevaluation_text(settings, results))
    claim_section(rep, settings.out_dir / "claim.json")
    if chosen is not None and results.controls:
        rep.add_heading("Controls: which sites, or how much training?")
        rep.add_table([_cells(r) for r in [chosen, *results.controls]], columns=ROW_HEADER,
                      caption="The chosen candidate, then random masks (sites of the search space drawn at random) "
                              f"with its family, learning rate and trainable share (within "
                              f"{settings.controls['share_tolerance']:.0%}), and LoRA on all attention at its "
                              "learning rate. Where the chosen candidate is not better than its random masks beyond "
                              "the intervals, the search found an amount of training, not a set of sites.")
    if chosen is None:
        rep.add_heading("No candidate")
        rep.add_text("No trial finished with both metrics within the limits; nothing was exported.", note=True)
    rep.add_heading("Pareto front")
    rep.add_figure(settings.out_dir / "pareto_front.png", "Pareto front (star: chosen; blue: baselines). "
                                                          "Interactive version: pareto_front.html.")
    rep.add_heading("Search against the baselines")
    rep.add_table([_cells(r) for r in comparison_rows(results)], columns=ROW_HEADER,
                  caption="Baselines (same data, training budget, samples and metrics), the untuned base model, the "
                          "Pareto trials, the chosen candidate again on fresh seeds, and the controls")
    savings = results.early_stop_savings()
    if savings["stopped"]:
        saved = f", about {savings['seconds_saved']:.0f} s" if savings["seconds_saved"] is not None else ""
        rep.add_text(f"Early stopping on the noise-norm signal stopped {savings['stopped']} trial(s): "
                     f"{savings['steps_saved']} training steps not run, no sampling or metrics for them{saved}.")
    rep.add_heading("All trials")
    rep.add_table([_cells(r) for r in results.baselines + ([results.base] if results.base else []) + results.trials],
                  columns=ROW_HEADER)
    if chosen is not None:
        pairs = copy_pairs_png(settings, _folder(settings, chosen))
        if pairs is not None:
            rep.add_heading("Closest training images of the chosen candidate's samples")
            rep.add_figure(pairs, "Each generated sample beside its nearest training image in the memorization "
                                  "feature space, most similar first.")
    if settings.data_audit["on_duplicates"] != "ignore" or settings.data_audit["deduplicate"]:
        data_audit_section(rep, settings)
    rep.add_heading("Samples")
    for r in [*([chosen] if chosen is not None else []), *results.followups, *results.baselines,
              *([results.base] if results.base is not None and not results.base.chosen else []),
              *[f for f in results.front if not f.chosen]]:
        grid = _folder(settings, r) / "samples.png"
        if grid.is_file():
            rep.add_figure(grid, f"{r.label}: memorization {fmt_ci(r, 'memorization')}, "
                                 f"quality {fmt_ci(r, 'quality')}")
    tmp = path.with_name(f"tmp{os.getpid()}-{path.name}")
    rep.write(tmp)
    return tmp.replace(path)
