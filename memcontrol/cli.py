"""The ``memcontrol`` command: one entry point, one module per sub-command.

Each sub-command lives in ``memcontrol.commands.<name>`` with ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs, so ``memcontrol --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .errors import MemcontrolError

COMMANDS = {
    "make-phantoms": ("make_phantoms", "write a synthetic chest-radiograph cohort as DICOM files with a manifest"),
    "inspect-data": ("inspect_data", "check that images, DICOM files and manifests load"),
    "audit-data": ("audit_data", "find near-duplicate training images, leaks into the held-out set and repeated "
                                 "captions"),
    "finetune": ("finetune", "fine-tune a model with a given mask and export the adapter"),
    "audit": ("audit", "measure memorization of a checkpoint and write a report"),
    "search": ("search", "search the parameter subset that limits memorization (MemControl)"),
    "config": ("config", "check a config file, or show it merged with its presets and defaults"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memcontrol", description="Audit and control training-data memorization in diffusion image generators.")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse the command name first (without --help, which would exit before the command's options exist), then
    # let the command's module declare its own options.
    known, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    if known.command is None:
        parser.parse_args(argv)
        parser.print_help()
        return 2
    module = importlib.import_module(f"memcontrol.commands.{known._module}")
    sub = parser._subparsers._group_actions[0].choices[known.command]
    module.add_arguments(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(module.run(args) or 0)
    except MemcontrolError as err:
        print(f"memcontrol {known.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"memcontrol {known.command}: interrupted; finished work is kept in the output folder",
              file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of the output went away (`| head`): stop quietly as a Unix filter does, without a traceback when
        # Python flushes stdout on exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a filter stopped by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
