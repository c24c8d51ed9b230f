"""The same study run with other seeds: how far apart are its figures, against the intervals each study prints?

    python bench/seeds.py runs/paper runs/paper-seed1 [more run folders]

Reads each run's ``claim.json`` (written by ``memcontrol search``) and prints, for every row whose label all the
studies share (the base model, the baselines, the mitigations, the re-evaluated choice and its controls), its copy
rate and quality in each study and whether the studies' 95% intervals overlap; then the claim's checks (full
fine-tuning's copy rate, the quality gain the chosen candidate recovers, the copy rate it cuts) and its verdicts
against the other rows, study by study. The chosen candidate and its controls are whatever each study chose: their
rows compare the procedure, not one mask. Last, each figure over the studies: its mean with Student's t 95% interval
over them (each study one replicate of training and sampling, so the interval carries the training noise that a
study's own intervals do not), and the chosen candidate minus every other row, study by study, then over the studies
(the random masks as one row: each study's mean over its draws).

    python bench/seeds.py --rankings runs/paired_ladder/fidelity.json runs/paired_ladder_seed1/fidelity.json [...]

Reads instead ``bench/fidelity.py --run`` outputs of one config at different training seeds and asks how far the
intervals printed there (which cover the sampling of one trained model) stand for training noise too: for each
objective, Spearman between the studies' full-fidelity values of the candidates they share, and of the candidate
pairs whose paired 95% interval separated them in both studies, how many the two studies order the opposite way.
Also the ranking target's ceiling: over each largest set of candidates one study separates pairwise, the Spearman
of the other study's values (a screen that is the full evaluation itself, trained with another seed; the lowest
over the sets is what the target reads). Last, the candidates apart beyond training noise too: the pairs every
study separates and all order alike, the largest sets of candidates all pairwise so, and each study's screen ranked
over those sets.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from memcontrol.metrics.intervals import largest_separated_sets, replicate_interval
from memcontrol.search.claim import CUT_CHECK, FULL_COPY_CHECK, Comparison

RANDOM_MASKS = "control: random mask"
RATE = (0.0, 1.0)
FD = (0.0, math.inf)  # the claim's quality is a Fréchet distance
RANGES = {FULL_COPY_CHECK: RATE, CUT_CHECK: (-math.inf, 1.0)}  # the checks whose figure has a bound


def load_claim(run: Path) -> dict:
    path = run / "claim.json"
    if not path.is_file():
        raise SystemExit(f"{path}: missing (run `memcontrol search` into {run} first)")
    return json.loads(path.read_text())


def fmt(figure: dict | None, percent: bool = False) -> str:
    if figure is None or figure.get("value") is None:
        return "-"
    if percent:
        return f"{figure['value']:.0%} [{figure['low']:.0%}, {figure['high']:.0%}]"
    return f"{figure['value']:.3g} [{figure['low']:.3g}, {figure['high']:.3g}]"


def overlap(figures: list[dict]) -> str:
    """'yes' when one value lies in every study's interval (their intervals share a point), else 'no'."""
    if any(f is None or f.get("low") is None for f in figures):
        return "-"
    return "yes" if max(f["low"] for f in figures) <= min(f["high"] for f in figures) else "no"


def shared_rows(claims: list[dict]) -> list[tuple[str, list[dict]]]:
    """Rows present in every study, by label, in the first study's order (the chosen row under one name)."""
    def label(row: dict, claim: dict) -> str:
        return "chosen candidate" if row["label"] == claim["chosen"] else row["label"]

    tables = [{label(r, c): r for r in c["runs"]} for c in claims]
    return [(name, [t[name] for t in tables]) for name in tables[0] if all(name in t for t in tables)]


def across(values: list[float], percent: bool = False, bounds: tuple[float, float] = (-math.inf, math.inf)) -> str:
    """The mean over studies with its t interval, clipped to the figure's possible range (a rate lies in [0, 1]);
    "same in every study" where they agree (a zero-width interval would read as certainty)."""
    iv = replicate_interval(values)
    if iv.low == iv.high:
        return (f"{iv.value:.0%}" if percent else f"{iv.value:.3g}") + " (same in every study)"
    return fmt({"value": iv.value, "low": max(iv.low, bounds[0]), "high": min(iv.high, bounds[1])}, percent)


def over_studies(claims: list[dict]) -> dict:
    """Per shared row, per check and per chosen-minus-row difference: the studies' point values (a figure is left
    out where a study has no value for it)."""
    def value(figure):
        return None if figure is None else figure.get("value")

    def complete(figures: dict) -> dict:
        return {k: v for k, v in figures.items() if v and all(x is not None for x in v)}

    rows = {name: complete({"copy rate": [value(r["copy_rate"]) for r in rs],
                            "quality": [value(r["quality"]) for r in rs]}) for name, rs in shared_rows(claims)}
    checks = complete({c["what"]: [value(next((x["figure"] for x in claim["checks"] if x["what"] == c["what"]), None))
                                   for claim in claims] for c in claims[0]["checks"]})
    chosen = rows.get("chosen candidate", {})
    masks = [n for n in rows if n.startswith(RANDOM_MASKS)]
    others = {n: rows[n] for n in rows if n != "chosen candidate" and n not in masks}
    if masks:
        others[f"{RANDOM_MASKS}s (each study's mean over its {len(masks)})"] = {
            k: [sum(v) / len(v) for v in zip(*(rows[m][k] for m in masks))]
            for k in ("copy rate", "quality") if all(k in rows[m] for m in masks)}
    differences = {n: {k: [a - b for a, b in zip(chosen[k], v)] for k, v in figures.items() if k in chosen}
                   for n, figures in others.items()}
    return {"rows": rows, "checks": checks, "differences": differences}


def verdict(values: list[float]) -> str:
    """For the chosen candidate, of chosen-minus-row differences over the studies (lower is better on both
    objectives); the claim's rule: it beats a row when better on one and not worse on the other."""
    if len(values) < 2:
        return "no different"
    iv = replicate_interval(values)
    if iv.low == iv.high != 0:
        return "not judged"  # the same difference in every study: no spread to judge it by
    return Comparison.verdict(iv)


def ceiling(values: list[dict], sets: list[list[str]], other: dict) -> list[float]:
    """Spearman of ``other``'s values against ``values`` over each set of labels (sorted, lowest first)."""
    return sorted(float(spearmanr([values[x] for x in c], [other[x] for x in c]).statistic) for c in sets
                  if all(x in other for x in c))


def training_noise(reports: list[dict], names: list[str]) -> dict:
    """Per objective and pair of studies: Spearman over the shared candidates, the pairs separated in both studies
    (paired 95%) that they order alike and the opposite way, and each study's largest separated sets ranked by the
    other study's values (``ceiling``: ``names[a]``'s sets first)."""
    out = {}
    for key in ("screen_train_fit~memorization", "screen_quality~quality"):
        objective = key.split("~")[1]
        values = [{r["label"]: r[objective] for r in rep["ranking"]["rows"]} for rep in reports]
        paired = [rep["ranking"]["paired"][key]["paired95"] for rep in reports]
        separated = [[tuple(p) for p in pr["separated"]] for pr in paired]
        by_number = [{r["candidate"]: r["label"] for r in rep["ranking"]["rows"]} for rep in reports]
        sets = [[[by_number[i][c] for c in group] for group in pr["largest_sets"]] for i, pr in enumerate(paired)]
        for a, b in itertools.combinations(range(len(reports)), 2):
            shared = [label for label in values[a] if label in values[b]]
            rho = float(spearmanr([values[a][x] for x in shared], [values[b][x] for x in shared]).statistic)
            in_b = {frozenset(p) for p in separated[b]}
            both = [p for p in separated[a] if frozenset(p) in in_b]
            reversed_ = [p for p in both
                         if (values[a][p[0]] - values[a][p[1]]) * (values[b][p[0]] - values[b][p[1]]) < 0]
            out[f"{objective}: {names[a]} vs {names[b]}"] = {
                "studies": (names[a], names[b]), "candidates": len(shared), "spearman": rho,
                "separated_in_both": len(both), "opposite_order": len(reversed_), "opposite_pairs": reversed_,
                "ceiling": [ceiling(values[a], sets[a], values[b]), ceiling(values[b], sets[b], values[a])]}
    return out


def apart_in_every_study(reports: list[dict], names: list[str]) -> dict:
    """Per objective: the candidate pairs that every study separates (paired 95%) and orders alike, so apart beyond
    both sampling and training noise; the largest sets of candidates all pairwise so (over the candidates every study
    has); and over each such set, each study's screen ranked against its own full evaluation (Spearman, sorted)."""
    out = {}
    for key in ("screen_train_fit~memorization", "screen_quality~quality"):
        cheap, objective = key.split("~")
        rows = [{r["label"]: r for r in rep["ranking"]["rows"]} for rep in reports]
        labels = [x for x in rows[0] if all(x in r for r in rows[1:])]
        separated = [{frozenset(p) for p in rep["ranking"]["paired"][key]["paired95"]["separated"]}
                     for rep in reports]

        def apart(a: str, b: str) -> bool:
            signs = {math.copysign(1, r[a][objective] - r[b][objective]) for r in rows}
            return len(signs) == 1 and all(frozenset((a, b)) in s for s in separated)

        matrix = np.array([[a != b and apart(a, b) for b in labels] for a in labels], dtype=bool)
        sets = [[labels[i] for i in c] for c in largest_separated_sets(matrix)] if labels else []
        screens = {}
        for name, r in zip(names, rows):
            rhos = [float(spearmanr([r[x][cheap] for x in c], [r[x][objective] for x in c]).statistic) for c in sets
                    if len(c) >= 3 and all(r[x].get(cheap) is not None for x in c)]
            screens[name] = sorted(rhos)
        out[objective] = {"candidates": len(labels), "pairs": int(matrix.sum()) // 2, "sets": sets,
                          "screens": screens}
    return out


def reaching(rhos: list[float]) -> int:
    """How many Spearmans reach the ranking target's 0.8 (one computed as 0.7999... still counts)."""
    return sum(x >= 0.8 - 1e-9 for x in rhos)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run folders of one config with different seeds")
    ap.add_argument("--rankings", action="store_true",
                    help="the arguments are bench/fidelity.py --run outputs (fidelity.json): training noise")
    args = ap.parse_args(argv)
    if args.rankings:
        missing = [p for p in args.runs if not p.is_file()]
        if missing:
            raise SystemExit(f"{missing[0]}: missing (write it with bench/fidelity.py --run ... --out DIR)")
        reports, names = [json.loads(p.read_text()) for p in args.runs], [str(p) for p in args.runs]
        for what, r in training_noise(reports, names).items():
            print(f"{what}: Spearman {r['spearman']:.2f} over {r['candidates']} candidates; of "
                  f"{r['separated_in_both']} pairs separated in both, {r['opposite_order']} in the opposite order"
                  + (f" ({'; '.join(' / '.join(p) for p in r['opposite_pairs'])})" if r["opposite_pairs"] else ""))
            for whose, other, rhos in zip(r["studies"], ("second", "first"), r["ceiling"]):
                if rhos:
                    print(f"  over the {len(rhos)} largest separated set(s) of {whose}, the {other} study's values "
                          f"rank at Spearman {rhos[0]:.2f} to {rhos[-1]:.2f} ({reaching(rhos)} reach 0.8)")
        for objective, r in apart_in_every_study(reports, names).items():
            size = len(r["sets"][0]) if r["sets"] else 0
            print(f"{objective}, apart in every study (each separates them, paired 95%, and all order them alike): "
                  f"{r['pairs']} of {r['candidates'] * (r['candidates'] - 1) // 2} pairs; the largest sets all "
                  f"pairwise apart hold {size} candidates ({len(r['sets'])} such sets)")
            for name, rhos in r["screens"].items():
                if rhos:
                    print(f"  {name}'s screen over them ranks at Spearman {rhos[0]:.2f} to {rhos[-1]:.2f} "
                          f"({reaching(rhos)} reach 0.8)")
        return 0
    claims = [load_claim(run) for run in args.runs]
    names = [str(run) for run in args.runs]

    print("| row | " + " | ".join(f"copy rate: {n}" for n in names) + " | overlap | "
          + " | ".join(f"quality: {n}" for n in names) + " | overlap |")
    print("|---|" + "---|" * (2 * len(names) + 2))
    for name, rows in shared_rows(claims):
        rates, quality = [r["copy_rate"] for r in rows], [r["quality"] for r in rows]
        print(f"| {name} | " + " | ".join(fmt(f, percent=True) for f in rates) + f" | {overlap(rates)} | "
              + " | ".join(fmt(f) for f in quality) + f" | {overlap(quality)} |")
    print()
    for name, claim in zip(names, claims):
        # The claim's own wording of each check, as the search's report shows it.
        checks = "; ".join(f"{c['what']} {c['figure_text']} (target {c['target']}): {c['state']}"
                           for c in claim["checks"])
        beats = [c["label"] for c in claim["comparisons"] if c["beats"]]
        print(f"{name}: chosen {claim['chosen']}; {checks}")
        print(f"  beats {len(beats)} of {len(claim['comparisons'])} rows: {', '.join(beats) or 'none'}")
    if len(claims) < 2:
        return 0
    summary = over_studies(claims)
    print(f"\nOver the {len(claims)} studies: mean, Student's t 95% interval (training seeds and sampling)")
    print("| row | copy rate | quality |\n|---|---|---|")
    for name, figures in summary["rows"].items():
        rate = across(figures["copy rate"], percent=True, bounds=RATE) if "copy rate" in figures else "-"
        quality = across(figures["quality"], bounds=FD) if "quality" in figures else "-"
        print(f"| {name} | {rate} | {quality} |")
    for what, values in summary["checks"].items():
        print(f"{what}: {across(values, percent=True, bounds=RANGES.get(what, (-math.inf, math.inf)))}")
    if summary["differences"]:
        print("\nchosen minus row, over the studies (negative: the chosen copies less / is closer to the held-out "
              "site; a verdict for the chosen candidate)")
        print("| row | copy rate (points) | quality | beaten |\n|---|---|---|---|")
        for name, diffs in summary["differences"].items():
            if set(diffs) != {"copy rate", "quality"}:
                continue
            points = [100 * x for x in diffs["copy rate"]]
            verdicts = {verdict(points), verdict(diffs["quality"])}
            beaten = "yes" if "better" in verdicts and not verdicts & {"worse", "not judged"} else "no"
            print(f"| {name} | {across(points)}: {verdict(points)} | {across(diffs['quality'])}: "
                  f"{verdict(diffs['quality'])} | {beaten} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
