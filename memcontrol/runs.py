"""Output folders: each job writes one folder, and a folder holds the run of one job only.

``claim_out_dir`` is called by every job before any work starts. It refuses an ``--out`` that is a file, or a folder
that holds something other than a run of the same job (someone's data, another job's results), so that a mistyped
``--out`` neither overwrites files nor mixes two runs; a folder of the same job is taken again, which is how runs
resume. The folder is marked with ``memcontrol-run.json`` naming its job.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .errors import ConfigError

MARKER = "memcontrol-run.json"


def _earlier_run_of(folder: Path, job: str) -> bool:
    """A folder written by a memcontrol from before the marker existed, recognised by what that job wrote."""
    if job == "search":
        return (folder / "study.db").is_file() or (folder / "trials").is_dir()
    if job == "finetune":
        return (folder / "metrics.json").is_file() or (folder / "cache").is_dir()
    if job == "audit":
        try:
            return json.loads((folder / "metrics.json").read_text())["tool"].startswith("memcontrol audit")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
    return False


def claim_out_dir(out: str | Path, job: str, own: Path | None = None) -> Path:
    """The output folder of a ``job`` run, created (or taken again when it holds a run of the same job). ``own`` is a
    file the run itself keeps there (a search's journal storage, with its lock files), which is no foreign content."""
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file; give a folder for the {job} run (it is created if missing)")
    marker = folder / MARKER
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text(encoding="utf-8")).get("job")
        except (ValueError, AttributeError):
            owner = None
        if owner != job:
            article = "an" if job[0] in "aeiou" else "a"
            raise ConfigError(f"--out {folder} holds a memcontrol {owner or 'unknown'} run, not {article} {job} run; "
                              "choose another folder")
    elif folder.is_dir() and not _earlier_run_of(folder, job):
        shown = sorted(p.name for p in folder.iterdir() if not _is_own(p, own))
        if not shown or marker.is_file():  # the marker may have come meanwhile, from another worker of this run
            return claim_out_dir(folder, job, own) if shown else _mark(folder, marker, job)
        listing = ", ".join(shown[:4]) + (", ..." if len(shown) > 4 else "")
        raise ConfigError(f"--out {folder} is not empty ({listing}) and holds no memcontrol {job} run; choose a new "
                          "or empty folder, so that nothing there is overwritten")
    return _mark(folder, marker, job)


def _is_own(path: Path, own: Path | None) -> bool:
    return own is not None and path.parent.resolve() == own.parent.resolve() and (
        path.name == own.name or path.name.startswith(own.name + "."))


def _mark(folder: Path, marker: Path, job: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        marker.write_text(json.dumps({"job": job, "memcontrol": __version__}) + "\n", encoding="utf-8")
    return folder
