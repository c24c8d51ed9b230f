"""The training-data audit: near-duplicate images, leakage across splits and repeated captions, before any
fine-tuning.

Duplicated training images are the ones diffusion models copy (Carlini et al. 2023; Somepalli et al. 2023), and a
held-out image that is also in the training set makes every held-out figure optimistic. The findings:

* ``near_duplicate``: two training images whose similarity reaches ``threshold`` (the same film re-exported at
  another bit depth, window or crop);
* ``same_patient``: two training records of one patient (the manifest's patient column), whatever the images;
* ``leak_image`` / ``leak_patient``: a held-out image near a training image, or a patient in both splits (the
  latter only when both manifests name patients with one pseudonym mapping: the bundled cohorts number their
  subjects per folder, so ``sub-0001`` of one is not ``sub-0001`` of the other);
* ``repeated_caption``: identical captions after folding case and whitespace.

Similarity is the cosine of features, found by an exact range search (``pairs_above``: every pair is scored, one
matrix product per block, and every pair above the threshold kept). In pixel space the rows are centred first, which makes the cosine the Pearson correlation of the two
images: unchanged by a linear window / level change, the commonest difference between two exports of one film.

``PIXEL_THRESHOLD`` was calibrated on separate data, never on a cohort it is tested on: ``bench/calibrate_duplicates.py``
renders 2,000 public-site and 2,000 private-site phantom patients (seeds disjoint from the bundled cohorts), takes
as positives each one re-exported with another window (linear, clipped) and 8-bit quantisation, or cropped, and as
negatives each patient's most similar *other* patient. At 0.99: no negative of 4,000 above it (95% upper bound
0.1% per image), every re-export with another window above it, but only 2% of crops of up to 6% a side (pixels
do not line up after a crop; the copy-detector embedder finds about half of them, see the README).

Records are named by their pseudonymised key (the manifest's subject column, else a salted hash of the file stem)
and manifest line; never by a file path or a DICOM header.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError

# Pixel-space (32 x 32, centred cosine) threshold, calibrated by bench/calibrate_duplicates.py (see module doc).
PIXEL_THRESHOLD = 0.99
PIXEL_SIZE = 32
KINDS = ("near_duplicate", "same_patient", "leak_image", "leak_patient", "repeated_caption")
ON_DUPLICATES = ("warn", "error", "ignore")


@dataclass(frozen=True)
class Record:
    """One listed item as the audit names it: never a path."""

    split: str          # "train" or "heldout"
    index: int          # position in its split's list
    key: str            # pseudonymised key
    line: int | None    # manifest line, when listed by a manifest
    caption: str | None = None
    patient: str | None = None


@dataclass(frozen=True)
class Pair:
    kind: str
    a: Record
    b: Record
    similarity: float | None = None

    def row(self) -> dict:
        return {"kind": self.kind, "split_a": self.a.split, "key_a": self.a.key, "line_a": self.a.line,
                "split_b": self.b.split, "key_b": self.b.key, "line_b": self.b.line,
                "similarity": None if self.similarity is None else round(self.similarity, 6)}


@dataclass
class AuditResult:
    pairs: list[Pair]
    threshold: float
    features: str
    n_train: int
    n_heldout: int = 0
    groups: list[list[int]] = field(default_factory=list)  # training indices that are one image or one patient

    def count(self, *kinds: str) -> int:
        return sum(p.kind in kinds for p in self.pairs)

    def distinct(self, *kinds: str) -> int:
        """Pairs of records found by any of ``kinds``: a pair that is one image and one patient counts once."""
        return len({frozenset(((p.a.split, p.a.index), (p.b.split, p.b.index))) for p in self.pairs if p.kind in kinds})

    @property
    def duplicate_pairs(self) -> int:
        return self.distinct("near_duplicate", "same_patient")

    @property
    def leaks(self) -> int:
        return self.distinct("leak_image", "leak_patient")

    def summary(self) -> str:
        counts = ", ".join(f"{self.count(k)} {k.replace('_', ' ')}" for k in KINDS
                           if not k.startswith("leak") or self.n_heldout)
        return (f"{self.n_train} training images{f', {self.n_heldout} held-out' if self.n_heldout else ''}: {counts} "
                f"pair(s); {len(self.groups)} duplicate group(s) ({self.features}, threshold {self.threshold:g})")


def similarity_rows(features: torch.Tensor, centre: bool) -> torch.Tensor:
    """Unit rows whose dot products are the audit's similarities (centred first in pixel space: Pearson)."""
    x = features.flatten(1).to(torch.float32)
    if centre:
        x = x - x.mean(1, keepdim=True)
    return F.normalize(x, dim=1)


def pairs_above(queries: torch.Tensor, references: torch.Tensor, threshold: float, same_set: bool,
                block: int = 2048, chunk_size: int = 16384, progress: bool = True) -> list[tuple[int, int, float]]:
    """Every (query, reference, similarity) with similarity >= threshold, exactly: a range search over the full
    similarity matrix, computed block by block (one matrix product each, nothing ranked). With ``same_set`` a row is
    not its own pair and each pair comes once, so only the blocks on or above the diagonal are computed."""
    q_all = F.normalize(torch.as_tensor(queries, dtype=torch.float32), dim=1)
    r_all = F.normalize(torch.as_tensor(references, dtype=torch.float32), dim=1)
    found = []
    for q0 in tqdm(range(0, len(q_all), block), desc="near-duplicate search", unit="block", leave=False,
                   disable=not progress or None):
        q = q_all[q0:q0 + block]
        for r0 in range(q0 if same_set else 0, len(r_all), chunk_size):
            sims = q @ r_all[r0:r0 + chunk_size].T
            rows, cols = torch.nonzero(sims >= threshold, as_tuple=True)
            for i, j, value in zip((rows + q0).tolist(), (cols + r0).tolist(), sims[rows, cols].tolist()):
                if not (same_set and j <= i):
                    found.append((i, j, value))
    return sorted(found)


def normalise_caption(text: str | None) -> str | None:
    return " ".join(text.split()).casefold() if text else None


def _groups(n: int, links) -> list[list[int]]:
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in links:
        parent[root(a)] = root(b)
    members = defaultdict(list)
    for i in range(n):
        members[root(i)].append(i)
    return sorted(m for m in members.values() if len(m) > 1)


def audit_records(train: list[Record], train_rows: torch.Tensor, heldout: list[Record] | None = None,
                  heldout_rows: torch.Tensor | None = None, threshold: float = PIXEL_THRESHOLD,
                  shared_patients: bool = False, features: str = "pixels", progress: bool = True) -> AuditResult:
    """All findings for a training set (and a held-out set): ``*_rows`` are ``similarity_rows`` of their images."""
    if not -1.0 <= threshold <= 1.0:
        raise ConfigError(f"the duplicate threshold is a cosine similarity in [-1, 1], got {threshold}")
    if len(train) != len(train_rows):
        raise ValueError(f"{len(train)} training records for {len(train_rows)} feature rows")
    pairs = [Pair("near_duplicate", train[a], train[b], s)
             for a, b, s in pairs_above(train_rows, train_rows, threshold, True, progress=progress)]
    by_patient = defaultdict(list)
    for r in train:
        if r.patient:
            by_patient[r.patient].append(r)
    pairs += [Pair("same_patient", rs[i], rs[j]) for rs in by_patient.values()
              for i in range(len(rs)) for j in range(i + 1, len(rs))]
    by_caption = defaultdict(list)
    for r in train:
        if normalise_caption(r.caption):
            by_caption[normalise_caption(r.caption)].append(r)
    pairs += [Pair("repeated_caption", rs[i], rs[j]) for rs in by_caption.values()
              for i in range(len(rs)) for j in range(i + 1, len(rs))]
    if heldout:
        pairs += [Pair("leak_image", train[r], heldout[q], s)
                  for q, r, s in pairs_above(heldout_rows, train_rows, threshold, False, progress=progress)]
        if shared_patients:
            pairs += [Pair("leak_patient", t, h) for h in heldout if h.patient in by_patient
                      for t in by_patient[h.patient]]
    groups = _groups(len(train), ((p.a.index, p.b.index) for p in pairs if p.kind in ("near_duplicate",
                                                                                         "same_patient")))
    return AuditResult(pairs, threshold, features, len(train), len(heldout or []), groups)


def deduplicate(result: AuditResult) -> list[int]:
    """Training indices to keep: the first record of each duplicate group and every record outside one, less those
    that leak into the held-out set (a held-out figure must not be measured on a training image)."""
    dropped = {i for g in result.groups for i in g[1:]}
    dropped |= {p.a.index for p in result.pairs if p.kind in ("leak_image", "leak_patient")}
    return [i for i in range(result.n_train) if i not in dropped]


def check_duplicates(result: AuditResult, on_duplicates: str, where: str) -> str | None:
    """The warning to print (or None) for a job's training data; raises ``ConfigError`` with ``on_duplicates=error``."""
    if on_duplicates not in ON_DUPLICATES:
        raise ConfigError(f"data_audit.on_duplicates must be one of {', '.join(ON_DUPLICATES)}, not {on_duplicates!r}")
    found = result.duplicate_pairs + result.leaks
    if on_duplicates == "ignore" or not found:
        return None
    message = (f"{where}: the training data holds {result.duplicate_pairs} near-duplicate or same-patient pair(s) in "
               f"{len(result.groups)} group(s) and {result.leaks} pair(s) leaking into the held-out set "
               f"(run `memcontrol audit-data` to see them; data_audit.deduplicate: true trains on one record per "
               f"group)")
    if on_duplicates == "error":
        raise ConfigError(message + "; data_audit.on_duplicates is 'error'")
    return message


# --- from a job's data sources -------------------------------------------------------------------------------------

def _line(entry) -> int | None:
    match = re.search(r" line (\d+)$", entry.origin)
    return int(match.group(1)) if match and entry.path is not None and entry.origin != str(entry.path) else None


def records_of(dataset, split: str) -> list[Record]:
    """The audit's records of a dataset from ``load_source``: the patient is the manifest's key column (subject),
    never a name taken from a file."""
    return [Record(split, i, e.key, _line(e), e.caption, None if e.key_from_name else e.key)
            for i, e in enumerate(dataset.entries)]


def threshold_for(features: dict, threshold: float | None) -> float:
    if threshold is not None:
        return float(threshold)
    if features.get("type") != "pixels":
        raise ConfigError(f"data_audit.threshold (--threshold) is needed for {features.get('type')} features: "
                          f"only the pixel-space threshold ({PIXEL_THRESHOLD}) is calibrated by memcontrol; "
                          "calibrate one on other data (bench/calibrate_duplicates.py --features)")
    return PIXEL_THRESHOLD


def feature_rows(dataset, features: dict, cache_dir=None, desc: str | None = None) -> torch.Tensor:
    from ..metrics.embedders import build_embedder, cached_embed

    spec = dict(features)
    if spec.get("type") == "pixels" and spec.get("size") is None:
        spec["size"] = PIXEL_SIZE
    embedder = build_embedder(spec)
    feats = cached_embed(embedder, dataset, cache_dir, desc=desc)
    if spec["type"] == "pixels":
        # Grey levels (the mean of the channels the embedder gives): a third of the search's work for 3-channel
        # copies of grey films, and a near-duplicate is one in brightness first.
        feats = feats.reshape(len(feats), -1, spec["size"] ** 2).mean(1)
    return similarity_rows(feats, centre=spec["type"] == "pixels")


def audit_datasets(train, heldout=None, features: dict | None = None, threshold: float | None = None,
                   shared_patients: bool = False, cache_dir=None, progress: bool = True) -> AuditResult:
    """``audit_records`` on datasets from ``load_source`` (their keys already pseudonymised where they came from
    file names)."""
    features = dict(features or {"type": "pixels"})
    threshold = threshold_for(features, threshold)
    name = features["type"] + (f" {features['path']}" if features.get("path") else "")
    train_rows = feature_rows(train, features, cache_dir, "embed training images")
    held = records_of(heldout, "heldout") if heldout is not None else None
    held_rows = feature_rows(heldout, features, cache_dir, "embed held-out images") if heldout is not None else None
    return audit_records(records_of(train, "train"), train_rows, held, held_rows, threshold, shared_patients, name,
                         progress)


def audit_job_data(train, heldout, audit: dict, where: str, cache_dir=None):
    """What ``search`` and ``finetune`` do with their training data before training: the audit, its warning (printed;
    an error with ``on_duplicates: error``), and the training set to use (one record per duplicate group with
    ``deduplicate: true``). ``audit`` is the config's ``data_audit`` section as a mapping."""
    from .dataset import subset

    if audit["on_duplicates"] == "ignore" and not audit["deduplicate"]:
        return train, None
    result = audit_datasets(train, heldout, audit["features"], audit["threshold"], audit["shared_patients"],
                            cache_dir, progress=False)
    message = check_duplicates(result, audit["on_duplicates"], where)
    if message:
        print(f"warning: {message}", flush=True)
    if audit["deduplicate"]:
        keep = deduplicate(result)
        if len(keep) < len(train):
            print(f"{where}: training on {len(keep)} of {len(train)} records (data_audit.deduplicate)", flush=True)
            train = subset(train, keep)
    return train, result
