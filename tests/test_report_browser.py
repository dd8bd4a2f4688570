"""The rendered page in a real headless Chromium (ficoco.report.browser): it loads, every image
renders, no link dangles, every section can be shot at the desktop and laptop widths.

Needs the Debian packages `chromium` and `chromium-driver`:
    apt-get update && apt-get install -y chromium chromium-driver
"""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from report_fixtures import write_results_tree

from ficoco.report import aggregate_results, render_report
from ficoco.report.aggregate import find_measure_files, find_metrics_files
from ficoco.report.browser import SCREENSHOT_LIMIT_PX, WIDTHS, Browser, BrowserMissing, check_page

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# [id, height] pairs in page order (a JSON object would not keep the order through chromedriver).
SECTION_HEIGHTS = ("return Array.from(document.querySelectorAll('section[id]'))"
                   ".map(s => [s.id, s.getBoundingClientRect().height]);")
# The outermost elements whose right edge lies past the viewport: what to fix when the page overflows.
OVERFLOWING = """
const limit = window.innerWidth;
const wide = Array.from(document.body.querySelectorAll("*"))
    .filter(el => el.getBoundingClientRect().right > limit + 0.5);
return {scrollWidth: document.documentElement.scrollWidth, innerWidth: limit,
        outermost: wide.filter(el => !wide.includes(el.parentElement)).map(el =>
            `${el.closest("section[id]") ? "section#" + el.closest("section[id]").id + " " : ""}` +
            `${el.tagName.toLowerCase()}${el.className ? "." + el.className : ""}: ` +
            `right edge ${Math.round(el.getBoundingClientRect().right)} px`)};
"""


@pytest.fixture(scope="module")
def browser():
    """One Chromium session for the whole module: starting Chromium costs more than a page."""
    try:
        session = Browser()
    except BrowserMissing as error:
        pytest.fail(str(error))
    with session:
        yield session


def render(root: Path, with_measure: bool) -> Path:
    results = write_results_tree(root / "results", with_measure=with_measure)
    aggregate_results(find_metrics_files(results), find_measure_files(results), results / "summary")
    return render_report(results / "summary", root / "report" / "report.html")


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> Path:
    """The page rendered from the fake results tree with measure files (rendering takes seconds)."""
    return render(tmp_path_factory.mktemp("report"), with_measure=True)


def open_and_inspect(browser: Browser, page: Path, width_name: str = "desktop") -> dict:
    browser.open(page, *WIDTHS[width_name])
    return browser.inspect()


def assert_figures_match_images(seen: dict) -> list[dict]:
    """Every figure holds either its image or a "Not drawn" note, never both, never neither, and every
    image of the page is a figure's; returns the placeholder figures."""
    assert seen["figures"], "the page has no figures"
    for figure in seen["figures"]:
        assert (figure["images"] == 1) != figure["notDrawn"], f"figure neither drawn nor a placeholder: {figure}"
    placeholders = [figure for figure in seen["figures"] if figure["notDrawn"]]
    assert len(seen["images"]) == len(seen["figures"]) - len(placeholders)
    assert all(img["src"].startswith("data:image/png;base64,") for img in seen["images"])
    return placeholders


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which a valid PNG has right after its signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR", f"{path} has no IHDR chunk first"
    return struct.unpack(">II", data[16:24])


def test_page_renders_in_chromium(browser, report_page):
    seen = open_and_inspect(browser, report_page)
    assert check_page(seen) == []
    assert seen["title"] == "ficoco report"
    assert seen["tables"] > 0
    assert assert_figures_match_images(seen) == [], "with measure files every figure is drawn"
    assert not any(note.strip().startswith("Not drawn") for note in seen["notes"])


def test_page_without_measure_files_renders_in_chromium(browser, tmp_path):
    seen = open_and_inspect(browser, render(tmp_path, with_measure=False))
    assert check_page(seen) == []
    placeholders = assert_figures_match_images(seen)
    assert placeholders, "the latency figures need measure files, so some figure must be a placeholder"
    assert sum(note.strip().startswith("Not drawn") for note in seen["notes"]) == len(placeholders)


def test_the_check_catches_a_broken_image_and_a_dangling_link(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><title>ficoco report</title></head><body>'
                    '<table class="results"></table><a href="#nowhere">x</a>'
                    '<img alt="broken" src="data:image/png;base64,AAAA"></body></html>')
    seen = open_and_inspect(browser, page)
    assert seen["images"][0]["naturalWidth"] == 0
    problems = check_page(seen)
    assert any("did not render" in problem for problem in problems), problems
    assert any("#nowhere" in problem for problem in problems), problems
    assert any("no images" in problem for problem in check_page({**seen, "images": []}))
    rendered = [{"complete": True, "naturalWidth": 1, "src": "data:image/png;base64,"}]
    only_the_link = check_page({**seen, "images": rendered})
    assert len(only_the_link) == 1 and "#nowhere" in only_the_link[0], only_the_link
    assert any("no links" in problem for problem in check_page({**seen, "links": []}))
    assert any("outside the page" in problem for problem in check_page({**seen, "external": ["x.png"]}))


@pytest.mark.parametrize("width_name", list(WIDTHS))
def test_every_section_is_saved_as_a_png_no_wider_than_the_window(browser, report_page, tmp_path, width_name):
    width, height = WIDTHS[width_name]
    browser.open(report_page, width, height)
    heights = dict(browser.execute(SECTION_HEIGHTS))
    assert {"overview", "figures"} <= set(heights)

    paths = browser.screenshot_sections(tmp_path, width_name)

    assert [path.name for path in paths] == [f"{width_name}-{section}.png" for section in heights]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(path.name for path in paths), \
        "temporary files left behind"
    for path in paths:
        png_width, png_height = png_size(path)
        assert 0 < png_width <= width, f"{path.name}: {png_width} px wide in a {width} px window"
        section_height = heights[path.name.removeprefix(f"{width_name}-").removesuffix(".png")]
        expected_height = min(section_height, SCREENSHOT_LIMIT_PX)
        assert abs(png_height - expected_height) <= 1, \
            f"{path.name}: {png_height} px tall for a {section_height:.0f} px section (clipped to the window?)"
    assert browser.command("GET", "/window/rect")["height"] == height, "the window size was not restored"


def test_the_page_has_no_horizontal_overflow_at_laptop_width(browser, report_page):
    browser.open(report_page, *WIDTHS["laptop"])
    overflow = browser.execute(OVERFLOWING)
    assert overflow["scrollWidth"] <= overflow["innerWidth"], (
        f"the page is {overflow['scrollWidth']} px wide in a {overflow['innerWidth']} px window; "
        f"too wide: {overflow['outermost']}")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ficoco.report.browser", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_checks_the_page_and_lists_every_screenshot(report_page, tmp_path):
    out = tmp_path / "shots"
    result = run_cli(str(report_page), "--out", str(out), "--widths", "laptop")
    assert result.returncode == 0, result.stderr
    listed = [Path(line) for line in result.stdout.splitlines()[:-1]]
    assert listed and sorted(listed) == sorted(out.iterdir())
    assert all(path.name.startswith("laptop-") and png_size(path)[0] > 0 for path in listed)
    assert f"{len(listed)} section screenshots" in result.stdout.splitlines()[-1]


def test_cli_names_a_bad_width_and_the_valid_ones(report_page, tmp_path):
    result = run_cli(str(report_page), "--out", str(tmp_path), "--widths", "phone")
    assert result.returncode != 0
    assert "'phone'" in result.stderr and "desktop" in result.stderr and "laptop" in result.stderr
    assert not any(tmp_path.iterdir())
