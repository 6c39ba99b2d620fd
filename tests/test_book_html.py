"""The built book, opened in a real browser: every page loads without JavaScript errors, every image
is there and not empty, formulas are typeset, the coloured-token annotation renders, and screenshots
are saved.

Runs against ``_build/html`` (``make book`` writes it; this test never builds it). Headless Chromium
(Debian's ``chromium`` package, installed here when missing) is driven by Playwright for Python
(:func:`launch_browser`), while the book is served over HTTP on 127.0.0.1 as a reader's browser
would get it; every request to another host is aborted and listed. The explorer page is also opened
from disk, timed and used (its views photographed). Screenshots go to ``_build/screenshots/`` (the
CI artifact).

Without ``_build/html`` the tests skip, unless ``MOE_REQUIRE_BOOK=1`` (CI), where they fail.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
#: Pages photographed for the CI artifact: the introduction and one stage page.
SCREENSHOT_PAGES = {"book/intro.html": "intro.png", "book/executed/01_capture.html": "01_capture.png",
                    "book/executed/07_explorer.html": "07_explorer.png"}
SCREENSHOT_MAX_HEIGHT = 8000
#: The page that states the paper's equations.
METHOD_PAGE = "book/method.html"
#: The annotation page and the class of its coloured-token rendering (moe_utils.capture.token_text.CSS_CLASS).
ANNOTATION_PAGE = "book/executed/03_annotation.html"
TOKEN_RENDER_CLASS = "moe-token-render"
#: The explorer page (moe_utils.stages.explorer) and the most seconds it may take to load from disk.
EXPLORER_PAGE = "book/executed/07_explorer.html"
EXPLORER_LOAD_S = 2.0
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


#: Chromium's switches: headless, no sandbox (containers), and none of its own traffic to Google.
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--no-default-browser-check", "--hide-scrollbars")
#: URL schemes that never leave the machine.
LOCAL_SCHEMES = ("data:", "blob:", "about:")


@contextlib.contextmanager
def launch_browser():
    """The system Chromium (:func:`chromium_executable`), driven by Playwright for Python; Playwright's
    own browser download is not needed."""
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS), headless=True,
                                             timeout=PAGE_TIMEOUT_S * 1000)
        try:
            yield browser
        finally:
            browser.close()


def watch(context, page, local_prefixes: tuple[str, ...]) -> dict[str, list[str]]:
    """Collect what goes wrong in ``page`` and keep every request on the machine: requests to URLs
    outside ``local_prefixes`` are aborted and listed under ``blocked``; ``errors`` holds uncaught
    exceptions, ``console.error`` calls (except :data:`UPSTREAM_JS_ERRORS` and failed loads, which
    are listed by URL) and HTTP errors of the book's own files."""
    seen: dict[str, list[str]] = {"errors": [], "blocked": []}

    def route(handle):
        url = handle.request.url
        if url.startswith(local_prefixes + LOCAL_SCHEMES):
            handle.continue_()
        else:
            seen["blocked"].append(url)
            handle.abort()

    def exception(error):
        description = f"{error.name}: {error.message}" if error.name else error.message
        if description not in UPSTREAM_JS_ERRORS:
            seen["errors"].append(f"uncaught exception: {description}")

    def console(message):
        if message.type == "error" and message.text not in UPSTREAM_JS_ERRORS \
                and not message.text.startswith("Failed to load resource"):
            seen["errors"].append(f"console.error: {message.text}")

    def response(answer):
        if answer.url.startswith(local_prefixes) and answer.status >= 400 \
                and urlparse(answer.url).path != "/favicon.ico":
            seen["errors"].append(f"HTTP {answer.status} for {answer.url}")

    context.route("**/*", route)
    page.on("pageerror", exception)
    page.on("console", console)
    page.on("response", response)
    return seen


def open_page(page, url: str) -> dict:
    """Load ``url`` (following a redirect) and return PAGE_REPORT_JS's report."""
    page.goto(url, wait_until="load", timeout=PAGE_TIMEOUT_S * 1000)
    for _ in range(3):
        try:
            report = page.evaluate(PAGE_REPORT_JS)
        except Exception as err:  # noqa: BLE001 - the page navigated on (a redirect) while being read
            if "navigat" not in str(err) and "context was destroyed" not in str(err):
                raise
            report = {"redirects": True}
        if not report["redirects"]:
            return report
        page.wait_for_load_state("load")
    raise RuntimeError(f"{url} keeps navigating")


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
def browser():
    with launch_browser() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def visits(book_url, browser):
    """Open every page once; returns ``{page: {"report", "problems", "external_failures"}}``."""
    book = _book_dir()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    results = {}
    for page in _pages(book):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        tab = context.new_page()
        seen = watch(context, tab, local_prefixes=(book_url,))
        try:
            report = open_page(tab, book_url + page)
            if page in SCREENSHOT_PAGES:  # the whole page, up to SCREENSHOT_MAX_HEIGHT pixels
                height = min(tab.evaluate("document.documentElement.scrollHeight"), SCREENSHOT_MAX_HEIGHT)
                tab.screenshot(path=str(SCREENSHOTS / SCREENSHOT_PAGES[page]), full_page=True,
                               clip={"x": 0, "y": 0, "width": 1280, "height": height})
        finally:
            context.close()
        results[page] = {"report": report, "problems": seen["errors"], "external_failures": set(seen["blocked"])}
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


def test_a_planted_token_renders_as_text_in_the_browser(tmp_path, browser):
    """Model text carrying markup, shown the way the stage pages show it (a stage table through pandas'
    Styler after ``plotting.use_style()``, and the coloured-token rendering), is text in Chromium:
    no element is created from it and its handler never runs."""
    import pandas as pd

    from moe_utils.common import plotting
    from moe_utils.capture.token_text import render_prompt

    planted = "<img src=x onerror=\"window.__planted=1\">"
    plotting.use_style()
    table = (pd.DataFrame({"atom": [3], "label": [planted], "q": [1e-5]})
             .style.hide(axis="index").format({"q": "{:.1e}"}, escape="html").to_html())
    tokens = render_prompt(["Q", planted, "!"], [("level 1", [0, 1, -1], {0: "a", 1: planted})])
    page = tmp_path / "planted.html"
    page.write_text(f"<!doctype html><html><head><title>planted</title></head><body>{table}{tokens}</body></html>")
    tab = browser.new_page()
    tab.goto(page.as_uri())
    found = tab.evaluate("({images: document.images.length, fired: window.__planted === 1, "
                         "text: document.body.textContent})")
    tab.close()
    assert found["images"] == 0 and not found["fired"]
    assert found["text"].count(planted) >= 2  # in the table and in the token rendering, as text


#: The teaching page and how many exercises it sets (sphinx-exercise), each with a folded solution.
TEACHING_PAGE = "book/teaching.html"
N_EXERCISES = 10


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


def test_the_explorer_loads_from_disk_and_its_views_work(browser):
    """The explorer of the built book, opened from disk as a reader would open a downloaded book:
    ready within EXPLORER_LOAD_S, no script error, no request leaving the machine; each view is used
    once and photographed (explorer-<view>.png). The load time goes to explorer-load.json."""
    page = _book_dir() / EXPLORER_PAGE
    assert page.is_file(), f"{EXPLORER_PAGE} was not built (stale build? run `make book`)"
    context = browser.new_context(viewport={"width": 1280, "height": 3200})  # the whole widget in view
    tab = context.new_page()
    seen = watch(context, tab, local_prefixes=("file://",))
    try:
        start = time.perf_counter()
        tab.goto(page.as_uri(), wait_until="load", timeout=PAGE_TIMEOUT_S * 1000)
        tab.wait_for_selector(".moe-explorer[data-ready='1']", timeout=PAGE_TIMEOUT_S * 1000)
        seconds = time.perf_counter() - start
        ready_ms = int(tab.get_attribute(".moe-explorer", "data-ready-ms"))
        widget = tab.locator(".moe-explorer")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        views = {"token": lambda: tab.locator(".mx-token").nth(5).click(),  # kept: it stays on the grid
                 "atom": lambda: tab.locator(".mx-atom").first.click(),
                 "expert": lambda: tab.locator(".mx-cell").nth(3).click(),
                 "pruning": lambda: tab.select_option(".mx-mask", index=1)}
        for view, act in views.items():
            act()
            widget.screenshot(path=str(SCREENSHOTS / f"explorer-{view}.png"))
        routed = tab.locator(".mx-cell.mx-routed").count()
        pruned = tab.locator(".mx-cell.mx-pruned").count()
    finally:
        context.close()
    (SCREENSHOTS / "explorer-load.json").write_text(json.dumps(
        {"page": EXPLORER_PAGE, "seconds_to_ready": round(seconds, 3), "ready_ms_since_navigation": ready_ms,
         "bytes": page.stat().st_size}, indent=1))
    assert not seen["errors"] and not seen["blocked"], seen
    assert seconds < EXPLORER_LOAD_S, f"the explorer took {seconds:.2f} s to load from disk"
    assert routed > 0 and pruned > 0, "hovering a token or choosing a mask changed nothing on the grid"
