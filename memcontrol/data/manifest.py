"""Where the (image, caption) pairs are listed: a CSV/TSV or JSONL manifest, an image folder with the
`metadata.jsonl` that Hugging Face `datasets` uses, or a plain folder of images (captions from `<stem>.txt`).

Reading a manifest never stops at a bad row: each row becomes an `Entry`, and a row that cannot be used carries
its `problem` (missing file, empty or non-UTF-8 caption, broken JSON line). Whether such rows stop a run or are
skipped is the caller's choice. Problems with the manifest as a whole (missing, no header, no image column)
raise `DataError`.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .images import IMAGE_SUFFIXES, image_format

IMAGE_COLUMNS = ("file", "file_name", "image", "path", "image_path", "filename", "filepath")
TEXT_COLUMNS = ("text", "caption", "report", "prompt")
KEY_COLUMN = "subject"
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
# Looked for, in this order, when a folder is given.
FOLDER_MANIFESTS = ("metadata.jsonl", "metadata.csv", "manifest.csv", "manifest.jsonl")
# A DICOM media folder's index file: a DICOM file that never holds an image.
NOT_IMAGES = {"DICOMDIR"}


@dataclass(frozen=True)
class Entry:
    """One listed item. `path` is None when the row names no file; `problem` is None when the row is usable."""

    path: Path | None
    caption: str | None
    key: str
    origin: str  # where it was listed: "manifest.csv line 7", or the file itself
    problem: str | None = None
    key_from_name: bool = False  # no key column: the key is the file's stem (which may be an MRN or accession no.)

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else self.origin


def read_entries(source, image_column: str | None = None, text_column: str | None = None,
                 key_column: str | None = None, require_text: bool = True) -> list[Entry]:
    """Every item listed by `source` (manifest file or folder), in listing order."""
    source = Path(source)
    if not source.exists():
        raise DataError(source, "no such file or folder")
    if source.is_dir():
        for name in FOLDER_MANIFESTS:
            if (source / name).is_file():
                return read_entries(source / name, image_column, text_column, key_column, require_text)
        return scan_folder(source)
    suffix = source.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise DataError(source, "not a manifest (.csv, .tsv or .jsonl) or a folder")
    rows = _jsonl_rows(source) if suffix in (".jsonl", ".ndjson") else _csv_rows(source, suffix)
    columns = _columns(rows)
    image_col = _pick_column(source, columns, image_column, IMAGE_COLUMNS, "image", "image_column / --image-column")
    text_col = _pick_column(source, columns, text_column, TEXT_COLUMNS, "text",
                            "text_column / --text-column", required=require_text)
    key_col = key_column or (KEY_COLUMN if KEY_COLUMN in columns else None)
    if key_column and key_column not in columns:
        raise DataError(source, f"no column '{key_column}' (columns: {', '.join(sorted(columns))})")
    return [_entry(source, line, row, problem, image_col, text_col, key_col) for line, row, problem in rows]


def scan_folder(folder: Path) -> list[Entry]:
    """Image files under `folder` (sorted, hidden files skipped); a `<stem>.txt` beside one is its caption."""
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or path.name in NOT_IMAGES:
            continue
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES or (not suffix and image_format(path) == "dicom"):
            caption, problem = _sidecar_caption(path)
            entries.append(Entry(path, caption, path.stem, str(path), problem, key_from_name=True))
    return entries


def _sidecar_caption(image: Path) -> tuple[str | None, str | None]:
    sidecar = image.with_suffix(".txt")
    if not sidecar.is_file():
        return None, None
    try:
        caption = sidecar.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return None, f"caption file {sidecar.name} is not valid UTF-8"
    return (caption, None) if caption else (None, f"caption file {sidecar.name} is empty")


def _csv_rows(path: Path, suffix: str) -> list[tuple[int, dict, str | None]]:
    # Undecodable bytes become surrogates so that one bad caption spoils one row, not the whole file.
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
    rows = []
    try:
        if not reader.fieldnames:
            raise DataError(path, "empty manifest (no header line)")
        for row in reader:
            rows.append((reader.line_num, row, None))
    except csv.Error as exc:
        raise DataError(path, f"line {reader.line_num}: not valid CSV ({exc})") from None
    return rows


def _jsonl_rows(path: Path) -> list[tuple[int, dict, str | None]]:
    rows = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError:
            rows.append((number, {}, "line is not valid UTF-8 text"))
            continue
        except json.JSONDecodeError as exc:
            rows.append((number, {}, f"line is not valid JSON ({exc.msg})"))
            continue
        if isinstance(row, dict):
            rows.append((number, row, None))
        else:
            rows.append((number, {}, "line is not a JSON object"))
    return rows


def _columns(rows) -> set[str]:
    return {name for _, row, _ in rows for name in row if name is not None}


def _pick_column(source: Path, columns: set[str], wanted: str | None, candidates, what: str, option: str,
                 required: bool = True) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(source, f"no column '{wanted}' (columns: {', '.join(sorted(columns)) or 'none'})")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    if not required:
        return None
    raise DataError(source, f"no {what} column: expected one of {', '.join(candidates)} (columns: "
                            f"{', '.join(sorted(columns)) or 'none'}); name it with {option}")


def _entry(source: Path, line: int, row: dict, problem: str | None, image_col: str, text_col: str | None,
           key_col: str | None) -> Entry:
    origin = f"{source.name} line {line}"
    value = row.get(image_col)
    if problem is None:
        problem = _text_problem(value, f"image path (column '{image_col}')")
    path = None
    if problem is None:
        path = Path(value.strip())
        path = path if path.is_absolute() else source.parent / path
        if not path.is_file():
            problem = "is a folder, not an image file" if path.is_dir() else "file not found"
    caption = row.get(text_col) if text_col else None
    if problem is None and text_col is not None:
        problem = _text_problem(caption, "caption")
    key = row.get(key_col) if key_col else None
    from_name = not isinstance(key, str) or not key.strip() or _has_surrogates(key)
    if from_name:
        key = Path(value.strip()).stem if isinstance(value, str) and not _has_surrogates(value) else origin
    # The line is named once: as the place when no file is named ("x.jsonl line 2: ..."), else after the problem.
    shown = problem if problem is None or path is None else f"{problem} ({origin})"
    return Entry(path, caption.strip() if isinstance(caption, str) and problem is None else None, key.strip(),
                 origin, shown, key_from_name=from_name)


SALT_FILE = "pseudonym_salt.txt"


def pseudonym(name: str, salt: str) -> str:
    """A key that stands for a file name without revealing it: a salted hash (HMAC-SHA256), stable for one salt.
    Without the salt, a name cannot be confirmed by hashing candidate MRNs."""
    return "id-" + hmac.new(salt.encode(), name.encode(), hashlib.sha256).hexdigest()[:16]


def run_salt(run_dir: str | Path) -> str:
    """The run folder's pseudonym salt, created on first use: resuming keeps the same pseudonyms, and several
    processes starting together agree on one salt (the file appears whole, by one hard link, or not at all)."""
    path = Path(run_dir) / SALT_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{SALT_FILE}.{os.getpid()}")
        tmp.write_text(secrets.token_hex(16) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def _text_problem(value, what: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return f"empty {what}"
    if not isinstance(value, str):
        return f"{what} is not text"
    if _has_surrogates(value):
        return f"{what} is not valid UTF-8"
    return None


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)
