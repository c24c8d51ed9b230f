"""`memcontrol audit-data --manifest TRAIN [--heldout HELDOUT] --out DIR`: the training-data audit, before any
fine-tuning (``memcontrol.data.duplicates``).

Writes ``pairs.csv`` (every finding: kind, pseudonymised keys and manifest lines of both records, similarity),
``groups.csv`` (the duplicate groups, and which record ``deduplicate`` keeps), ``pairs.png`` (the image pairs side
by side), ``report.html`` and, with ``--on-error skip``, ``skipped.csv``. Exit status 0 when the data is clean, 3
when it holds near-duplicate, same-patient or leaking pairs (repeated captions alone are listed, not counted:
templated reports repeat), 1 on an error.
"""

from __future__ import annotations

import json
from pathlib import Path

FOUND = 3  # exit status when the audit found pairs: a script can tell "found something" from "failed"


def add_arguments(parser) -> None:
    parser.add_argument("--manifest", required=True, help="the training images: a manifest (CSV/TSV/JSONL) or folder")
    parser.add_argument("--heldout", default=None, help="held-out images (manifest or folder): checked for leakage")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--features", default="pixels",
                        help="'pixels' (default, calibrated threshold) or an embedder spec as JSON, e.g. "
                             "'{\"type\": \"metric_net\", \"path\": \"data/metric_nets/copy_detector\"}' "
                             "(then --threshold is needed)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="cosine similarity from which two images are near-duplicates (default: the calibrated "
                             "pixel-space threshold)")
    parser.add_argument("--resolution", type=int, default=64, help="images are compared at this size (default 64)")
    parser.add_argument("--key-column", default=None, help="manifest column naming the patient (default: subject)")
    parser.add_argument("--shared-patients", action="store_true",
                        help="train and held-out manifests name patients with one pseudonym mapping: a patient in "
                             "both is a leak (off by default: per-folder numbering like sub-0001 would match "
                             "unrelated patients)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                        help="an unreadable image stops the audit (fail) or is left out and listed (skip)")


def _features(text: str) -> dict:
    from ..config import feature_spec
    from ..errors import ConfigError

    if text == "pixels":
        return {"type": "pixels"}
    try:
        spec = json.loads(text)
    except json.JSONDecodeError:
        raise ConfigError(f"--features: 'pixels' or an embedder spec as JSON, not {text!r}") from None
    return feature_spec(spec, Path.cwd())


def run(args) -> int:
    from ..data import load_source, run_salt, write_skipped
    from ..data.duplicates import audit_datasets, threshold_for
    from ..data.duplicates_report import write_outputs
    from ..runs import claim_out_dir

    features = _features(args.features)
    threshold = threshold_for(features, args.threshold)
    spec = {"on_error": args.on_error, "key_column": args.key_column}
    # Both listings are checked (a missing file, an empty image path or caption) before anything is written; an
    # image that does not decode is found while loading, after the output folder is taken.
    from ..data.manifest import read_entries
    from ..errors import DataError

    for source in filter(None, (args.manifest, args.heldout)):
        entries = read_entries(source, key_column=args.key_column)
        bad = next((e for e in entries if e.problem), None) if args.on_error == "fail" else None
        if bad is not None:
            raise DataError(bad.where, bad.problem)
    out = claim_out_dir(args.out, "audit-data")
    salt = run_salt(out)
    train = load_source({"source": args.manifest, **spec}, args.resolution, salt=salt)
    heldout = load_source({"source": args.heldout, **spec}, args.resolution, salt=salt) if args.heldout else None
    result = audit_datasets(train, heldout, features, threshold, args.shared_patients, out / "cache")
    files = write_outputs(out, result, train, heldout)
    skipped = train.skipped + (heldout.skipped if heldout is not None else [])
    if skipped:
        files.append(write_skipped(out, skipped).name)  # named by pseudonym and manifest line, as jobs do
    print(f"audit-data: {result.summary()}")
    print(f"audit-data: wrote {', '.join(str(out / f) for f in files)}")
    return FOUND if result.duplicate_pairs + result.leaks else 0
