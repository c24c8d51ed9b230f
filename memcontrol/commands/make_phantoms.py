"""`memcontrol make-phantoms`: write the synthetic hospital (phantom chest radiographs as DICOM + manifest.csv)."""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (images/ and manifest.csv)")
    parser.add_argument("--patients", type=int, required=True, help="number of synthetic patients")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed: the same seed writes the same files")
    parser.add_argument("--site", choices=("public", "private"), default="public",
                        help="acquisition site: public (what the bundled base model saw) or private (portable AP "
                             "films, collimation, marker, support devices)")
    parser.add_argument("--duplicates", type=int, default=0,
                        help="patients that are repeated: more records of the same image and subject")
    parser.add_argument("--records", type=int, default=2,
                        help="records in all of each repeated patient (default 2: one duplicate)")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (square)")


def run(args) -> int:
    from ..data import make_phantoms

    manifest = make_phantoms(args.out, args.patients, args.seed, args.duplicates, args.size, args.site, args.records)
    extra = args.duplicates * (args.records - 1)
    print(f"make-phantoms: wrote {args.patients} patients + {extra} duplicate records of the {args.site} site at "
          f"{args.size}x{args.size} px as DICOM; manifest: {manifest}")
    return 0
