"""What the training-data audit writes: ``pairs.csv``, ``groups.csv``, ``pairs.png`` and ``report.html`` (one
self-contained file, ``memcontrol.report.HtmlReport``), and the report section other reports can add."""

from __future__ import annotations

import csv
from pathlib import Path

from ..report import HtmlReport, pairs_figure, save_figure
from .duplicates import KINDS, AuditResult, deduplicate

PAIR_COLUMNS = ("kind", "split_a", "key_a", "line_a", "split_b", "key_b", "line_b", "similarity")
SHOWN_PAIRS = 16
IMAGE_KINDS = ("near_duplicate", "leak_image", "same_patient", "leak_patient")


def _write_csv(path: Path, columns, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def group_rows(result: AuditResult, records) -> list[dict]:
    kept = set(deduplicate(result))
    return [{"group": g, "key": records[i].key, "line": records[i].line, "kept": i in kept}
            for g, members in enumerate(result.groups, start=1) for i in members]


def pairs_png(result: AuditResult, train, heldout):
    """The image pairs (near-duplicates and leaks first, most similar first), side by side; None when there are
    none."""
    shown = sorted((p for p in result.pairs if p.kind in IMAGE_KINDS),
                   key=lambda p: (IMAGE_KINDS.index(p.kind), -(p.similarity or 0)))[:SHOWN_PAIRS]
    if not shown:
        return None

    def image(record):
        return (train if record.split == "train" else heldout)[record.index]["pixel_values"]

    def name(record):
        return f"{record.split} {record.key}" + (f" l.{record.line}" if record.line else "")

    labels = [f"{p.kind.replace('_', ' ')}" + (f" {p.similarity:.3f}" if p.similarity is not None else "")
              + f"\n{name(p.a)} | {name(p.b)}" for p in shown]
    return pairs_figure([image(p.a) for p in shown], [image(p.b) for p in shown], labels, tags=("", ""))


def report_section(report: HtmlReport, result: AuditResult, figure: Path | None, records) -> None:
    """The audit as a section of an HTML report."""
    report.add_heading("Training-data audit")
    report.add_text(f"{result.summary()}. Near-duplicates: two training images whose similarity ({result.features}) "
                    f"reaches {result.threshold:g}; same patient: two training records with one patient key; leaks: "
                    "a held-out image near a training image, or a patient in both splits; repeated captions: "
                    "identical after folding case and whitespace. Records are named by pseudonymised key and "
                    "manifest line.")
    report.add_table([{"finding": k.replace("_", " "), "pairs": result.count(k)} for k in KINDS])
    if result.duplicate_pairs + result.leaks:
        report.add_text(f"{len(result.groups)} duplicate group(s): de-duplicating (data_audit.deduplicate) keeps "
                        f"{len(deduplicate(result))} of {result.n_train} training records.", note=True)
    if figure is not None:
        report.add_figure(figure, caption="pairs found: each record beside the other one (similarity in the title)")
    rows = [p.row() for p in result.pairs if p.kind != "repeated_caption"]
    if rows:
        report.add_table(rows, columns=PAIR_COLUMNS, caption="Image and patient pairs", max_rows=40)
    groups = group_rows(result, records)
    if groups:
        report.add_table(groups, caption="Duplicate groups (kept: the record de-duplication trains on)", max_rows=40)


def write_outputs(out: Path, result: AuditResult, train, heldout=None) -> list[str]:
    """All files of an ``audit-data`` run; returns their names."""
    from .duplicates import records_of

    records = records_of(train, "train")
    _write_csv(out / "pairs.csv", PAIR_COLUMNS, [p.row() for p in result.pairs])
    _write_csv(out / "groups.csv", ("group", "key", "line", "kept"), group_rows(result, records))
    files = ["pairs.csv", "groups.csv"]
    fig = pairs_png(result, train, heldout)
    figure = None
    if fig is not None:
        figure = save_figure(fig, out / "pairs.png")
        files.append("pairs.png")
    report = HtmlReport("Training-data audit")
    report_section(report, result, figure, records)
    report.write(out / "report.html")
    return files + ["report.html"]
