"""The HTML report builder and figure helpers (reused by the search's report)."""

import base64
import re

import numpy as np
import torch

from memcontrol.report import HtmlReport, histogram_figure, pairs_figure, save_figure, to_display


def test_report_escapes_text_and_embeds_figures(tmp_path):
    report = HtmlReport("Audit <of> model")
    report.add_heading("Captions & keys")
    report.add_text('caption "<script>alert(1)</script>"', note=True)
    report.add_table([{"key": "<b>sub-01</b>", "copies": 3, "similarity": 0.912345, "copy": True},
                      {"key": "sub-02", "copies": 0, "similarity": None, "copy": False}], max_rows=1)
    fig = histogram_figure({"generated": [0.9, 0.95, None, float("nan")], "held-out": [0.3, 0.4]},
                           xlabel="similarity", threshold=0.5)
    png = save_figure(fig, tmp_path / "hist.png")
    report.add_figure(png, caption="from a file")
    report.add_figure(histogram_figure({"x": [1, 2, 3]}, xlabel="x"), caption="from a figure")
    html = report.write(tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;sub-01" in html
    assert "0.9123" in html and ">yes<" in html and "1 more rows" in html and "sub-02" not in html
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 2 and base64.b64decode(images[0]) == png.read_bytes()
    assert not re.search(r'(src|href)="(?!data:)', html)


def test_pairs_figure_and_display_conversion(tmp_path):
    gen = torch.linspace(-1, 1, 3 * 8 * 8).view(1, 3, 8, 8).repeat(5, 1, 1, 1)
    gray = torch.zeros(5, 1, 8, 8)
    assert to_display(gen[0]).shape == (8, 8, 3) and to_display(gray[0]).shape == (8, 8)
    assert np.isclose(to_display(gen[0]).min(), 0) and np.isclose(to_display(gen[0]).max(), 1)
    path = save_figure(pairs_figure(gen, gray, [f"{i}" for i in range(5)], columns=2), tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
