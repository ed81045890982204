"""Drive the page in a headless Chromium (playwright, Debian's or any installed Chromium): the browser test and
benchmarks/web_speed.py open `?prompt=...` URLs and read the #result the page writes."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """A Chromium executable: $CHROMIUM, else the first of CHROMIUM on PATH."""
    found = os.environ.get("CHROMIUM") or next((p for p in map(shutil.which, CHROMIUM) if p), None)
    return found if found and os.access(found, os.X_OK) else None


def why_no_browser() -> str | None:
    """None where a page can be driven here, else why not (for a test's skip reason)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; it is in moemla's dev extra)"
    if find_chromium() is None:
        return "no Chromium on this machine (apt-get install chromium, or set CHROMIUM to its path)"
    return None


@dataclass
class PageRun:
    result: dict  # what the page wrote into #result: ids, ttft_ms, decode_tokens_per_s, threads, or error
    state: str  # done or error
    status: str  # the status line the reader sees
    story: str  # the text shown
    console_errors: list[str] = field(default_factory=list)


class Browser:
    """One headless Chromium; open() loads a URL and waits for the page's generation to finish."""

    def __init__(self, page_timeout_s: float = 180.0) -> None:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(executable_path=find_chromium(), args=["--no-sandbox"])
        self.timeout_ms = page_timeout_s * 1000

    def open(self, url: str, screenshot: str | None = None) -> PageRun:
        page = self._browser.new_page(viewport={"width": 1000, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(url)
            page.wait_for_function("['done', 'error'].includes(document.getElementById('result').dataset.state)",
                                   timeout=self.timeout_ms)  # fmt: skip
            if screenshot:
                page.screenshot(path=screenshot, full_page=True)
            return PageRun(
                result=json.loads(page.text_content("#result") or "{}"),
                state=page.get_attribute("#result", "data-state") or "",
                status=page.text_content("#status") or "",
                story=page.text_content("#story") or "",
                console_errors=errors,
            )
        finally:
            page.close()

    def close(self) -> None:
        self._browser.close()
        self._pw.stop()


@contextmanager
def browser(page_timeout_s: float = 180.0) -> Iterator[Browser]:
    b = Browser(page_timeout_s)
    try:
        yield b
    finally:
        b.close()


@contextmanager
def serving(folder: str) -> Iterator[str]:
    """The folder served on a free loopback port (moemla web's server) in a thread; yields its URL."""
    import threading

    from moemla.web.server import make_server, url

    server = make_server(folder, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield url(server)
    finally:
        server.shutdown()
        server.server_close()
