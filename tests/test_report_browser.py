"""The study report in a real headless Chromium: it loads offline, the plotly figures render, the PNGs decode,
the console stays clean and nothing refers to the network. A negative control shows the checks can fail."""
from __future__ import annotations

import time
from html.parser import HTMLParser

import pytest

from rlhf_lab.study.plots import FIGURE_TITLES
from rlhf_lab.study.report import write_report
from tests import headless_chromium as hc
from tests.synthetic_study import write_synthetic_study

pytestmark = pytest.mark.skipif(hc.missing_reason() is not None, reason=hc.missing_reason() or "")

URL_ATTRS = {"src", "href", "action", "data", "poster", "srcset", "formaction"}


class _RefCollector(HTMLParser):
    """Every URL-bearing attribute of every real element (script bodies are not markup, so plotly.js's
    own string constants don't count — the browser never fetches them)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [(tag, k, v or "") for k, v in attrs if k in URL_ATTRS]


def network_refs(html_text: str) -> list[tuple[str, str, str]]:
    parser = _RefCollector()
    parser.feed(html_text)
    return [r for r in parser.refs if r[2].strip().lower().startswith(("http:", "https:", "//", "ftp:"))]


def severe(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e.get("level") == "SEVERE"]


@pytest.fixture(scope="module")
def browser():
    b = hc.HeadlessChromium()
    yield b
    survivors = b.close()
    assert not survivors, f"browser processes left running or unreaped: {survivors}"


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    study = write_synthetic_study(tmp_path_factory.mktemp("study") / "synthetic", judged=True)
    report = write_report(study)
    browser.driver.get(report.as_uri())
    time.sleep(0.5)  # let plotly's deferred layout callbacks run before the console is read
    return {"driver": browser.driver, "report": report, "console": browser.console()}


def test_page_loads_with_every_section(page):
    d = page["driver"]
    assert d.execute_script("return document.readyState") == "complete"
    assert d.title == "rlhf_lab study: synthetic"
    headings = d.execute_script("return [...document.querySelectorAll('h2')].map(h => h.textContent)")
    for h in ("How to read the frontier", "Figures", "Best gold reward per method at KL budgets",
              "Methods compared at each KL budget", "Runs still moving at their last evaluation", "Frontier points", "Runs (final evaluation)", "Judge win rates", "Provenance"):
        assert h in headings
    runs = d.execute_script("return document.querySelectorAll('table.tbl').length")
    assert runs >= 6  # budgets, frontier, runs, judges ×2, provenance facts, stages, versions


def test_plotly_figures_render(page):
    figs = page["driver"].execute_script("""
        return [...document.querySelectorAll('.js-plotly-plot')].map(e => {
            const r = e.getBoundingClientRect();
            return {id: e.id, w: r.width, h: r.height, svgs: e.querySelectorAll('.main-svg').length,
                    traces: e.data.length, points: e.querySelectorAll('.scatterlayer .point').length,
                    lines: e.querySelectorAll('.scatterlayer path.js-line').length};
        });""")
    assert [f["id"] for f in figs] == [f"rlhf-fig-{n}" for n in FIGURE_TITLES]
    for f in figs:
        assert f["w"] > 300 and f["h"] > 300, f
        assert f["svgs"] >= 1 and f["points"] > 0, f
    frontier = figs[0]
    assert frontier["traces"] == 4 * 2 + 1  # per method: all points + frontier line; plus the SFT star
    assert frontier["lines"] >= 4           # one frontier staircase per method was drawn


def test_png_images_decode(page):
    widths = page["driver"].execute_async_script("""
        const done = arguments[arguments.length - 1];
        Promise.all([...document.images].map(i => i.decode().then(() => i.naturalWidth, e => -1))).then(done);""")
    assert len(widths) == len(FIGURE_TITLES)
    assert all(w > 100 for w in widths), widths


def test_no_console_errors(page):
    assert severe(page["console"]) == []


def test_no_network_references(page):
    text = page["report"].read_text()
    assert network_refs(text) == []
    assert "Content-Security-Policy" in text and text.count("<script type=\"text/javascript\">") == 1
    d = page["driver"]
    # after plotly has built its DOM (modebar links etc.), nothing points outside the page either
    live = d.execute_script("""return [...document.querySelectorAll('[src],[href]')]
        .map(e => e.getAttribute('src') || e.getAttribute('href'))""")
    assert [u for u in live if u.lower().startswith(("http:", "https:", "//"))] == []
    fetched = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith("data:") for u in fetched), fetched


def test_checks_catch_a_broken_page(browser, tmp_path):
    """Negative control: an external image and a script error are both caught by the same checks."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><head><title>bad</title></head><body>"
                   "<img src='https://example.invalid/x.png'><script src='http://example.invalid/x.js'></script>"
                   "<script>console.error('deliberate'); undefinedFunction();</script></body></html>")
    assert {r[:2] for r in network_refs(bad.read_text())} == {("img", "src"), ("script", "src")}
    browser.driver.get(bad.as_uri())
    time.sleep(0.3)
    messages = " ".join(e["message"] for e in severe(browser.console()))
    assert "deliberate" in messages and "undefinedFunction" in messages


def test_report_without_study_json_still_renders(browser, tmp_path):
    study = write_synthetic_study(tmp_path / "partial", seeds=(0,), meta=False)
    report = write_report(study)
    browser.driver.get(report.as_uri())
    time.sleep(0.3)
    assert severe(browser.console()) == []
    notes = browser.driver.execute_script("return [...document.querySelectorAll('.note')].map(n => n.textContent)")
    assert any("study.json missing" in n for n in notes)
    assert browser.driver.execute_script("return document.querySelectorAll('.js-plotly-plot .main-svg').length") > 0
