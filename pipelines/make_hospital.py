"""Write the bundled cohorts of the synthetic hospital under data/hospital/ (see memcontrol.data.cohorts).

    python pipelines/make_hospital.py            # rewrites data/hospital/ byte for byte

private: 8 chest patients of the private site, 4 of them repeated with 8 records each (36 DICOM files; why, in
memcontrol/data/cohorts.py); heldout: 64 further private-site patients (DICOM); brain_private / brain_heldout: 12
and 48 brain MRI patients (PNG), for the mask-transfer job.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memcontrol.data import make_phantoms  # noqa: E402
from memcontrol.data.cohorts import HELDOUT_PATIENTS, PRIVATE, SEEDS, write_brain_cohort  # noqa: E402

COHORTS = {
    "private": dict(PRIVATE, site="private"),
    "heldout": dict(patients=HELDOUT_PATIENTS, site="private"),
    "brain_private": dict(patients=12),
    "brain_heldout": dict(patients=48),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "data" / "hospital")
    args = ap.parse_args(argv)
    for name, spec in COHORTS.items():
        folder = args.out / name
        shutil.rmtree(folder, ignore_errors=True)  # files of an earlier, larger cohort must not linger
        if name.startswith("brain"):
            manifest = write_brain_cohort(folder, spec["patients"], SEEDS[name])
        else:
            manifest = make_phantoms(folder, seed=SEEDS[name], **spec)
        print(f"{name}: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
