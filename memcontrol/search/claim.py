"""The claim of a finished search, with its intervals: does the chosen candidate learn the held-out site without
copying the training set, and does it beat the rows it is compared with?

Figures (each with a 95% interval; the thresholds of the issue that asked for them are fixed here, before any run):

* full fine-tuning's copy rate (Wilson), and, given real held-out images that are not in the reference
  (``floor_features``), the share of the base model's quality gap it closes, (Q_base - Q_full) / (Q_base - Q_floor);
* **quality gain recovered** by the chosen candidate, (Q_base - Q_chosen) / (Q_base - Q_full), from its
  *re-evaluation* on fresh sampling seeds where there is one (its search-time figures won a selection among noisy
  measurements and are biased in its favour);
* **copy rate cut**, 1 - rate_chosen / rate_full (independent Jeffreys posteriors of the two rates: a bootstrap
  cannot widen 0 of n);
* against every other row (controls, baselines, published mitigations): the difference in copy rate (Newcombe's
  interval) and in quality, each judged *better*, *worse* or *no different* (the interval holds 0) for the chosen
  candidate; it beats a row when it is better on one objective and not worse on the other.

Quality Q is the Fréchet distance of a run's quality samples (``quality_features.safetensors`` in its folder) to the
held-out reference. Every run of a study samples the same held-out captions in the same order, so one matrix of
resampled positions is shared by all of them: intervals of differences and ratios are paired by caption (the
re-evaluation drew other noise for the same captions). The reference side is held fixed, as everywhere else.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..metrics.intervals import (Interval, bootstrap_indices, paired, percentile_interval, rate_difference,
                                 rate_ratio_cut, resampled_frechet, wilson)

# What the claim is measured against (fixed before the runs were made).
FULL_COPY_TARGET = 0.30       # full fine-tuning copies at least this share of its samples
RECOVERY_TARGET = 0.80        # the chosen candidate recovers at least this share of full fine-tuning's quality gain
CUT_TARGET = 0.80             # ... while cutting full fine-tuning's copy rate by at least this share
# The checks' names, as claim.md and claim.json give them (``what``), and as readers of claim.json look them up.
FULL_COPY_CHECK = "full fine-tuning's copy rate"
RECOVERY_CHECK = "quality gain recovered by the chosen candidate"
CUT_CHECK = "copy rate cut by the chosen candidate"


@dataclass
class RunFigures:
    label: str
    kind: str
    folder: Path
    copies: int
    n: int
    quality: Interval
    trainable_percent: float | None
    features: np.ndarray = field(repr=False, default=None)

    @property
    def copy_rate(self) -> Interval:
        return wilson(self.copies, self.n)


@dataclass
class Comparison:
    label: str
    copy_difference: Interval       # chosen - row (negative: the chosen copies less)
    quality_difference: Interval    # chosen - row (negative: the chosen is closer to the held-out site)

    @staticmethod
    def verdict(diff: Interval) -> str:
        if not diff.excludes(0.0):
            return "no different"
        return "better" if diff.high < 0 else "worse"

    @property
    def beats(self) -> bool:
        verdicts = {self.verdict(self.copy_difference), self.verdict(self.quality_difference)}
        return "better" in verdicts and "worse" not in verdicts


@dataclass
class Claim:
    runs: list[RunFigures]
    chosen: RunFigures | None
    chosen_source: str                      # "re-evaluation on fresh seeds" or "search-time samples"
    full: RunFigures | None
    base: RunFigures | None
    full_gap_closed: Interval | None
    recovery: Interval | None
    copy_cut: Interval | None
    comparisons: list[Comparison]
    do_not_finetune: bool = False

    def checks(self) -> list[tuple[str, Interval | None, str, float]]:
        """(what, figure, comparison, target) for the claim's three thresholds."""
        return [(FULL_COPY_CHECK, self.full.copy_rate if self.full else None, ">=", FULL_COPY_TARGET),
                (RECOVERY_CHECK, self.recovery, ">=", RECOVERY_TARGET),
                (CUT_CHECK, self.copy_cut, ">=", CUT_TARGET)]

    def to_dict(self) -> dict:
        def iv(x):
            return None if x is None else {"value": x.value, "low": x.low, "high": x.high}

        return {
            "chosen": self.chosen.label if self.chosen else None, "chosen_source": self.chosen_source,
            "do_not_finetune": self.do_not_finetune,
            "runs": [{"label": r.label, "kind": r.kind, "folder": str(r.folder), "copies": r.copies, "n": r.n,
                      "copy_rate": iv(r.copy_rate), "quality": iv(r.quality),
                      "trainable_percent": r.trainable_percent} for r in self.runs],
            "full_gap_closed": iv(self.full_gap_closed), "recovery": iv(self.recovery), "copy_cut": iv(self.copy_cut),
            "checks": [{"what": w, "figure": iv(f), "figure_text": _pct(f), "target": f"{op} {t:.0%}",
                        "met": _met(f, t)[0], "shown": _met(f, t)[1], "state": _state(f, t)}
                       for w, f, op, t in self.checks()],
            "comparisons": [{"label": c.label, "copy_difference": iv(c.copy_difference),
                             "quality_difference": iv(c.quality_difference),
                             "copy": Comparison.verdict(c.copy_difference),
                             "quality": Comparison.verdict(c.quality_difference), "beats": c.beats}
                            for c in self.comparisons],
        }

    def to_markdown(self, quality_name: str = "FD") -> str:
        lines = [f"| run | copy rate | {quality_name} | trainable % |", "|---|---|---|---|"]
        for r in self.runs:
            star = " **(chosen)**" if r is self.chosen else ""
            share = "-" if r.trainable_percent is None else f"{r.trainable_percent:.2f}"
            lines.append(f"| {r.label}{star} | {r.copies}/{r.n}: {_pct(r.copy_rate)} | {r.quality} | {share} |")
        lines.append("")
        if self.do_not_finetune:
            lines.append("The selection chose the base model: do not fine-tune (no fine-tuned candidate was safe and "
                         "better). There is no gain to recover.")
        if self.full_gap_closed is not None:
            lines.append(f"- full fine-tuning closes {_pct(self.full_gap_closed)} of the base model's quality gap to "
                         "real held-out images")
        for what, figure, op, target in self.checks():
            lines.append(f"- {what}: {_pct(figure)} (target {op} {target:.0%}): {_state(figure, target)}")
        if self.chosen is not None:
            lines.append(f"  (the chosen candidate's figures: {self.chosen_source})")
        if self.comparisons:
            lines += ["", "| chosen candidate against | copy rate difference | quality difference | verdict |",
                      "|---|---|---|---|"]
            for c in self.comparisons:
                verdict = "beats it" if c.beats else "does not beat it"
                lines.append(f"| {c.label} | {_pct(c.copy_difference)} ({Comparison.verdict(c.copy_difference)}) | "
                             f"{c.quality_difference} ({Comparison.verdict(c.quality_difference)}) | "
                             f"{verdict} |")
            lines.append("[differences are chosen minus row: negative is better for the chosen candidate; "
                         "'no different' when the 95% interval holds 0. The intervals cover the samples drawn from "
                         "each trained model, not its training seed: two trainings of one configuration can differ "
                         "by more; the same config run with other seeds, read by bench/seeds.py, gives intervals "
                         "that include it]")
        return "\n".join(lines)


def _met(figure: Interval | None, target: float) -> tuple[bool, bool]:
    if figure is None or not math.isfinite(figure.value):
        return False, False
    return figure.value >= target, math.isfinite(figure.low) and figure.low >= target


def _state(figure: Interval | None, target: float) -> str:
    met, shown = _met(figure, target)
    if shown:
        return "shown (the whole interval)"
    if met:
        return "met by the point value only"
    return "NOT met" if figure is not None and math.isfinite(figure.value) else "not measured"


def _pct(x: Interval | None) -> str:
    if x is None or not math.isfinite(x.value):
        return "-"
    if not math.isfinite(x.low):
        return f"{x.value:.0%}"
    return f"{x.value:.0%} [{x.low:.0%}, {x.high:.0%}]"


def run_figures(out_dir: Path, row, tau: float, reference_stats, indices: np.ndarray, seed: int) -> RunFigures | None:
    """A finished run's copies (memorization samples above ``tau``) and quality with its interval; None when the run
    kept no quality features (made before they were kept, or not complete). ``indices`` are the study's resamples
    (drawn from its sampling ``seed``); a run sampled from other seeds (the re-evaluation) gets its interval from its
    own, as its metrics.json has it, so that one run shows one interval wherever it is printed."""
    from safetensors.numpy import load_file

    from .trial import QUALITY_FEATURES

    folder = Path(out_dir) / row.get("folder", "")
    features_file = folder / QUALITY_FEATURES
    neighbours_file = folder / "neighbours.json"
    if row.state != "complete" or not features_file.is_file() or not neighbours_file.is_file():
        return None
    features = load_file(str(features_file))["features"].astype(np.float64)
    if len(features) != indices.shape[1]:
        raise ValueError(f"{features_file}: {len(features)} quality samples, the study's other runs have "
                         f"{indices.shape[1]}")
    sims = [n["similarity"] for n in json.loads(neighbours_file.read_text())]
    own_seed = int(row.get("sampling_seed", seed))
    own = indices if own_seed == seed else bootstrap_indices(len(features), len(indices), own_seed)
    statistic = resampled_frechet(features, reference_stats)
    quality = percentile_interval(float(statistic(np.arange(len(features))[None])[0]), statistic(own))
    share = row.get("trainable_percent")
    return RunFigures(row.label, row.kind, folder, int(sum(s > tau for s in sims)), len(sims), quality,
                      None if share is None else float(share), features)


def compute(results, settings, reference_features: np.ndarray, floor_features: np.ndarray | None = None,
            resamples: int | None = None) -> Claim:
    """The claim of a search's ``results`` (``memcontrol.search.results.collect``), its quality measured against
    ``reference_features`` (the held-out images' quality features). ``floor_features``: features of further real
    held-out images, not in the reference, for the share of the gap full fine-tuning closes."""
    from ..metrics.quality import gaussian_stats

    tau = float(settings.objectives["memorization"]["tau"])
    resamples = int(resamples or settings.objectives["bootstrap_resamples"])
    seed = int(settings.sampling["seed"])
    n_quality = settings.sampling["quality_prompts"] * settings.sampling["per_prompt"]
    ref_stats = gaussian_stats(np.asarray(reference_features, dtype=np.float64))
    indices = bootstrap_indices(n_quality, resamples, seed)

    def figures(row):
        return None if row is None else run_figures(settings.out_dir, row, tau, ref_stats, indices, seed)

    base = figures(results.base)
    by_name = {r.get("baseline"): r for r in results.baselines}
    full = figures(by_name.get("full_ft"))
    chosen_row = results.chosen
    chosen, source = None, "search-time samples"
    if chosen_row is not None:
        chosen = figures(results.reevaluation) if results.reevaluation is not None else None
        if chosen is not None:
            chosen.label = f"{chosen_row.label}, re-evaluated on fresh seeds"
            source = "re-evaluation on fresh seeds"
        else:
            chosen = figures(chosen_row)
    others = [f for f in (figures(r) for r in [*results.baselines, *results.controls]) if f is not None]
    others = [f for f in others if f.kind != "base"]
    runs = [r for r in [base, *[o for o in others if o.label == "full fine-tuning"], chosen,
                        *[o for o in others if o.label != "full fine-tuning"]] if r is not None]

    def q_stat(run):
        return resampled_frechet(run.features, ref_stats)

    gap = None
    if base is not None and full is not None and floor_features is not None:
        floor = np.asarray(floor_features, dtype=np.float64)
        floor_stat = resampled_frechet(floor, ref_stats)
        floor_idx = bootstrap_indices(len(floor), resamples, seed + 1)
        b, f = q_stat(base), q_stat(full)
        everything = np.arange(n_quality)[None]
        value = (b(everything) - f(everything)) / (b(everything) - floor_stat(np.arange(len(floor))[None]))
        gap = percentile_interval(float(value[0]), (b(indices) - f(indices)) / (b(indices) - floor_stat(floor_idx)))
    recovery = cut = None
    do_not = bool(chosen_row is not None and chosen_row.kind == "base")
    if chosen is not None and base is not None and full is not None and not do_not:
        b, f, c = q_stat(base), q_stat(full), q_stat(chosen)
        recovery = paired(lambda idx: b(idx) - c(idx), lambda idx: b(idx) - f(idx), indices, combine=np.divide)
    if chosen is not None and full is not None and not do_not:
        cut = rate_ratio_cut(chosen.copies, chosen.n, full.copies, full.n, seed=seed)
    comparisons = []
    if chosen is not None and not do_not:
        c = q_stat(chosen)
        for o in others:
            comparisons.append(Comparison(
                o.label, rate_difference(chosen.copies, chosen.n, o.copies, o.n),
                paired(c, q_stat(o), indices)))
    return Claim(runs, chosen, source, full, base, gap, recovery, cut, comparisons, do_not)


def load_reference(out_dir: Path) -> np.ndarray | None:
    """The held-out quality features the workers kept (``OUT/quality_reference.safetensors``), or None."""
    from safetensors.numpy import load_file

    from .objectives import QUALITY_REFERENCE

    path = Path(out_dir) / QUALITY_REFERENCE
    return load_file(str(path))["features"].astype(np.float64) if path.is_file() else None


def write_claim(settings, results) -> str | None:
    """``OUT/claim.md`` and ``OUT/claim.json`` for a search that ran the base model and full fine-tuning; the
    markdown, or None when there is nothing to claim against (no full fine-tuning row, or runs without kept
    features)."""
    import logging

    from ..report import write_atomically
    from .objectives import quality_name

    out = Path(settings.out_dir)
    claim = None
    reference = load_reference(out)
    if reference is not None and results.base is not None:
        try:
            claim = compute(results, settings, reference)
        except ValueError as err:  # runs of another sample count: a study resumed from an older version
            logging.getLogger(__name__).warning("no claim: %s", err)
    if claim is None or claim.full is None or claim.base is None:
        for stale in ("claim.md", "claim.json"):  # never show the claim of an earlier state of the study
            (out / stale).unlink(missing_ok=True)
        return None
    text = claim.to_markdown(quality_name(settings))
    # Replaced whole, never truncated first: a second machine finishing the same folder may be reading them.
    write_atomically(out / "claim.md", (text + "\n").encode("utf-8"))
    write_atomically(out / "claim.json", (json.dumps(claim.to_dict(), indent=1) + "\n").encode("utf-8"))
    return text
