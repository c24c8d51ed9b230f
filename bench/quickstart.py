"""The main job, timed: `memcontrol search --config configs/quickstart.yaml` on the bundled synthetic hospital.

    python bench/quickstart.py                       # runs the job into a fresh temporary folder
    python bench/quickstart.py --config configs/quickstart_long.yaml
    python bench/quickstart.py --run runs/quickstart # only reads a finished run

Prints the wall time and, for full fine-tuning, each baseline and the selected mask: copy rate (share of samples
whose nearest private patient is above the config's tau in its feature space), mean nearest-neighbour similarity,
quality distance (FD on the config's features), trainable share and steps. Not yet reported: the detector's
precision and recall against the phantoms' ground truth (see the README's quickstart section).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rows_of(run: Path) -> list[dict]:
    with open(run / "trials.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    picked = [r for r in rows if r["kind"] == "baseline"] + [r for r in rows if r["chosen"] == "True"]
    return picked


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "quickstart.yaml")
    ap.add_argument("--run", type=Path, default=None, help="a finished run folder to read instead of running")
    args = ap.parse_args(argv)
    run, seconds = args.run, None
    if run is None:
        run = Path(tempfile.mkdtemp(prefix="memcontrol-quickstart-")) / "run"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "memcontrol.cli", "search", "--config", str(args.config),
                        "--out", str(run)], check=True, cwd=REPO)
        seconds = time.perf_counter() - start
    print(f"run folder: {run}")
    if seconds is not None:
        print(f"wall time of the search (model load to report): {seconds / 60:.1f} min")
    print("| run | copy rate | mean NN similarity | quality (FD) | trainable % | steps |")
    print("|---|---|---|---|---|---|")
    for r in rows_of(run):
        label = r["label"] + (" (selected)" if r["chosen"] == "True" else "")
        def num(key, fmt):
            return format(float(r[key]), fmt) if r.get(key) not in (None, "") else "-"
        print(f"| {label} | {num('copy_fraction', '.2f')} | {num('mean_similarity', '.3f')} | {num('fd', '.3f')} | "
              f"{num('trainable_percent', '.2f')} | {r['steps']}/{r['step_budget']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
