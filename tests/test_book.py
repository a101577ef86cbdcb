"""The book (`make book`) built from the committed notebooks and read in a real browser, offline.

The build is the one `make book` runs, into a scratch folder, with warnings as errors. Every page is then
opened from disk (file://) in headless Chromium (Debian's `chromium` and `chromium-driver`, driven by
Selenium) with every http(s) request blocked and recorded: no console errors, no request off the disk, every
image loaded, every equation typeset by MathJax (no raw TeX left on screen), every internal link and anchor
resolving. Screenshots of the front page and of notebook 01's derivation go to `_build/book-screens/`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCREENS = ROOT / "_build" / "book-screens"
CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# Chromium as root, headless and quiet: no sandbox (root), no GPU, and none of its own background traffic.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND",
                  "--window-size=1400,1000"]
# What a page may fetch: itself and its files on disk, and what scripts make in memory.
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
# Sources in the built files that a browser would fetch (script, style, font, image), not plain links.
FETCHED_URL = re.compile(r"""(?:<(?:script|img|iframe|source)\b[^>]*\bsrc|<link\b[^>]*\bhref)="""
                         r"""["']((?:https?:)?//[^"']+)"""
                         r"""|@import\s+(?:url\()?["']?((?:https?:)?//[^"')]+)"""
                         r"""|url\(["']?((?:https?:)?//[^"')]+)""", re.I)
RAW_TEX = re.compile(r"\$\$|\\begin\{|\$[^$\n]{0,200}\\[A-Za-z]+[^$\n]{0,200}\$")

# How long MathJax may take on the longest page (notebook 01) on a slow shared machine.
MATHJAX_TIMEOUT_S = 60


def _tool(*names: str) -> str | None:
    return next((found for name in names if (found := shutil.which(name))), None)


def _require(what: str, ok: bool) -> None:
    """Fail in CI (where .ci/run installs everything), skip with the reason elsewhere."""
    if ok:
        return
    message = f"{what} (install with `apt-get install -y chromium chromium-driver` and `make book`)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class PageReport:
    """What the browser found on one page."""

    name: str
    console_errors: list[str] = field(default_factory=list)
    images: int = 0
    broken_images: list[str] = field(default_factory=list)
    equations: int = 0
    untypeset: list[str] = field(default_factory=list)
    raw_tex: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)


class _Anchors(HTMLParser):
    """Every id and name a built page defines."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.ids.update(v for k, v in attrs if k in ("id", "name") and v)


def _anchors(page: Path, cache: dict[Path, set[str]]) -> set[str]:
    if page not in cache:
        parser = _Anchors()
        parser.feed(page.read_text(encoding="utf-8"))
        cache[page] = parser.ids
    return cache[page]


def build_book(out: Path) -> subprocess.CompletedProcess[str]:
    """What `make book` runs, with warnings as errors."""
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-c", "book", "-d", str(out / "doctrees"),
               "-W", "--keep-going", "-q", ".", str(out / "html")]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def book(tmp_path_factory: pytest.TempPathFactory) -> Path:
    packages = ("sphinx", "myst_nb", "sphinx_book_theme", "sphinx_external_toc", "selenium")
    _require("the book's packages are not installed",
             all(importlib.util.find_spec(m) is not None for m in packages))
    out = tmp_path_factory.mktemp("book")
    built = build_book(out)
    assert built.returncode == 0, f"the book did not build cleanly:\n{built.stdout}\n{built.stderr}"
    return out / "html"


def test_book_has_every_chapter_in_order(book: Path):
    front = (book / "README.html").read_text(encoding="utf-8")
    sidebar = front.split('id="pst-primary-sidebar"')[1]
    hrefs = re.findall(r'href="(notebooks/[^"#]+\.html|docs/design\.html)"', sidebar)
    order = list(dict.fromkeys(hrefs))
    assert order == [f"notebooks/{c}.html" for c in CHAPTERS] + ["docs/design.html"]
    assert (book / "index.html").is_file(), "no index.html at the top of the book"


def test_built_files_fetch_nothing_from_the_network(book: Path):
    remote = {}
    for path in book.rglob("*"):
        if path.suffix in (".html", ".css", ".js") and "_sources" not in path.parts:
            found = [u for m in FETCHED_URL.finditer(path.read_text(encoding="utf-8", errors="replace"))
                     for u in m.groups() if u]
            if found:
                remote[str(path.relative_to(book))] = found
    # MathJax's own files name its CDN only as a fallback it never takes when loaded from a local path
    # (the browser test below would see the request).
    remote = {p: u for p, u in remote.items() if not p.startswith("_static/mathjax/")}
    assert not remote, f"built files that would fetch from the network: {remote}"


def test_notebook_pages_have_captions_equation_links_and_sources(book: Path):
    one = (book / "notebooks" / f"{CHAPTERS[0]}.html").read_text(encoding="utf-8")
    for n in range(1, 8):  # the paper's Eqs. 1-7, numbered as in the paper, each with an anchor
        numbered = re.search(rf'id="eq-{n}"[^>]*>\s*<span class="eqno">\({n}\)', one)
        assert numbered, f"Eq. {n} is not numbered on 01"
    for chapter in CHAPTERS:
        page = (book / "notebooks" / f"{chapter}.html").read_text(encoding="utf-8")
        source_link = f"{chapter}.py</span></code></a>" in page and "_downloads/" in page
        assert source_link, f"{chapter}: no link to its .py"
        figures = re.findall(r"<figure[\s\S]*?</figure>", page)
        assert all("<figcaption>" in f for f in figures), f"{chapter}: a figure without a caption"
        in_figures = sum(f.count("<img") for f in figures)
        assert page.count("<img") == in_figures, f"{chapter}: an image outside a figure"
        assert "widget-view+json" not in page, f"{chapter}: a widget the book cannot run"
    lab = (book / "notebooks" / "09_bandit_lab.html").read_text(encoding="utf-8")
    assert "needs a live Jupyter kernel" in lab, "09's slider output is not replaced by a note"
    later = "".join((book / "notebooks" / f"{c}.html").read_text(encoding="utf-8") for c in CHAPTERS[1:])
    links_to_01 = re.findall(rf'href="{CHAPTERS[0]}\.html#eq-\d+"', later)
    assert len(links_to_01) >= 20, "later notebooks do not link to 01's equations"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    chromium, driver_path = _tool("chromium", "chromium-browser"), _tool("chromedriver")
    _require("Chromium or chromedriver is missing", bool(chromium and driver_path))
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # Both paths given: Selenium Manager has nothing to look up or download.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(MATHJAX_TIMEOUT_S)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["http://*", "https://*", "ws://*", "wss://*"]})
    driver.get("about:blank")
    _requests(driver)  # what the browser loaded for its own start page is not the book's
    yield driver
    driver.quit()


def _typeset(driver) -> str:
    """Wait for MathJax (where the page loads it) to finish typesetting."""
    return driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const started = Date.now();
        (function wait() {
          if (!document.querySelector('.math')) return done('no math');
          if (window.MathJax && MathJax.startup && MathJax.startup.promise)
            return MathJax.startup.promise.then(() => done('ok'), e => done('error: ' + e));
          if (Date.now() - started > 30000) return done('MathJax never started');
          setTimeout(wait, 50);
        })();""")


PAGE_PROBE = """
const article = document.querySelector('article') || document.body;
const prose = article.cloneNode(true);
prose.querySelectorAll('pre, code, script, style, .cell_output, mjx-container').forEach(e => e.remove());
return {
  images: [...document.images].map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
  math: [...document.querySelectorAll('.math')].map(m => ({
      ok: !!m.querySelector('mjx-container') && !m.querySelector('[data-mjx-error], mjx-merror'),
      text: m.textContent.slice(0, 80)})),
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  text: prose.innerText,
};
"""


def _visit(driver, book: Path, page: Path, anchors: dict[Path, set[str]]) -> PageReport:
    report = PageReport(str(page.relative_to(book)))
    driver.get(page.as_uri())
    status = _typeset(driver)
    assert status in ("ok", "no math"), f"{report.name}: MathJax {status}"
    probe = driver.execute_script(PAGE_PROBE)
    report.console_errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    report.images = len(probe["images"])
    report.broken_images = [i["src"] for i in probe["images"] if not i["ok"]]
    report.equations = len(probe["math"])
    report.untypeset = [m["text"] for m in probe["math"] if not m["ok"]]
    report.raw_tex = [m.group() for m in RAW_TEX.finditer(probe["text"])]
    for href in probe["links"]:
        url = urlsplit(href)
        if url.scheme != "file":
            continue
        target = Path(unquote(url.path))
        report.links.append(href)
        assert target.is_file() and book in target.parents, f"{report.name}: broken link {href}"
        if url.fragment and target.suffix == ".html":
            assert unquote(url.fragment) in _anchors(target, anchors), f"{report.name}: no anchor for {href}"
    return report


def _requests(driver) -> list[str]:
    """Every URL the browser asked for since the last call (from Chromium's network log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_every_page_in_a_real_browser(book: Path, browser, capsys: pytest.CaptureFixture[str]):
    pages = sorted(book.rglob("*.html"))
    pages = [p for p in pages if "_static" not in p.parts and "_sources" not in p.parts]
    anchors: dict[Path, set[str]] = {}
    reports, requests = [], []
    start = time.perf_counter()
    for page in pages:
        reports.append(_visit(browser, book, page, anchors))
        requests += _requests(browser)
    elapsed = time.perf_counter() - start

    off_disk = sorted({u for u in requests if not u.startswith(LOCAL_SCHEMES)})
    assert not off_disk, f"requests that left the disk: {off_disk}"
    for r in reports:
        assert not r.console_errors, f"{r.name}: console errors {r.console_errors}"
        assert not r.broken_images, f"{r.name}: images that did not load {r.broken_images}"
        assert not r.untypeset, f"{r.name}: equations MathJax did not typeset {r.untypeset}"
        assert not r.raw_tex, f"{r.name}: raw TeX left on screen {r.raw_tex}"
    by_name = {r.name: r for r in reports}
    for chapter in CHAPTERS:
        assert by_name[f"notebooks/{chapter}.html"].images > 0, f"{chapter}: no figure"
    assert by_name[f"notebooks/{CHAPTERS[0]}.html"].equations > 100

    with capsys.disabled():
        links = [link for r in reports for link in r.links]
        print(f"\nbook in the browser: {len(reports)} pages, {sum(r.images for r in reports)} images, "
              f"{sum(r.equations for r in reports)} equations, {len(links)} internal links "
              f"({len(set(links))} distinct), {len(requests)} requests, all local; {elapsed:.1f} s")


def test_screenshots_of_the_front_page_and_the_derivation(book: Path, browser,
                                                          capsys: pytest.CaptureFixture[str]):
    SCREENS.mkdir(parents=True, exist_ok=True)
    browser.get((book / "README.html").as_uri())
    front = SCREENS / "front_page.png"
    assert browser.save_screenshot(str(front))

    browser.get((book / "notebooks" / f"{CHAPTERS[0]}.html").as_uri())
    assert _typeset(browser) == "ok"
    # The App. A.1 derivation: from the KL-constrained objective (Eq. 3) to its maximiser (Eq. 4).
    browser.execute_script("""
        const mark = [...document.querySelectorAll('strong')].find(s => s.textContent.includes('App. A.1'));
        mark.scrollIntoView({block: 'start'}); window.scrollBy(0, -80);""")
    derivation = SCREENS / "01_derivation.png"
    assert browser.save_screenshot(str(derivation))
    for shot in (front, derivation):
        assert shot.stat().st_size > 20_000, f"{shot} looks empty"
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    with capsys.disabled():
        print(f"screenshots: {front.relative_to(ROOT)}, {derivation.relative_to(ROOT)}")
