"""(image, caption) pairs as model-ready tensors, with a run-wide choice between stopping and skipping on bad items."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import ConfigError, DataError
from .images import read_image
from .manifest import Entry, pseudonym, read_entries
from .transforms import check_options, to_model_tensor

ON_ERROR = ("fail", "skip")


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Items `{"pixel_values": C x H x W in [-1, 1], "caption": str, "key": str}`.

    Every listed image is decoded once when the dataset is built, so that a bad file stops the run (or is
    skipped, with `on_error="skip"`) before any training starts rather than halfway through it. `skipped` lists
    `(path, problem)` for every item left out. The key is the manifest's `subject` column (or `key_column`), else
    the file's stem, never a DICOM patient tag. Hospitals often name exported files by MRN or accession number:
    given a `salt` (jobs pass their run folder's, `run_salt`), keys taken from file names are pseudonymised.
    """

    def __init__(self, source, resolution: int = 64, channels: int = 3, image_column: str | None = None,
                 text_column: str | None = None, crop: str = "center", on_error: str = "fail",
                 key_column: str | None = None, frame: int | None = None, salt: str | None = None):
        check_options(resolution, channels, crop)
        check_on_error(on_error)
        self.source = Path(source)
        self.resolution, self.channels, self.crop, self.frame = resolution, channels, crop, frame
        self.entries: list[Entry] = []
        self.skipped: list[tuple[str, str]] = []
        listed = read_entries(source, image_column, text_column, key_column, require_text=True)
        if salt is not None:
            listed = [replace(e, key=pseudonym(e.key, salt)) if e.key_from_name else e for e in listed]
        for entry in tqdm(listed, desc="checking images", unit="img"):
            try:
                check_entry(entry, frame)
            except DataError as err:
                if on_error == "fail":
                    raise
                self.skipped.append((_shown(entry, err.path, salt), err.problem))
                continue
            self.entries.append(entry)
        if not self.entries:
            first = f"; first problem: {self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped else ""
            raise DataError(self.source, f"no usable images ({len(listed)} listed){first}")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        pixels = read_image(entry.path, self.frame)
        return {"pixel_values": to_model_tensor(pixels, self.resolution, self.channels, self.crop),
                "caption": entry.caption, "key": entry.key}

    @property
    def captions(self) -> list[str]:
        return [e.caption for e in self.entries]

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    @property
    def paths(self) -> list[Path]:
        return [e.path for e in self.entries]


def _shown(entry: Entry, path: str, salt: str | None) -> str:
    """How the record of a skipped item names it. With a salt, an item whose key came from its file name is named by
    that pseudonym (and its manifest line), never by its path: the name may be an MRN or an accession number."""
    if salt is None or not entry.key_from_name:
        return path
    return entry.key if entry.path is not None and entry.origin == str(entry.path) else f"{entry.key} ({entry.origin})"


def load_source(spec: dict, resolution: int, limit: int | None = None, salt: str | None = None):
    """The dataset a config's data source names (``{source, image_column, text_column, ...}``, as
    ``memcontrol.config.schema.DataSource`` dumps it): the one reader of the ``data`` section, for every job.
    With ``limit``, only the first items (quick runs); ``salt`` (the run folder's, ``run_salt``) pseudonymises keys
    taken from file names."""
    kwargs = {k: v for k, v in spec.items() if k != "source" and v is not None}
    dataset = ImageCaptionDataset(spec["source"], resolution=resolution, salt=salt, **kwargs)
    if limit is not None and limit < len(dataset):
        return subset(dataset, range(limit))
    return dataset


def subset(dataset, indices) -> torch.utils.data.Subset:
    """Some items of a dataset from ``load_source`` (or of such a subset), with its captions, keys, entries and
    record of skipped items."""
    indices = list(indices)
    part = torch.utils.data.Subset(dataset, indices)
    part.entries = [dataset.entries[i] for i in indices]
    part.captions, part.keys = [e.caption for e in part.entries], [e.key for e in part.entries]
    part.skipped = dataset.skipped
    return part


def check_entry(entry: Entry, frame: int | None = None, require_caption: bool = True):
    """Decoded pixels of a listed item, or `DataError` for a row problem, a missing caption or an unreadable image."""
    if entry.problem:
        raise DataError(entry.where, entry.problem)
    if require_caption and entry.caption is None:
        raise DataError(entry.where, "no caption (no manifest lists this image and no .txt file is beside it)")
    try:
        return read_image(entry.path, frame)
    except DataError as err:
        if entry.origin == str(entry.path):  # found in a folder, not listed by a manifest: no line to name
            raise
        raise DataError(err.path, f"{err.problem} ({entry.origin})") from None


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")


def write_skipped(run_dir, skipped: list[tuple[str, str]]) -> Path:
    """`skipped.csv` (columns path, problem) in a run folder: the record of what a run with on_error=skip left out."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "skipped.csv"
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "problem"])
        writer.writerows(skipped)
    return out
