"""Write the bundled cohorts of the synthetic hospital under data/hospital/ (see memcontrol.data.cohorts).

    python pipelines/make_hospital.py            # rewrites data/hospital/ byte for byte

private: 12 chest patients, 2 of them with a duplicated record (DICOM); heldout: 48 further chest patients (DICOM);
brain_private / brain_heldout: 12 and 48 brain MRI patients (PNG), for the mask-transfer job.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memcontrol.data import make_phantoms  # noqa: E402
from memcontrol.data.cohorts import SEEDS, write_brain_cohort  # noqa: E402

COHORTS = {
    "private": dict(patients=12, duplicates=2),
    "heldout": dict(patients=48, duplicates=0),
    "brain_private": dict(patients=12),
    "brain_heldout": dict(patients=48),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "data" / "hospital")
    args = ap.parse_args(argv)
    for name, spec in COHORTS.items():
        folder = args.out / name
        if name.startswith("brain"):
            manifest = write_brain_cohort(folder, spec["patients"], SEEDS[name])
        else:
            manifest = make_phantoms(folder, spec["patients"], SEEDS[name], duplicates=spec["duplicates"])
        print(f"{name}: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
