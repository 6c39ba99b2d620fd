"""The built book, opened in a real browser: every page loads without JavaScript errors, every image
is there and not empty, formulas are typeset, the coloured-token annotation renders, and screenshots
are saved.

Runs against ``_build/html`` (``make book`` writes it; this test never builds it). Headless Chromium
(Debian's ``chromium`` package, installed here when missing) is driven through the DevTools protocol
over a websocket, while the book is served over HTTP on 127.0.0.1 as a reader's browser would get
it. Screenshots of the introduction and a stage page go to ``_build/screenshots/`` (the CI artifact).

Without ``_build/html`` the tests skip, unless ``MOE_REQUIRE_BOOK=1`` (CI), where they fail.
"""

from __future__ import annotations

import base64
import functools
import http.server
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
#: Pages photographed for the CI artifact: the introduction and one stage page.
SCREENSHOT_PAGES = {"book/intro.html": "intro.png", "book/executed/01_capture.html": "01_capture.png"}
SCREENSHOT_MAX_HEIGHT = 8000
#: The page that states the paper's equations.
METHOD_PAGE = "book/method.html"
#: The annotation page and the class of its coloured-token rendering (moe_utils.token_text.CSS_CLASS).
ANNOTATION_PAGE = "book/executed/03_annotation.html"
TOKEN_RENDER_CLASS = "moe-token-render"
#: Whether the annotation page must show a coloured-token rendering (True once stage 3 renders one).
TOKEN_RENDER_REQUIRED = True
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: JavaScript errors of the toolchain itself, not of this book, tolerated by exact message:
#: - sphinx-thebe 0.3.1 under Sphinx 7.4 writes its inline config (``const THEBE_JS_URL = ...``) twice
#:   into every page (a bare Sphinx project with only that extension shows it too) and the second copy
#:   throws. Harmless here: the book never launches thebe (notebooks are not executed in the browser).
#: - pydata-sphinx-theme 0.17 logs an error on a browser's first visit, when no colour mode is stored
#:   yet, then falls back to "auto" as intended.
UPSTREAM_JS_ERRORS = ("SyntaxError: Identifier 'THEBE_JS_URL' has already been declared",
                      "Got invalid theme mode: . Resetting to auto.")
PAGE_TIMEOUT_S = 30


# ------------------------------------------------------------------------------------ set-up

def _book_dir() -> Path:
    if not (HTML / "index.html").is_file():
        message = f"no built book in {HTML}: run `make book` first"
        if os.environ.get("MOE_REQUIRE_BOOK") == "1":
            pytest.fail(message + " (MOE_REQUIRE_BOOK=1 requires it)", pytrace=False)
        pytest.skip(message)
    return HTML


def _install_chromium() -> None:
    """``apt-get install -y chromium``, through ``sudo -n`` when not root; a clear failure otherwise."""
    prefix = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            pytest.fail("Chromium is missing and cannot be installed without root or sudo: install Debian's "
                        "`chromium` package, or set MOE_CHROMIUM to a Chromium/Chrome executable", pytrace=False)
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        result = subprocess.run(prefix + command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            pytest.fail(f"Chromium is missing and `{' '.join(prefix + command)}` failed:\n{result.stderr[-2000:]}\n"
                        "Install Debian's `chromium` package, or set MOE_CHROMIUM to a Chromium/Chrome "
                        "executable", pytrace=False)


def chromium_executable() -> str:
    """``$MOE_CHROMIUM``, else Chromium or Chrome on the PATH, else Debian's package, installed now."""
    if os.environ.get("MOE_CHROMIUM"):
        return os.environ["MOE_CHROMIUM"]
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        _install_chromium()
        found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        pytest.fail("Chromium was installed but is not on the PATH; set MOE_CHROMIUM", pytrace=False)
    return found


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the browser's own network events are what the tests read
        pass


@pytest.fixture(scope="module")
def book_url():
    """The built book served over HTTP on 127.0.0.1 for the duration of the module."""
    handler = functools.partial(_QuietHandler, directory=str(_book_dir()))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class DevTools:
    """A minimal Chrome DevTools protocol client for one headless Chromium tab."""

    def __init__(self, executable: str, profile_dir: Path):
        import websocket  # the `websocket-client` package (test extra)

        log = profile_dir / "chromium.log"  # a file, not a pipe: nobody reads Chromium's chatter while it runs
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--remote-debugging-port=0",
                 f"--user-data-dir={profile_dir}", "--window-size=1280,900", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=stderr)
        port_file = profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"{executable} did not start its DevTools server: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            tab = next(t for t in json.load(response) if t["type"] == "page")
        self.socket = websocket.create_connection(tab["webSocketDebuggerUrl"], timeout=PAGE_TIMEOUT_S,
                                                  suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable")

    def send(self, method: str, **params) -> dict:
        """Call a protocol method and return its result; events that arrive meanwhile are kept."""
        call_id = next(self.ids)
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, event: str, since: int = 0) -> None:
        """Until ``event`` is among the events received from position ``since`` on."""
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        while not any(e.get("method") == event for e in self.events[since:]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {PAGE_TIMEOUT_S} s")
            self.events.append(json.loads(self.socket.recv()))

    def open(self, url: str) -> dict:
        """Load ``url``, following redirects (the book's index.html is one), and return PAGE_REPORT_JS's report."""
        self.events.clear()
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")
        for _ in range(3):
            seen = len(self.events)
            try:
                report = self.evaluate(PAGE_REPORT_JS)
            except RuntimeError as err:  # the page navigated on (a redirect) while being read
                if "navigated" not in str(err):
                    raise
                report = {"redirects": True}
            if not report["redirects"]:
                return report
            self.wait_for("Page.loadEventFired", since=seen)
        raise RuntimeError(f"{url} keeps navigating")

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"]["value"]

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


# What the page reports once loaded: images (after waiting for every one to load or fail), the
# coloured-token renderings with their size, token colours and any script inside them, and the
# formulas (Sphinx's .math elements) with how many MathJax typeset (after its start-up finished).
PAGE_REPORT_JS = """(async () => {
  const images = Array.from(document.images);
  images.forEach(img => { img.loading = 'eager'; });
  await Promise.all(images.map(img => img.complete ? null : new Promise(done => {
    img.addEventListener('load', done); img.addEventListener('error', done); })));
  const formulas = Array.from(document.querySelectorAll('.math'));
  if (formulas.length && window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await Promise.race([MathJax.startup.promise, new Promise(done => setTimeout(done, 10000))]);
  }
  return {
    formulas: formulas.length,
    typeset: formulas.filter(el => el.querySelector('mjx-container') !== null).length,
    redirects: document.querySelector('meta[http-equiv="refresh" i]') !== null,
    url: location.href,
    title: document.title,
    h1: Array.from(document.querySelectorAll('main h1, article h1')).map(h => h.textContent.trim()),
    images: images.map(img => ({src: img.getAttribute('src'), width: img.naturalWidth, height: img.naturalHeight})),
    renders: Array.from(document.querySelectorAll('.%(cls)s')).map(el => {
      const box = el.getBoundingClientRect();
      const tokens = Array.from(el.querySelectorAll('span[title]'));
      return {width: box.width, height: box.height, tokens: tokens.length,
              colours: new Set(tokens.map(t => getComputedStyle(t).backgroundColor)).size,
              scripts: el.querySelectorAll('script').length, text: el.textContent.length};
    }),
  };
})()""" % {"cls": TOKEN_RENDER_CLASS}


def _page_problems(events: list[dict], origin: str) -> list[str]:
    """JavaScript errors, and failed loads of the book's own files, from one page's DevTools events."""
    problems = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            description = details.get("exception", {}).get("description") or details["text"]
            if description not in UPSTREAM_JS_ERRORS:
                problems.append(f"uncaught exception: {description}")
        elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
            message = " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            if message not in UPSTREAM_JS_ERRORS:
                problems.append(f"console.error: {message}")
        elif method == "Network.responseReceived" and params["response"]["url"].startswith(origin) \
                and params["response"]["status"] >= 400 and urlparse(params["response"]["url"]).path != "/favicon.ico":
            problems.append(f"HTTP {params['response']['status']} for {params['response']['url']}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error" \
                and params["entry"].get("source") != "network":
            problems.append(f"browser log: {params['entry']['text']}")
    return problems


def _external_failures(events: list[dict], origin: str) -> set[str]:
    """Resources from other hosts that did not load (e.g. MathJax's CDN on an offline machine)."""
    requested = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in events
                 if e.get("method") == "Network.requestWillBeSent"}
    return {requested.get(e["params"]["requestId"], "?") for e in events
            if e.get("method") == "Network.loadingFailed"
            and not requested.get(e["params"]["requestId"], origin).startswith(origin)}


def _is_redirect(page: Path) -> bool:
    """A stub such as the root ``index.html`` that Jupyter Book writes as an immediate meta refresh:
    the browser leaves it at once, so its title is a race; its target is one of the pages visited."""
    return 'http-equiv="Refresh"' in page.read_text(errors="replace")[:500]


def _pages(book: Path) -> list[str]:
    """Every HTML page of the book, relative to its root (Sphinx's assets and sources and redirect
    stubs excluded)."""
    return sorted(p.relative_to(book).as_posix() for p in book.rglob("*.html")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(book).parts)
                  and not _is_redirect(p))


@pytest.fixture(scope="module")
def visits(book_url, tmp_path_factory):
    """Open every page once; returns ``{page: {"report", "problems", "external_failures"}}``."""
    book = _book_dir()
    browser = DevTools(chromium_executable(), tmp_path_factory.mktemp("chromium-profile"))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for page in _pages(book):
            report = browser.open(book_url + page)
            if page in SCREENSHOT_PAGES:  # the whole page, up to SCREENSHOT_MAX_HEIGHT pixels
                height = min(browser.evaluate("document.documentElement.scrollHeight"), SCREENSHOT_MAX_HEIGHT)
                shot = browser.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                    clip={"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1})
                (SCREENSHOTS / SCREENSHOT_PAGES[page]).write_bytes(base64.b64decode(shot["data"]))
            results[page] = {"report": report, "problems": _page_problems(browser.events, book_url),
                             "external_failures": _external_failures(browser.events, book_url)}
    finally:
        browser.close()
    return results


# ------------------------------------------------------------------------------------ tests

def test_every_toc_page_was_built(visits):
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    missing = [f for f in files if f"{f}.html" not in visits]
    assert not missing, f"pages of _toc.yml missing from the build (stale build? run `make book`): {missing}"


def test_every_page_loads_without_javascript_errors(visits):
    problems = {page: v["problems"] for page, v in visits.items() if v["problems"]}
    assert not problems, json.dumps(problems, indent=1)
    untitled = [page for page, v in visits.items() if not v["report"]["title"].strip()]
    assert not untitled, f"pages without a title: {untitled}"


def test_every_image_is_present_and_not_empty(visits):
    broken = {page: [img["src"] for img in v["report"]["images"] if img["width"] == 0 or img["height"] == 0]
              for page, v in visits.items()}
    broken = {page: srcs for page, srcs in broken.items() if srcs}
    assert not broken, f"images missing or empty: {broken}"
    stage_pages = [page for page in visits if page.startswith("book/executed/0") and page != ANNOTATION_PAGE]
    assert any(visits[page]["report"]["images"] for page in stage_pages), "no stage page shows a figure"


def test_coloured_token_annotation_renders(visits):
    assert ANNOTATION_PAGE in visits, f"{ANNOTATION_PAGE} was not built"
    renders = visits[ANNOTATION_PAGE]["report"]["renders"]
    if not renders:
        if TOKEN_RENDER_REQUIRED:
            pytest.fail(f"{ANNOTATION_PAGE} shows no element of class {TOKEN_RENDER_CLASS} (stale build? "
                        "run `make book`)", pytrace=False)
        pytest.skip(f"{ANNOTATION_PAGE} has no coloured-token rendering yet")
    for render in renders:
        assert render["width"] > 0 and render["height"] > 0, f"a token rendering is invisible: {render}"
        assert render["tokens"] > 0 and render["text"] > 0, f"a token rendering shows no tokens: {render}"
        assert render["colours"] >= 2, f"tokens are not coloured by pattern: {render}"
        assert render["scripts"] == 0, "a <script> inside the token rendering: model text must be escaped"


def test_screenshots_are_saved(visits):
    for page, name in SCREENSHOT_PAGES.items():
        assert page in visits, f"{page} was not built"
        png = (SCREENSHOTS / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, f"{name} looks empty ({len(png)} bytes)"


def test_formulas_are_typeset_offline(visits):
    """MathJax is served by the book itself (sphinx-mathjax-offline), so every formula renders on a
    machine without internet; the method page, which states the paper's equations, must have some."""
    assert visits[METHOD_PAGE]["report"]["formulas"] > 0, f"{METHOD_PAGE} shows no formula"
    untypeset = {page: f"{v['report']['typeset']} of {v['report']['formulas']}" for page, v in visits.items()
                 if v["report"]["typeset"] < v["report"]["formulas"]}
    assert not untypeset, f"formulas MathJax did not typeset: {untypeset}"


def test_offline_external_resources_are_only_known_cdns(visits):
    """On an offline machine only third-party CDNs may fail; the book's own files never."""
    hosts = {urlparse(url).hostname for v in visits.values() for url in v["external_failures"]}
    assert hosts <= {"cdn.jsdelivr.net", "cdnjs.cloudflare.com", "unpkg.com"}, hosts


def test_a_planted_token_renders_as_text_in_the_browser(tmp_path):
    """Model text carrying markup, shown the way the stage pages show it (a stage table through pandas'
    Styler after ``plotting.use_style()``, and the coloured-token rendering), is text in Chromium:
    no element is created from it and its handler never runs."""
    import pandas as pd

    from moe_utils import plotting
    from moe_utils.token_text import render_prompt

    planted = "<img src=x onerror=\"window.__planted=1\">"
    plotting.use_style()
    table = (pd.DataFrame({"atom": [3], "label": [planted], "q": [1e-5]})
             .style.hide(axis="index").format({"q": "{:.1e}"}, escape="html").to_html())
    tokens = render_prompt(["Q", planted, "!"], [("level 1", [0, 1, -1], {0: "a", 1: planted})])
    page = tmp_path / "planted.html"
    page.write_text(f"<!doctype html><html><head><title>planted</title></head><body>{table}{tokens}</body></html>")
    (tmp_path / "chromium-profile").mkdir()
    browser = DevTools(chromium_executable(), tmp_path / "chromium-profile")
    try:
        browser.open(page.as_uri())
        found = browser.evaluate("({images: document.images.length, fired: window.__planted === 1, "
                                 "text: document.body.textContent})")
    finally:
        browser.close()
    assert found["images"] == 0 and not found["fired"]
    assert found["text"].count(planted) >= 2  # in the table and in the token rendering, as text


#: The teaching page and how many exercises it sets (sphinx-exercise), each with a folded solution.
TEACHING_PAGE = "book/teaching.html"
N_EXERCISES = 8


def test_exercises_are_numbered_with_folded_solutions():
    """Every exercise of the teaching page renders as a numbered exercise, and each has a solution
    that folds (a dropdown, closed until the reader opens it) and links back to its exercise."""
    import re

    page = (_book_dir() / TEACHING_PAGE).read_text()
    exercises = re.findall(r'<div class="exercise admonition" id="([\w-]+)"', page)
    solutions = re.findall(r'<div class="solution dropdown admonition" id="[^"]+">\s*<p class="admonition-title">'
                           r'Solution to<a class="reference internal" href="#([\w-]+)">', page)
    assert len(exercises) == N_EXERCISES and sorted(solutions) == sorted(exercises)
    assert [int(n) for n in re.findall(r'<span class="caption-number">Exercise (\d+) </span>', page)] == list(
        range(1, N_EXERCISES + 1))
