"""Mask transfer, measured: the mask chosen on the chest cohort against full fine-tuning, on the brain-MRI cohort.

    python bench/transfer.py --mask runs/quickstart/best/mask.json            # into a fresh temporary folder
    python bench/transfer.py --mask runs/quickstart/best/mask.json --out runs/transfer

Runs the commands written in `configs/transfer_brain.yaml`: `memcontrol finetune` with the transferred mask and
with `configs/masks/full_unet.json` (same data, steps, batch and learning rate), then `memcontrol audit` of each
against the held-out brain patients. Prints copy rate (VAE features, tau calibrated on the held-out set), mean
nearest-neighbour similarity, FD and KID, each with its 95% interval (the audit's: Wilson for the copy rate,
bootstrap over generated samples for the others), trainable share and training time of both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BRAIN = REPO / "data" / "hospital"


def memcontrol(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "memcontrol.cli", *args], check=True, cwd=REPO)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mask", type=Path, required=True, help="mask.json chosen on the chest cohort")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "transfer_brain.yaml")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from memcontrol.metrics.intervals import format_interval

    out = args.out or Path(tempfile.mkdtemp(prefix="memcontrol-transfer-"))
    masks = {"transferred mask": args.mask.resolve(), "full fine-tuning": REPO / "configs" / "masks" / "full_unet.json"}
    rows = []
    for (label, mask), name in zip(masks.items(), ("mask", "full")):
        folder = out / name
        memcontrol("finetune", "--config", str(args.config), "--mask", str(mask), "--out", str(folder))
        memcontrol("audit", "--model", str(REPO / "data" / "base_model"), "--adapter", str(folder),
                   "--manifest", str(BRAIN / "brain_private" / "manifest.csv"),
                   "--heldout", str(BRAIN / "brain_heldout" / "manifest.csv"), "--out", str(folder / "audit"))
        card = json.loads((folder / "metrics.json").read_text())
        audit = json.loads((folder / "audit" / "metrics.json").read_text())
        rows.append((label, card, audit))
    print(f"run folder: {out}")
    print("| brain-MRI set | copy rate | mean NN similarity | FD[vae] | KID | trainable % | train time | samples |")
    print("|---|---|---|---|---|---|---|---|")
    for label, card, audit in rows:
        s = audit["summary"]

        def ci(name: str, spec: str) -> str:
            return format_interval(s[name], s.get(f"{name}_ci_low"), s.get(f"{name}_ci_high"), spec)

        print(f"| {label} | {ci('copy_fraction[vae]', '.2f')} | {ci('mean_similarity[vae]', '.3f')} | "
              f"{ci('FD[vae]', '.3f')} | {ci('KID', '.2g')} | {card['adapter']['trainable_percent']:.1f} | "
              f"{card['result']['seconds']:.0f} s | {audit['counts']['samples']} |")
    print("[95% intervals: Wilson for the copy rate, bootstrap over the generated samples for the others]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
