"""The rendered report in a real headless Chromium: check that it loads, every image renders and no
link dangles, and save a screenshot of every section at the widths people read it at.

A static HTML check cannot tell whether a base64 PNG decodes or whether the layout fits a laptop
screen; a browser can. This drives Chromium through chromedriver's W3C WebDriver HTTP API with the
standard library only, so the check needs no Python package beyond the project's own. It needs the
Debian packages `chromium` and `chromium-driver`:
    apt-get update && apt-get install -y chromium chromium-driver

CLI:
    python -m ficoco.report.browser report/report.html --out report/screenshots [--widths desktop,laptop]
writes OUT/{width name}-{section id}.png and exits 1 when the page has a problem (see check_page).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "chromedriver"
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
# --hide-scrollbars: the layout width then never depends on the window height (a classic scrollbar
# takes 15 px only while the page is taller than the window), so growing the window to fit a tall
# section for its screenshot does not reflow the page; readers with overlay scrollbars see this layout.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1400,1000")

#: Window sizes (width, height in CSS px) the report is read at, by name.
WIDTHS = {"desktop": (1920, 1080), "laptop": (1366, 768)}

#: The key under which WebDriver returns an element's id (W3C WebDriver, "web element identifier").
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"

#: Chromium clips screenshots at about this many px; the image of a taller section lacks its bottom.
SCREENSHOT_LIMIT_PX = 16384

#: Seconds chromedriver gets to answer /status after it starts.
DRIVER_READY_S = 20.0

# Runs in the page; calls back with what check_page checks once every image has loaded or failed.
INSPECT_PAGE = """
const done = arguments[arguments.length - 1];
const settle = () => Promise.all(Array.from(document.images).map(img => img.complete ? null :
    new Promise(resolve => { img.onload = img.onerror = resolve; })));
const inspect = () => ({
  ready: document.readyState,
  title: document.title,
  images: Array.from(document.images).map(img => ({
      complete: img.complete, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
      src: (img.getAttribute("src") || "").slice(0, 30)})),
  links: Array.from(document.querySelectorAll("[href]")).map(el => el.getAttribute("href")),
  ids: Array.from(document.querySelectorAll("[id]")).map(el => el.id),
  external: Array.from(document.querySelectorAll("[src]")).map(el => el.getAttribute("src"))
      .filter(src => !src.startsWith("data:")),
  tables: document.querySelectorAll("table.results").length,
  notes: Array.from(document.querySelectorAll("p.note")).map(p => p.textContent),
  figures: Array.from(document.querySelectorAll("figure")).map(figure => ({
      id: figure.id, images: figure.querySelectorAll("img").length,
      notDrawn: Array.from(figure.querySelectorAll("p.note"))
          .some(p => p.textContent.trim().startsWith("Not drawn"))})),
});
const go = () => settle().then(() => done(inspect()));
if (document.readyState === "complete") { go(); } else { window.addEventListener("load", go); }
"""

SCROLL_INTO_VIEW = "arguments[0].scrollIntoView({block: 'start', inline: 'nearest'});"
TALLEST_ELEMENT = ("return Math.ceil(Math.max(0, ...Array.from(arguments)"
                   ".map(el => el.getBoundingClientRect().height)));")
WINDOW_CHROME_HEIGHT = "return window.outerHeight - window.innerHeight;"


class BrowserMissing(RuntimeError):
    """Chromium or chromedriver is not installed."""


class WebDriverError(RuntimeError):
    """chromedriver refused a command, died, or never became ready."""


def find_programs(chromium: str = CHROMIUM, chromedriver: str = CHROMEDRIVER) -> tuple[str, str]:
    """The paths of Chromium and chromedriver; fail naming the install command, not with a bare
    FileNotFoundError from deep inside subprocess."""
    found = {name: shutil.which(name) for name in (chromium, chromedriver)}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise BrowserMissing(f"{', '.join(missing)} not found: opening the report needs real headless Chromium "
                             f"and chromedriver. Install them with: {INSTALL}")
    return found[chromium], found[chromedriver]


def free_port() -> int:
    """A port nobody listens on now, for chromedriver (the OS picks it, so parallel runs do not collide)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def webdriver_call(base: str, method: str, path: str, body: dict | None = None, timeout: float = 60.0):
    """One WebDriver command; returns its "value". An error answer becomes a WebDriverError that
    names the command and chromedriver's own message."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}").get("value")
    except urllib.error.HTTPError as error:
        raise WebDriverError(f"WebDriver {method} {path} failed: {error_message(error.read())}") from error
    except OSError as error:  # URLError, refused or reset connections, timeouts: chromedriver is gone or stuck
        raise WebDriverError(f"chromedriver did not answer {method} {path}: {error}") from error


def error_message(answer: bytes) -> str:
    """chromedriver's "error: message" from an error answer's JSON, else the raw text."""
    try:
        value = json.loads(answer)["value"]
        return f"{value['error']}: {value['message']}"
    except (ValueError, KeyError, TypeError):
        return answer.decode(errors="replace")


def wait_ready(base: str, driver: subprocess.Popen, log: Path, timeout: float = DRIVER_READY_S) -> None:
    """Poll /status until chromedriver accepts sessions; fail early with its log if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.poll() is not None:
            raise WebDriverError(f"chromedriver exited with {driver.returncode}: {log.read_text()}")
        try:
            if webdriver_call(base, "GET", "/status", timeout=2)["ready"]:
                return
        except WebDriverError:
            pass
        time.sleep(0.1)
    raise WebDriverError(f"chromedriver did not become ready within {timeout:.0f} s: {log.read_text()}")


def stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Terminate `process`, killing it if it has not exited after `grace_s`, so no chromedriver lingers."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def file_name_part(text: str) -> str:
    """`text` with every character that is not a letter, digit, '-' or '_' replaced by '-', so a
    section id can go into a file name (page.py's anchors are already of that form)."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text) or "-"


def write_atomically(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and os.replace, so a reader never sees half a PNG."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class Browser:
    """One headless Chromium session behind one chromedriver. Use it as a context manager so that
    neither process outlives the caller; open pages one after the other in the same session."""

    def __init__(self, chromium: str = CHROMIUM, chromedriver: str = CHROMEDRIVER):
        self.chromium, self.chromedriver = find_programs(chromium, chromedriver)
        self.workdir: tempfile.TemporaryDirectory | None = None
        self.driver: subprocess.Popen | None = None
        self.base = ""
        self.session: str | None = None

    def __enter__(self) -> Browser:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self) -> None:
        """Start chromedriver on a free port, then a Chromium session with a throwaway profile."""
        self.workdir = tempfile.TemporaryDirectory(prefix="ficoco-chromium-", ignore_cleanup_errors=True)
        workdir = Path(self.workdir.name)
        log = workdir / "chromedriver.log"
        port = free_port()
        with open(log, "w") as log_stream:
            self.driver = subprocess.Popen([self.chromedriver, f"--port={port}"], stdout=log_stream,
                                           stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{port}"
        wait_ready(self.base, self.driver, log)
        options = {"binary": self.chromium, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile'}"]}
        capabilities = {"browserName": "chrome", "goog:chromeOptions": options,
                        "timeouts": {"script": 30000, "pageLoad": 30000}}
        answer = webdriver_call(self.base, "POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self.session = answer["sessionId"]

    def close(self) -> None:
        """Delete the session (which quits Chromium), stop chromedriver, remove the profile."""
        try:
            if self.session is not None:
                webdriver_call(self.base, "DELETE", f"/session/{self.session}")
        finally:
            self.session = None
            if self.driver is not None:
                stop(self.driver)
                self.driver = None
            if self.workdir is not None:
                self.workdir.cleanup()
                self.workdir = None

    def command(self, method: str, path: str, body: dict | None = None):
        """A command of this session: `path` is relative to /session/{id}."""
        if self.session is None:
            raise WebDriverError("no browser session: use Browser as a context manager (with Browser() as b: ...)")
        return webdriver_call(self.base, method, f"/session/{self.session}{path}", body)

    def open(self, page: Path, width: int, height: int) -> None:
        """Size the window to width x height CSS px, then load the local file `page` (returns once it loaded)."""
        self.command("POST", "/window/rect", {"width": width, "height": height})
        self.command("POST", "/url", {"url": Path(page).resolve().as_uri()})

    def execute(self, script: str, *args):
        """Run `script` (a function body; `return` gives the value) in the page and return its value."""
        return self.command("POST", "/execute/sync", {"script": script, "args": list(args)})

    def inspect(self) -> dict:
        """What INSPECT_PAGE reports about the open page, once every image has loaded or failed."""
        return self.command("POST", "/execute/async", {"script": INSPECT_PAGE, "args": []})

    def screenshot_sections(self, out_dir: Path, prefix: str) -> list[Path]:
        """Save every `<section id=...>` of the open page as `{out_dir}/{prefix}-{section id}.png`, in
        page order; return the paths.

        An element screenshot holds only the part of the element inside the viewport, so the window
        is first grown to fit the tallest section (and restored afterwards); each section is then
        scrolled into view and shot. Chromium clips screenshots at about SCREENSHOT_LIMIT_PX
        (16,384 px), so the image of a taller section stops there."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        sections = self.command("POST", "/elements", {"using": "css selector", "value": "section[id]"})
        window = self.command("GET", "/window/rect")
        try:
            self.fit_window_height(sections)
            return [self.screenshot_section(section, out_dir, prefix) for section in sections]
        finally:
            self.command("POST", "/window/rect", {"width": window["width"], "height": window["height"]})

    def fit_window_height(self, elements: list[dict]) -> None:
        """Grow the window so that the tallest of `elements` fits in the viewport, up to the screenshot limit."""
        tallest = min(self.execute(TALLEST_ELEMENT, *elements), SCREENSHOT_LIMIT_PX)
        window = self.command("GET", "/window/rect")
        needed = tallest + self.execute(WINDOW_CHROME_HEIGHT)
        if needed > window["height"]:
            self.command("POST", "/window/rect", {"width": window["width"], "height": needed})

    def screenshot_section(self, section: dict, out_dir: Path, prefix: str) -> Path:
        """Scroll one section (a WebDriver element reference) into view and save its screenshot."""
        element = section[ELEMENT_KEY]
        section_id = self.command("GET", f"/element/{element}/attribute/id")
        self.execute(SCROLL_INTO_VIEW, section)
        png = base64.b64decode(self.command("GET", f"/element/{element}/screenshot"))
        path = out_dir / f"{prefix}-{file_name_part(section_id)}.png"
        write_atomically(path, png)
        return path


def check_page(seen: dict) -> list[str]:
    """The problems in what INSPECT_PAGE saw, as sentences a person can act on; empty = the page is fine.

    The report must stand alone (mailed, archived), so every resource is an embedded data: URI and
    every link is one of those or an anchor on the page itself."""
    problems = []
    if seen.get("ready") != "complete":
        problems.append(f"the page did not finish loading (document.readyState {seen.get('ready')!r})")
    images = seen.get("images", [])
    if not images:
        problems.append("the page has no images (the figures are missing)")
    broken = [img for img in images if not img["complete"] or img["naturalWidth"] == 0]
    if broken:
        problems.append(f"images that did not render: {broken}")
    if seen.get("external"):
        problems.append(f"resources outside the page: {seen['external']}")
    links = seen.get("links", [])
    ids = set(seen.get("ids", []))
    dangling = [href for href in links if not (href.startswith("data:") or (href.startswith("#") and href[1:] in ids))]
    if dangling:
        problems.append(f"links that are neither a data: URI nor an anchor on the page: {dangling}")
    if not links:
        problems.append("the page has no links (the table of contents is missing)")
    return problems


def width_names(text: str) -> list[str]:
    """argparse type of --widths: comma-separated names of WIDTHS."""
    valid = f"valid: a comma-separated list of {', '.join(WIDTHS)}"
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in WIDTHS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown width(s) {', '.join(map(repr, unknown))}; {valid}")
    if not names:
        raise argparse.ArgumentTypeError(f"no width named in {text!r}; {valid}")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ficoco.report.browser",
        description="Open the rendered report in headless Chromium at each width, check it (images render, "
                    "links stay on the page) and save every section as OUT/{width}-{section id}.png.")
    parser.add_argument("page", type=Path, help="the HTML page `ficoco report` wrote (e.g. report/report.html)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the screenshots")
    sizes = ", ".join(f"{name} ({width}x{height})" for name, (width, height) in WIDTHS.items())
    parser.add_argument("--widths", type=width_names, default=list(WIDTHS),
                        help=f"comma-separated window sizes among {sizes} (default: {','.join(WIDTHS)})")
    args = parser.parse_args(argv)
    if not args.page.is_file():
        parser.error(f"page {str(args.page)!r} is not a file; pass the HTML page `ficoco report` wrote")
    return args


def main(argv: list[str] | None = None) -> int:
    """Check and screenshot the page at every width; every width is shot even when an earlier one
    has problems, so the screenshots show what is wrong. Exit 1 on any problem."""
    args = parse_args(argv)
    problems, saved = 0, 0
    try:
        with Browser() as browser:
            for name in args.widths:
                width, height = WIDTHS[name]
                browser.open(args.page, width, height)
                for problem in check_page(browser.inspect()):
                    print(f"{name} ({width}x{height}): {problem}", file=sys.stderr)
                    problems += 1
                for path in browser.screenshot_sections(args.out, name):
                    print(path)
                    saved += 1
    except (BrowserMissing, WebDriverError) as error:
        print(f"ficoco.report.browser: {error}", file=sys.stderr)
        return 1
    print(f"browser: {saved} section screenshots of {args.page} at {', '.join(args.widths)} in {args.out}; "
          f"{problems} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
