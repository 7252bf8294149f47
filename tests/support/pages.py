"""The pages a person opens, checked in a real headless browser (Debian's chromium driven by Playwright): each must
render, load every image, send no request off the page and log no console error."""
import os, shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("MLFLOW_NB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]


@dataclass
class PageCheck:
    "What a browser saw while loading one page."
    title: str
    headings: list[str]
    text: str
    images: list[dict]  # {src, width, height} per <img>, natural size
    left_page: list[str] = field(default_factory=list)  # requests that were not the page itself or inline data
    console_errors: list[str] = field(default_factory=list)

    @property
    def broken_images(self) -> list[str]:
        return [i["src"] for i in self.images if not i["width"] or not i["height"]]


def _allowed(url: str, own: str) -> bool:
    return url.startswith(("data:", "about:")) or url.split("#")[0] == own


def open_page(context, path: Path) -> PageCheck:
    "Load `path` in a new tab with every request routed: only the file itself and data: URLs may load."
    own, left, errors = path.resolve().as_uri(), [], []
    page = context.new_page()
    def route(r):
        if _allowed(r.request.url, own): r.continue_()
        else: left.append(r.request.url); r.abort()
    page.route("**/*", route)
    page.route_web_socket("**/*", lambda ws: (left.append(ws.url), ws.close()))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.goto(own, wait_until="networkidle")  # loaded, and nothing asked for in the 500 ms after (late imports too)
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=10_000)
    images = page.eval_on_selector_all(
        "img", "els => els.map(e => ({src: e.src.slice(0, 80), width: e.naturalWidth, height: e.naturalHeight}))")
    check = PageCheck(page.title(), page.eval_on_selector_all("h1, h2, h3", "els => els.map(e => e.innerText.trim())"),
                      page.inner_text("body"), images, left, errors)
    page.close()
    return check


needs_chromium = pytest.mark.skipif(
    not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)),
    reason=f"no chromium at {CHROMIUM}: `apt-get install -y chromium` (or set MLFLOW_NB_CHROMIUM to a Chromium binary)")


def launch(pw, profile: Path):
    "Chromium with a fresh profile, no sandbox (containers), no GPU and none of its own network traffic."
    return pw.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def problems(page: PageCheck) -> list[str]:
    "What is wrong with a loaded page, all at once (a report of every failure, not the first)."
    return [f"{what}: {v}" for what, v in (("images that did not load", page.broken_images),
                                           ("requests that left the page", page.left_page),
                                           ("console errors", page.console_errors)) if v]
