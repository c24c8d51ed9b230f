"""The same study run with other seeds: how far apart are its figures, against the intervals each study prints?

    python bench/seeds.py runs/paper runs/paper-seed1 [more run folders]

Reads each run's ``claim.json`` (written by ``memcontrol search``) and prints, for every row whose label all the
studies share (the base model, the baselines, the mitigations, the re-evaluated choice and its controls), its copy
rate and quality in each study and whether the studies' 95% intervals overlap; then the claim's checks (full
fine-tuning's copy rate, the quality gain the chosen candidate recovers, the copy rate it cuts) and its verdicts
against the other rows, study by study. The chosen candidate and its controls are whatever each study chose: their
rows compare the procedure, not one mask.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run folders of one config with different seeds")
    args = ap.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
