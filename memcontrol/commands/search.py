"""``memcontrol search --config CFG --out DIR [--storage URL] [--n-trials N] [--timeout S] [--workers W]``

Searches which UNet parameters a fine-tune may touch so that the model memorizes least for the quality it keeps
(MemControl). Re-running the same command resumes; the same command on several machines with one ``--storage``
URL shares the study. The work is ``memcontrol.api.search``; this module prints what it returns.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="search config (YAML); see configs/search_reference.yaml")
    parser.add_argument("--out", required=True, help="run folder: study.db, trials/, best/, report.html")
    parser.add_argument("--storage", default=None,
                        help="study storage: sqlite:///FILE.db (default OUT/study.db), journal:FILE or FILE.log "
                             "(Optuna journal file, for a shared filesystem), postgresql://USER@HOST/DB "
                             "(several machines)")
    parser.add_argument("--n-trials", type=int, default=None, help="trial budget of the whole study "
                                                                   "(all workers together; default from the config)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds after which this command's workers start no new trial")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes on this machine (default: search.workers, 1); CPU threads and GPUs "
                             "are shared out among them")


def run(args) -> int:
    from ..api import search
    from ..errors import MemcontrolError

    result = search(args.config, args.out, storage=args.storage, n_trials=args.n_trials, timeout=args.timeout,
                    workers=args.workers, check=False)
    print(f"trials: {', '.join(f'{n} {state}' for state, n in sorted(result.counts.items())) or 'none'} "
          f"(budget {result.budget})")
    print(result.table)
    selection = result.selection
    if selection is not None:
        print(f"selection: {selection.explanation}" if selection.do_not_finetune else
              f"chosen: {result.chosen.label}: {selection.explanation}")
    else:
        print("no trial finished with both metrics within the limits: nothing to export")
    if result.claim:
        print(f"\nthe claim (OUT/claim.md):\n{result.claim}\n")
    if result.best is not None:
        print(f"{'no adapter (see README.txt)' if selection.do_not_finetune else 'exported adapter'}: {result.best}")
    print(f"report: {result.report}")
    if result.problem:
        raise MemcontrolError(result.problem)
    return 0
