"""Self-contained HTML reports and the figures they show.

``HtmlReport`` collects headings, paragraphs, tables and figures and writes ONE html file: figures are embedded as
base64 PNG, the style sheet is inline, nothing is loaded from elsewhere, so the file can be mailed to a privacy
officer or archived as it is. The figure helpers draw with matplotlib (Agg backend, no display needed):
generated images beside their nearest training image, and histograms with a threshold line.

    report = HtmlReport("Memorization audit")
    report.add_heading("Copy detection")
    report.add_table([{"metric": "fraction of copies", "value": 0.25}])
    report.add_figure(pairs_figure(generated, nearest, labels), caption="generated | nearest training image")
    report.write(out_dir / "report.html")
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #1d1d1f; line-height: 1.45; padding: 0 1em; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .7em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: .9em; }
p.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .5em .8em; }
"""


def format_value(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def figure_png(fig) -> bytes:
    """PNG bytes of a matplotlib figure; the figure is closed (figures otherwise pile up in pyplot's registry)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_atomically(path: str | Path, data: bytes) -> Path:
    """Write through a temporary file and one rename: a reader, or another process writing the same report (two
    machines finalizing one run folder), never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def save_figure(fig, path: str | Path) -> Path:
    return write_atomically(path, figure_png(fig))


class HtmlReport:
    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def add_heading(self, text: str, level: int = 2) -> None:
        level = min(max(level, 1), 4)
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def add_text(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def add_table(self, rows: Sequence[dict] | Sequence[Sequence], columns: Sequence[str] | None = None,
                  caption: str | None = None, max_rows: int | None = None) -> None:
        """Rows as dicts (columns = their keys, in first-seen order) or as sequences with ``columns`` given."""
        rows = list(rows)
        if rows and isinstance(rows[0], dict):
            if columns is None:
                columns = list(dict.fromkeys(k for r in rows for k in r))
            rows = [[r.get(c) for c in columns] for r in rows]
        columns = list(columns or [])
        shown = rows if max_rows is None else rows[:max_rows]
        out = ["<table>"]
        if caption:
            out.append(f"<caption>{html.escape(caption)}</caption>")
        if columns:
            out.append("<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns) + "</tr>")
        for row in shown:
            cells = []
            for v in row:
                cls = ' class="num"' if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else ""
                cells.append(f"<td{cls}>{html.escape(format_value(v))}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</table>")
        self.parts.append("".join(out))
        if max_rows is not None and len(rows) > max_rows:
            self.add_text(f"({len(rows) - max_rows} more rows in the CSV file)")

    def add_figure(self, figure, caption: str | None = None) -> None:
        """A matplotlib figure, PNG bytes, or the path of a PNG file, embedded as base64."""
        if isinstance(figure, (str, Path)):
            data = Path(figure).read_bytes()
        elif isinstance(figure, (bytes, bytearray)):
            data = bytes(figure)
        else:
            data = figure_png(figure)
        encoded = base64.b64encode(data).decode("ascii")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure><img alt="{html.escape(caption or "figure")}" '
                          f'src="data:image/png;base64,{encoded}">{cap}</figure>')

    def render(self) -> str:
        body = "\n".join(self.parts)
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head>\n"
                f"<body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>\n")

    def write(self, path: str | Path) -> Path:
        return write_atomically(path, self.render().encode("utf-8"))


def to_display(image) -> np.ndarray:
    """A [-1, 1] image C x H x W (tensor or array) as H x W x 3 (or H x W for one channel) in [0, 1]."""
    arr = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, dtype=np.float32)
    arr = np.clip((arr + 1) / 2, 0, 1)
    if arr.shape[0] == 1:
        return arr[0]
    return np.transpose(arr[:3], (1, 2, 0))


def pairs_figure(generated, nearest, labels: Sequence[str], columns: int = 4, max_pairs: int = 16,
                 tags: tuple[str, str] = ("generated", "training")):
    """Generated images beside their nearest training image (or any two image lists, named by ``tags``), each
    pair titled with its label (e.g. similarity)."""
    import matplotlib.pyplot as plt

    n = min(len(generated), max_pairs)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2 * columns * 1.3, rows * 1.55), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, columns)
        for j, (img, tag) in enumerate(((generated[i], tags[0]), (nearest[i], tags[1]))):
            ax = axes[r, 2 * c + j]
            pic = to_display(img)
            ax.imshow(pic, cmap="gray" if pic.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_title(f"{tag}\n{labels[i]}" if j == 0 else tag, fontsize=7)
    fig.tight_layout()
    return fig


def histogram_figure(series: dict[str, Sequence[float]], xlabel: str, threshold: float | None = None,
                     threshold_label: str = "threshold", title: str | None = None, bins: int = 30):
    """Overlaid histograms of named value sets (e.g. generated vs held-out), with an optional threshold line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    finite = [np.asarray([v for v in vals if v is not None and np.isfinite(v)], dtype=float)
              for vals in series.values()]
    pooled = np.concatenate([f for f in finite if len(f)]) if any(len(f) for f in finite) else np.zeros(1)
    lo, hi = float(pooled.min()), float(pooled.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    for (name, _), vals in zip(series.items(), finite):
        if len(vals):
            ax.hist(vals, bins=edges, alpha=0.55, label=f"{name} (n={len(vals)})")
    if threshold is not None:
        ax.axvline(threshold, color="crimson", linestyle="--", label=f"{threshold_label} = {threshold:.3g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
