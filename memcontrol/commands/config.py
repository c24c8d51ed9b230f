"""`memcontrol config check CFG` and `memcontrol config show CFG`: read a config file the way every job reads it.

``check`` exits 0 when the file is valid (and 1 with the file, the key and the problem otherwise); ``show`` prints
the fully merged configuration (``base:`` presets, then the file, with every default filled in and paths made
absolute) as YAML.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("check", "show"), help="check: validate only; show: print it merged")
    parser.add_argument("config", type=Path, metavar="CFG", help="YAML config file")


def run(args) -> int:
    import yaml

    from ..config import read_config

    job = read_config(args.config)
    if args.action == "show":
        print(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False), end="")
    else:
        print(f"{args.config}: valid")
    return 0
