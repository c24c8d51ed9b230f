"""`memcontrol inspect-data PATH...`: check that images, DICOM files and manifests load, one line per item."""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, manifests (.csv/.tsv/.jsonl) or folders")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    parser.add_argument("--frame", type=int, default=None, help="frame to read from multi-frame files")
    parser.add_argument("--image-column", default=None, help="manifest column with the image paths")
    parser.add_argument("--text-column", default=None, help="manifest column with the captions")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                        help="fail: any bad item fails the check (exit 1); skip: bad items are listed as skipped "
                             "and the check passes if any item loads")
    parser.add_argument("--out", type=Path, default=None,
                        help="run folder for inspect.jsonl (every item) and, with --on-error skip, skipped.csv")


def run(args) -> int:
    from ..data import inspect_paths, write_skipped

    reports = []
    for report in inspect_paths(args.paths, args.frame, args.image_column, args.text_column):
        print(json.dumps(report.to_json()) if args.json else report.line(), flush=True)
        reports.append(report)
    failed = [r for r in reports if not r.ok]
    loaded = len(reports) - len(failed)
    skip = args.on_error == "skip"
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "inspect.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r.to_json()) + "\n" for r in reports)
        if skip:
            write_skipped(args.out, [(r.path, r.problem) for r in failed])
    passed = loaded > 0 and (skip or not failed)
    summary = {"items": len(reports), "ok": loaded, "errors": len(failed), "on_error": args.on_error,
               "skipped": [r.path for r in failed] if skip else [], "passed": passed}
    if args.json:
        print(json.dumps({"summary": summary}))
    else:
        if skip and failed:
            print(f"skipped {len(failed)} item(s):")
            for r in failed:
                print(f"  {r.path}: {r.problem}")
        saved = f"; results in {args.out}" if args.out is not None else ""
        verdict = "passed" if passed else "FAILED"
        print(f"inspect-data: {len(reports)} items, {loaded} ok, {len(failed)} "
              f"{'skipped' if skip else 'errors'} ({verdict}){saved}")
    return 0 if passed else 1
