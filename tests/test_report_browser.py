"""The rendered page in a real headless Chromium: it loads, every image renders, no link is broken.

Drives Chromium through chromedriver's W3C WebDriver HTTP API with the standard library only.
Needs the Debian packages `chromium` and `chromium-driver`:
    apt-get update && apt-get install -y chromium chromium-driver
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from report_fixtures import write_results_tree

from ficoco.report import aggregate_results, render_report
from ficoco.report.aggregate import find_measure_files, find_metrics_files

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000"]

# Runs in the page; calls back with what the test checks once every image has loaded or failed.
INSPECT_PAGE = """
const done = arguments[arguments.length - 1];
const settle = () => Promise.all(Array.from(document.images).map(img => img.complete ? null :
    new Promise(resolve => { img.onload = img.onerror = resolve; })));
const inspect = () => ({
  ready: document.readyState,
  title: document.title,
  images: Array.from(document.images).map(img => ({
      complete: img.complete, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
      src: img.getAttribute("src").slice(0, 30)})),
  links: Array.from(document.querySelectorAll("[href]")).map(el => el.getAttribute("href")),
  ids: Array.from(document.querySelectorAll("[id]")).map(el => el.id),
  external: Array.from(document.querySelectorAll("[src]")).map(el => el.getAttribute("src"))
      .filter(src => !src.startsWith("data:")),
  tables: document.querySelectorAll("table.results").length,
  notes: Array.from(document.querySelectorAll("p.note")).map(p => p.textContent),
});
const go = () => settle().then(() => done(inspect()));
if (document.readyState === "complete") { go(); } else { window.addEventListener("load", go); }
"""


def require_browser() -> str:
    missing = [name for name in (CHROMIUM, "chromedriver") if shutil.which(name) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: the browser test needs real headless Chromium. "
                    f"Install it with: {INSTALL}")
    return shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(base: str, method: str, path: str, body: dict | None = None, timeout: float = 60.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        raise AssertionError(f"WebDriver {method} {path} failed: {error.read().decode(errors='replace')}") from error


def wait_ready(base: str, driver: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if driver.poll() is not None:
            raise AssertionError(f"chromedriver exited with {driver.returncode}: {log.read_text()}")
        try:
            if call(base, "GET", "/status", timeout=2)["value"]["ready"]:
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"chromedriver did not become ready within 20 s: {log.read_text()}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A function page_path -> what INSPECT_PAGE reports, backed by one Chromium session."""
    chromedriver = require_browser()
    workdir = tmp_path_factory.mktemp("chromium")
    log = workdir / "chromedriver.log"
    port = free_port()
    with open(log, "w") as log_stream:
        driver = subprocess.Popen([chromedriver, f"--port={port}"], stdout=log_stream, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    session = None
    try:
        wait_ready(base, driver, log)
        options = {"binary": CHROMIUM, "args": CHROMIUM_FLAGS + [f"--user-data-dir={workdir / 'profile'}"]}
        session = call(base, "POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options,
            "timeouts": {"script": 30000, "pageLoad": 30000}}}})["value"]["sessionId"]

        def inspect(page: Path) -> dict:
            call(base, "POST", f"/session/{session}/url", {"url": page.resolve().as_uri()})
            script = {"script": INSPECT_PAGE, "args": []}
            return call(base, "POST", f"/session/{session}/execute/async", script)["value"]

        yield inspect
    finally:
        if session is not None:
            call(base, "DELETE", f"/session/{session}")      # closes Chromium
        driver.terminate()
        driver.wait(timeout=10)


def render(root: Path, with_measure: bool) -> Path:
    results = write_results_tree(root / "results", with_measure=with_measure)
    aggregate_results(find_metrics_files(results), find_measure_files(results), results / "summary")
    return render_report(results / "summary", root / "report" / "report.html")


def check_page(seen: dict) -> None:
    assert seen["ready"] == "complete"
    assert seen["title"] == "ficoco report"
    assert seen["tables"] > 0
    assert seen["images"], "the page has no images"
    broken = [img for img in seen["images"] if not img["complete"] or img["naturalWidth"] == 0]
    assert not broken, f"images that did not render: {broken}"
    assert all(img["src"].startswith("data:image/png;base64,") for img in seen["images"])
    assert seen["external"] == [], f"resources outside the page: {seen['external']}"
    ids = set(seen["ids"])
    bad = [href for href in seen["links"]
           if not (href.startswith("data:") or (href.startswith("#") and href[1:] in ids))]
    assert not bad, f"links that are neither an existing in-page anchor nor a data: URI: {bad}"
    assert seen["links"], "the page has no links (the table of contents is missing)"


def test_page_renders_in_chromium(browser, tmp_path):
    seen = browser(render(tmp_path, with_measure=True))
    check_page(seen)
    assert len(seen["images"]) == 5
    assert not any("Not drawn" in note for note in seen["notes"])


def test_page_without_measure_files_renders_in_chromium(browser, tmp_path):
    seen = browser(render(tmp_path, with_measure=False))
    check_page(seen)
    assert len(seen["images"]) == 3
    assert sum("Not drawn" in note for note in seen["notes"]) == 2


def test_the_check_catches_a_broken_image_and_a_dangling_link(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><title>ficoco report</title></head><body>'
                    '<table class="results"></table><a href="#nowhere">x</a>'
                    '<img alt="broken" src="data:image/png;base64,AAAA"></body></html>')
    seen = browser(page)
    assert seen["images"][0]["naturalWidth"] == 0
    with pytest.raises(AssertionError, match="did not render"):
        check_page(seen)
    seen["images"] = []
    with pytest.raises(AssertionError, match="no images"):
        check_page(seen)
    with pytest.raises(AssertionError, match="#nowhere"):
        check_page({**seen, "images": [{"complete": True, "naturalWidth": 1, "src": "data:image/png;base64,"}]})
