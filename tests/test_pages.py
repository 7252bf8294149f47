"""The pages a person opens, in a real headless browser (Debian's chromium driven by Playwright): the monitoring
report of `mlflow-nb monitor` and the step notebooks `mlflow-nb run` logs as `.html`. Each must render, load every
image, send no request off the page and log no console error."""
import os, shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, run_cli
from mlflow_nb.core import PARENT_RUN, TAG_KIND

CHROMIUM = os.environ.get("MLFLOW_NB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
FAST = ["-o", "model.params.n_estimators=30", "-o", "validation.cv_folds=3"]  # as tests/test_pipeline.py
STEPS = ["train", "validate", "select", "promote", "monitor"]

pytestmark = pytest.mark.skipif(
    not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)),
    reason=f"no chromium at {CHROMIUM}: `apt-get install -y chromium` (or set MLFLOW_NB_CHROMIUM to a Chromium binary)")


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


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    "Chromium with a fresh profile, no sandbox (containers), no GPU and none of its own network traffic."
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")),
                                                        executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield context
        context.close()


@pytest.fixture(scope="module")
def finished_pipeline(tmp_path_factory):
    "One full `mlflow-nb run` on a fresh project (the same run tests/test_pipeline.py makes)."
    project = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(CONFIGS, project / "configs")
    return project, run_cli("run", *FAST, cwd=project)


@pytest.fixture(scope="module")
def drift_report_page(finished_pipeline):
    "report.html from `mlflow-nb monitor` on a copy of the data with bmi and s5 shifted."
    project, r = finished_pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    from mlflow_nb.data import load_dataset
    full = load_dataset("sklearn:diabetes")
    full.assign(bmi=full.bmi + full.bmi.std(), s5=full.s5 * 3).to_csv(project / "shifted.csv", index=False)
    m = run_cli("monitor", "--current", "shifted.csv", "--out", "report", cwd=project)
    assert m.returncode == 0, m.stderr[-3000:]
    return project / "report" / "report.html"


def _step_html(project: Path, step: str, dest: Path) -> Path:
    "Download `notebook/<step>.html` from the step's run of the pipeline, through the tracking store."
    uri = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name("development").experiment_id
    [first] = client.search_runs([exp], f"tags.`{TAG_KIND}` = 'pipeline' and attributes.status = 'FINISHED'",
                                 order_by=["attributes.start_time ASC"], max_results=1)
    [run] = client.search_runs([exp], f"tags.`{PARENT_RUN}` = '{first.info.run_id}' and tags.mlflow.runName = '{step}'")
    dest.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run.info.run_id, f"notebook/{step}.html", str(dest)))


def _problems(page: PageCheck) -> list[str]:
    "What is wrong with a loaded page, all at once (a report of every failure, not the first)."
    return [f"{what}: {v}" for what, v in (("images that did not load", page.broken_images),
                                           ("requests that left the page", page.left_page),
                                           ("console errors", page.console_errors)) if v]


def test_the_monitoring_report_renders_offline_with_its_plots(browser, drift_report_page):
    page = open_page(browser, drift_report_page)
    assert page.title == "monitoring models:/diabetes_regressor@champion (version 1)", page.title
    assert page.headings[0] == page.title and {"Alerts", "Distributions", "All columns"} <= set(page.headings)
    assert "2 of 10 features drifted" in page.text
    assert len(page.images) >= 2, page.images  # one histogram per drifted column: bmi and s5 at least
    assert not _problems(page), "\n".join(_problems(page))


@pytest.mark.parametrize("step", STEPS)
def test_a_logged_step_notebook_renders_offline(browser, finished_pipeline, tmp_path, step):
    project, r = finished_pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    page = open_page(browser, _step_html(project, step, tmp_path))
    problems = _problems(page)
    if step not in page.title: problems.append(f"the title does not name the step: {page.title!r}")
    if not page.headings or not page.headings[0].startswith(f"Step: {step}"):
        problems.append(f"no 'Step: {step}' heading first: {page.headings}")
    if "mlflow_nb.steps" not in page.text: problems.append("the code cells did not render")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_page_that_leaks(browser, tmp_path):
    "The checks above can fail: a remote image, a remote script, a broken inline image and a script error."
    leaky = tmp_path / "leaky.html"
    leaky.write_text("<!doctype html><html><head><title>leaky</title>"
                     "<script src='https://cdn.example.invalid/lib.js'></script></head><body><h1>leaky</h1>"
                     "<img src='https://example.invalid/x.png'><img src='data:image/png;base64,AAAA'>"
                     "<img src='data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7'>"
                     "<script>missing_function()</script></body></html>")
    page = open_page(browser, leaky)
    assert page.title == "leaky" and page.headings == ["leaky"]
    assert sorted(page.left_page) == ["https://cdn.example.invalid/lib.js", "https://example.invalid/x.png"]
    assert len(page.broken_images) == 2 and len(page.images) == 3, page.images
    assert any("missing_function" in e for e in page.console_errors), page.console_errors
