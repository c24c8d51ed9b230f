"""Checking that listed images load: one result per item, for `memcontrol inspect-data` and for scripts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .dataset import check_entry
from .images import read_image
from .manifest import MANIFEST_SUFFIXES, read_entries


@dataclass(frozen=True)
class ItemReport:
    path: str
    problem: str | None = None
    shape: tuple[int, ...] | None = None
    low: float | None = None
    high: float | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def line(self) -> str:
        if not self.ok:
            return f"error  {self.path}: {self.problem}"
        kind = "rgb" if len(self.shape) == 3 else "gray"
        return (f"ok     {self.path}  {self.shape[0]}x{self.shape[1]} {kind}  "
                f"range {self.low:.3f}..{self.high:.3f}")

    def to_json(self) -> dict:
        if not self.ok:
            return {"path": self.path, "status": "error", "problem": self.problem}
        return {"path": self.path, "status": "ok", "shape": list(self.shape), "min": round(self.low, 6),
                "max": round(self.high, 6)}


def inspect_paths(paths, frame: int | None = None, image_column: str | None = None,
                  text_column: str | None = None) -> Iterator[ItemReport]:
    """Each path may be an image file, a manifest or a folder; manifests' rows are checked with their captions."""
    for path in map(Path, paths):
        if not path.exists():
            yield ItemReport(str(path), "no such file or folder")
        elif path.is_dir() or path.suffix.lower() in MANIFEST_SUFFIXES:
            try:
                entries = read_entries(path, image_column, text_column, require_text=False)
            except DataError as err:
                yield ItemReport(err.path, err.problem)
                continue
            for entry in entries:
                yield _inspect(entry.where, lambda e=entry: check_entry(e, frame, require_caption=False))
        else:
            yield _inspect(str(path), lambda p=path: read_image(p, frame))


def _inspect(where: str, load) -> ItemReport:
    try:
        pixels = load()
    except DataError as err:
        return ItemReport(err.path, err.problem)
    return ItemReport(where, shape=tuple(pixels.shape), low=float(pixels.min()), high=float(pixels.max()))
