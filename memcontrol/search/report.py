"""The search's outputs beside the study storage: ``pareto.csv`` and ``trials.csv``, the Pareto front as a PNG and
as an interactive plotly page (``pareto_front.html``, offline: plotly.js is inlined), the comparison table printed at
the end, and ``report.html``."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from . import study as st
from .results import Results, Row
from .settings import SearchSettings

BASELINE_MARKERS = {"full fine-tuning": "s", "LoRA on all attention": "^", "bias + norm tuning": "D",
                    "base model, not fine-tuned": "P",
                    "full FT + random caption replacement": "<", "full FT + random token insertion": ">",
                    "full FT + text-embedding noise": "h", "full FT + Wen et al. inference mitigation": "X"}
PLOTLY_SYMBOLS = {"s": "square", "^": "triangle-up", "D": "diamond", "P": "cross", "v": "triangle-down",
                  "<": "triangle-left", ">": "triangle-right", "h": "hexagon", "X": "x"}
CONTROL_MARKER = "v"
# Every figure's 95% interval sits beside it: <name>_ci_low, <name>_ci_high (memcontrol.metrics.intervals).
COLUMNS = ["kind", "number", "label", "state", "memorization", "memorization_ci_low", "memorization_ci_high",
           "quality", "quality_ci_low", "quality_ci_high", "feasible", "pareto", "chosen", "family",
           "n_sites", "lr", "trainable", "trainable_percent", "steps", "step_budget", "early_stopped",
           "train_seconds", "sample_seconds", "metric_seconds", "total_seconds"]
TRAILING = ["reason", "folder"]
SKIP_ATTRS = {*st.RUN_ATTRS, "baseline"}


def reference_rows(results: Results) -> list[Row]:
    """The rows drawn as markers beside the trials: baselines, the base model, the controls."""
    return results.baselines + ([results.base] if results.base else []) + results.controls


def _marker(r: Row) -> str:
    return CONTROL_MARKER if r.kind == "control" else BASELINE_MARKERS.get(r.label, "P")


def _legend(r: Row) -> str:
    return r.label if r.kind in ("base", "control") else f"baseline: {r.label}"


def axis_names(settings: SearchSettings) -> tuple[str, str]:
    from .objectives import quality_name

    return f"memorization ({settings.memorization_metric})", f"quality distance ({quality_name(settings)})"


def _value(row: Row, column: str):
    if column in ("kind", "number", "label", "state", "memorization", "quality", "feasible", "pareto", "chosen"):
        return getattr(row, column)
    return row.get(column)


def write_csv(rows: list[Row], path: Path) -> Path:
    """One line per row: the fixed columns, every other recorded metric, then the reason and the folder."""
    known = SKIP_ATTRS | set(COLUMNS) | set(TRAILING)
    extra = sorted({k for r in rows for k, v in r.attrs.items() if k not in known and not isinstance(v, (list, dict))})
    columns = COLUMNS + extra + TRAILING
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if (v := _value(r, c)) is None else v for c in columns])
    tmp.replace(path)
    return path


def plot_front_png(results: Results, settings: SearchSettings, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xlabel, ylabel = axis_names(settings)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    done = [r for r in results.trials if r.state == "complete" and r.memorization is not None]
    feas = [r for r in done if r.feasible]
    infeas = [r for r in done if not r.feasible]
    ax.scatter([r.memorization for r in feas], [r.quality for r in feas], c="0.6", s=22, label="trials")
    if infeas:
        ax.scatter([r.memorization for r in infeas], [r.quality for r in infeas], c="0.6", marker="x", s=22,
                   label="trials breaking a limit")
    if results.front:
        ax.plot([r.memorization for r in results.front], [r.quality for r in results.front], "-o", c="tab:red",
                ms=5, lw=1.2, label="Pareto front")
    chosen = results.chosen
    if chosen is not None:
        ax.scatter([chosen.memorization], [chosen.quality], marker="*", s=260, c="gold", edgecolors="k",
                   zorder=5, label=f"chosen ({chosen.label})")
    for b in reference_rows(results):
        if b.memorization is None:
            continue
        ax.scatter([b.memorization], [b.quality], marker=_marker(b), s=70,
                   c="tab:green" if b.kind == "control" else "tab:blue", edgecolors="k", zorder=4, label=_legend(b))
    ax.set_xlabel(xlabel + "  (lower is better)")
    ax.set_ylabel(ylabel + "  (lower is better)")
    ax.set_title("MemControl search: memorization vs quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_name(f"tmp{os.getpid()}-{path.name}")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def _hover(r: Row) -> str:
    parts = [r.label, f"memorization {r.memorization:.4g}", f"quality {r.quality:.4g}"]
    if r.get("family"):
        parts.append(f"{r.get('family')} on {r.get('n_sites')} site(s), lr {r.get('lr', 0):.2e}")
    if r.get("trainable_percent") is not None:
        parts.append(f"trainable {r.get('trainable_percent'):.3f}%")
    if r.get("steps") is not None:
        parts.append(f"{r.get('steps')} steps, {r.get('total_seconds', 0):.1f} s")
    return "<br>".join(parts)


def plot_front_html(results: Results, settings: SearchSettings, path: Path) -> Path:
    import plotly.graph_objects as go

    xlabel, ylabel = axis_names(settings)
    fig = go.Figure()
    done = [r for r in results.trials if r.state == "complete" and r.memorization is not None and not r.pareto]
    fig.add_trace(go.Scatter(x=[r.memorization for r in done], y=[r.quality for r in done], mode="markers",
                             name="trials", marker=dict(color="gray", symbol=[
                                 "circle" if r.feasible else "x" for r in done]),
                             text=[_hover(r) for r in done], hoverinfo="text"))
    fig.add_trace(go.Scatter(x=[r.memorization for r in results.front], y=[r.quality for r in results.front],
                             mode="lines+markers", name="Pareto front", line=dict(color="crimson"),
                             text=[_hover(r) for r in results.front], hoverinfo="text"))
    if results.chosen is not None:
        c = results.chosen
        fig.add_trace(go.Scatter(x=[c.memorization], y=[c.quality], mode="markers", name=f"chosen ({c.label})",
                                 marker=dict(symbol="star", size=18, color="gold", line=dict(color="black", width=1)),
                                 text=[_hover(c)], hoverinfo="text"))
    for b in reference_rows(results):
        if b.memorization is None:
            continue
        fig.add_trace(go.Scatter(x=[b.memorization], y=[b.quality], mode="markers", name=_legend(b),
                                 marker=dict(symbol=PLOTLY_SYMBOLS[_marker(b)], size=12,
                                             color="seagreen" if b.kind == "control" else "royalblue",
                                             line=dict(color="black", width=1)),
                                 text=[_hover(b)], hoverinfo="text"))
    fig.update_layout(title="MemControl search: memorization vs quality (both lower is better)",
                      xaxis_title=xlabel, yaxis_title=ylabel, template="plotly_white")
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)
    tmp.replace(path)
    return path


def fmt(value, spec=".4g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def fmt_ci(row: Row, name: str, spec=".4g") -> str:
    """A figure with its 95% interval, "0.653 [0.641, 0.665]"."""
    from ..metrics.intervals import format_interval

    value = getattr(row, name) if name in ("memorization", "quality") else row.get(name)
    return format_interval(value, row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high"), spec)


def comparison_rows(results: Results) -> list[Row]:
    """What the final table compares: the baselines, the base model, the Pareto trials and the chosen one (marked),
    the chosen one sampled again on fresh seeds, and the controls."""
    chosen = results.chosen
    off_front = [chosen] if chosen is not None and chosen.kind == "trial" and not chosen.pareto else []
    return results.baselines + ([results.base] if results.base else []) + results.front + off_front + \
        results.followups


def comparison_table(results: Results, settings: SearchSettings) -> str:
    header = ["", "memorization", "quality", "copy rate", "KID", "trainable %", "steps", "seconds", "state"]
    lines = []
    for r in comparison_rows(results):
        steps = f"{fmt(r.get('steps'))}/{fmt(r.get('step_budget'))}" if r.get("steps") is not None else "-"
        lines.append([("* " if r.chosen else "  ") + r.label, fmt_ci(r, "memorization"), fmt_ci(r, "quality"),
                      fmt_ci(r, "copy_fraction", ".2f"), fmt_ci(r, "kid", ".2g"),
                      fmt(r.get("trainable_percent"), ".3f"), steps, fmt(r.get("total_seconds"), ".1f"), r.state])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [header, *lines]]
    xlabel, ylabel = axis_names(settings)
    tau = settings.objectives["memorization"]["tau"]
    out.append(f"memorization: {xlabel}; quality: {ylabel}; copy rate: share of samples above tau {tau}; "
               "[95% interval: bootstrap over generated samples, Wilson for the copy rate]; * = chosen")
    if results.reevaluation is not None:
        out.append(f"re-evaluated: the chosen candidate sampled again from sampling seed "
                   f"{results.reevaluation.get('sampling_seed')} on (the search used seeds "
                   f"{settings.sampling['seed']}..{settings.sampling['seed'] + settings.sampling['per_prompt'] - 1})")
    if results.controls:
        out.append("controls: random sites of the space with the chosen candidate's family, learning rate and "
                   "trainable share, and LoRA on all attention at its learning rate: which sites, against how much "
                   "training")
    return "\n".join(out)
