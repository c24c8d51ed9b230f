"""What an audit reads: the model (with its adapter), the prompts, and the training and held-out images at the
analysis resolution."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import DataError, MissingWeightsError


@dataclass
class ImageSet:
    images: torch.Tensor  # N x 3 x R x R in [-1, 1], at the analysis resolution
    captions: list[str]
    keys: list[str]
    skipped: list = field(default_factory=list)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt file (one per line, '#' comments) or a CSV/TSV/JSONL with a prompt/text/caption column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "prompts file not found")
    if path.suffix in (".csv", ".tsv", ".jsonl", ".ndjson"):
        if path.suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ","))
        else:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        column = next((c for c in ("prompt", "text", "caption") if rows and c in rows[0]), None)
        if column is None:
            raise DataError(path, "no 'prompt', 'text' or 'caption' column")
        prompts = [str(r[column]).strip() for r in rows if str(r.get(column) or "").strip()]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DataError(path, "no prompts in the file")
    return prompts


def load_image_set(source, resolution: int, on_error: str, what: str, salt: str) -> ImageSet:
    from ..data import load_source

    ds = load_source({"source": str(source), "on_error": on_error}, resolution, salt=salt)
    images = torch.stack([ds[i]["pixel_values"] for i in tqdm(range(len(ds)), desc=f"reading {what}",
                                                              unit="img", leave=False)])
    return ImageSet(images.float(), list(ds.captions), list(ds.keys), list(ds.skipped))


def resized(images: torch.Tensor, size: int | None) -> torch.Tensor:
    if not size or images.shape[-1] == size:
        return images
    mode = "area" if images.shape[-1] > size else "bilinear"
    return F.interpolate(images, size=(size, size), mode=mode)


def load_model(model, adapter, device, dtype):
    from ..models import load_pipeline

    pipe = load_pipeline(model, device=device, dtype=dtype)
    if adapter:
        folder = Path(adapter)
        if not folder.is_dir():
            raise MissingWeightsError("adapter folder", folder, "--adapter")
        from ..export import load_adapter

        load_adapter(pipe, folder)
    return pipe


def choose_prompts(prompts: list[str], limit: int | None, seed: int) -> list[str]:
    """Distinct prompts in first-seen order; a seeded subset of ``limit`` when there are more."""
    unique = list(dict.fromkeys(prompts))
    if limit and len(unique) > limit:
        keep = sorted(np.random.default_rng(seed).choice(len(unique), limit, replace=False).tolist())
        unique = [unique[i] for i in keep]
    return unique
