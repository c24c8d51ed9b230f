"""The HTML reports as people open them: rendered by a real headless Chromium (.ci/run installs it from the system's
packages), which must decode every figure, show the chosen candidate and the tables, and log no error."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures_browser import EXECUTABLES, Page, find_chromium
from fixtures_search import cheap_search_config, write_config
from memcontrol.cli import main

REPO = Path(__file__).resolve().parent.parent

# Every <img> decoded (a broken data: URI loads as complete with naturalWidth 0).
IMAGES = "[...document.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0}))"
TABLES = "[...document.querySelectorAll('table')].map(t => t.rows.length)"
HEADINGS = "[...document.querySelectorAll('h2')].map(h => h.textContent)"


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip(f"no Chromium: none of {', '.join(EXECUTABLES)} is on PATH and MEMCONTROL_CHROMIUM names no "
                    "file (.ci/start_chromium.sh installs Debian's chromium)")
    return found


def _render(chromium: str, path: Path) -> dict:
    page = Page(chromium).open(path)
    try:
        return {"images": page.evaluate(IMAGES), "tables": page.evaluate(TABLES),
                "headings": page.evaluate(HEADINGS), "text": page.evaluate("document.body.innerText"),
                "plots": page.evaluate("document.querySelectorAll('.js-plotly-plot .main-svg').length"),
                "errors": page.errors}
    finally:
        page.close()


def test_the_checks_see_a_broken_page(chromium, tmp_path):
    """The control: a page with an undecodable figure, a console error and an uncaught exception fails each check."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><h2>x</h2><img alt="front" src="data:image/png;base64,AAAA">'
                   '<script>console.error("drawn wrong"); throw new Error("plot failed")</script></body></html>')
    seen = _render(chromium, bad)
    assert seen["images"] == [{"alt": "front", "ok": False}]
    assert any("drawn wrong" in e for e in seen["errors"]) and any("plot failed" in e for e in seen["errors"])


def test_search_report_renders_with_its_chosen_candidate_and_front(chromium, tmp_path, tiny_pipe_dir, search_data):
    cfg = cheap_search_config(tiny_pipe_dir, search_data, search={"n_trials": 1})
    out = tmp_path / "run"
    assert main(["search", "--config", str(write_config(tmp_path / "s.yaml", cfg)), "--out", str(out)]) == 0
    seen = _render(chromium, out / "report.html")
    assert seen["errors"] == []
    assert {"Chosen candidate", "Pareto front", "Search against the baselines", "All trials",
            "Training-data audit"} <= set(seen["headings"])  # the tiny cohort repeats one patient
    assert "★" in seen["text"]  # the chosen row is marked in the tables
    front = [i for i in seen["images"] if i["alt"].startswith("Pareto front")]
    assert len(front) == 1 and all(i["ok"] for i in seen["images"]), seen["images"]
    assert len(seen["tables"]) >= 3 and min(seen["tables"]) >= 2  # a header row and at least one row each
    interactive = _render(chromium, out / "pareto_front.html")
    assert interactive["errors"] == [] and interactive["plots"] >= 1


def test_data_audit_report_renders_its_pairs_and_tables(chromium, tmp_path):
    out = tmp_path / "audit"
    private = REPO / "data" / "hospital" / "private" / "manifest.csv"
    assert main(["audit-data", "--manifest", str(private), "--out", str(out)]) == 3  # the planted duplicates
    seen = _render(chromium, out / "report.html")
    assert seen["errors"] == []
    assert "Training-data audit" in seen["headings"]
    assert len(seen["images"]) == 1 and seen["images"][0]["ok"]
    assert len(seen["tables"]) == 3 and all(n >= 2 for n in seen["tables"])
