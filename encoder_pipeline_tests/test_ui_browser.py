"""The UI in a real browser: `dagster dev` on 127.0.0.1 over the session's tiny `code` instance, driven
headless by Debian's chromium through Playwright. From the asset graph, a `code` partition of
clean_corpus is launched and runs to success; the eval_report page shows the report's figures and its
plots as images; the serving_index page says whether its promotion was forced; domain_health, refreshed by its sensor
after that run, tells the domains apart. Screenshots of every step land in test-artifacts/ui/."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.layout import CORPUS_FILE
from encoder_pipeline_tests.conftest import PROJECT_ROOT

CHROMIUM = shutil.which("chromium")
SCREENSHOTS = PROJECT_ROOT / "test-artifacts" / "ui"
WORKSPACE = PROJECT_ROOT / "workspace.yaml"
SERVER_START_S = 240
RUN_SUCCESS_S = 420
HEALTH_REFRESH_S = 300  # the sensor's 15 s interval, a queued run, its process start
PAGE_RENDER_S = 30  # a (re)loaded page's own GraphQL queries, on a busy machine
FIGURES = ("ladder", "sweep", "latency")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (README, Set up: apt-get install chromium)")]


@dataclass
class UI:
    url: str
    log: Path
    artifacts: ArtifactStore  # the artifact root runs launched from this UI write to

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _location_name(ui: UI) -> str:
    """The code location's name, as the server derives it from workspace.yaml."""
    query = json.dumps({"query": "{ workspaceOrError { ... on Workspace { locationEntries { name } } } }"})
    request = urllib.request.Request(f"{ui.url}/graphql", query.encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        (entry,) = json.load(response)["data"]["workspaceOrError"]["locationEntries"]
    return entry["name"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(process: subprocess.Popen, ui: UI) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dagster dev exited with {process.returncode}:\n{ui.log_tail()}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{ui.url}/server_info", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(1)
    pytest.fail(f"dagster dev did not answer on {ui.url} within {SERVER_START_S} s:\n{ui.log_tail()}")


@pytest.fixture(scope="module")
def ui(tiny_code_run, tiny_dagster_home, tmp_path_factory):
    """`dagster dev` (webserver, daemon with the run queue, code server) on the session's instance,
    which already holds the tiny graph's materializations (tiny_code_run runs first). Launched runs
    write to their own artifact root, so the shared tiny build stays as the other tests read it."""
    work = tmp_path_factory.mktemp("ui")
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(tiny_dagster_home),
           "ENCODER_PIPELINE_HOME": str(work / "artifacts"), "ENCODER_PIPELINE_PROFILE": "tiny"}
    server = UI(f"http://127.0.0.1:{port}", work / "dagster_dev.log", ArtifactStore(work / "artifacts"))
    with server.log.open("wb") as log:
        # Its own process group: dagster dev's webserver, daemon, code server and run workers all
        # go down with it.
        process = subprocess.Popen(
            [sys.executable, "-m", "dagster", "dev", "-h", "127.0.0.1", "-p", str(port),
             "-w", str(WORKSPACE)],
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_server(process, server)
        yield server
    finally:
        # Ctrl-C as in a terminal (dagster dev shuts its services down on SIGINT, not on SIGTERM),
        # then whatever is left of the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)  # nothing left to check: the group is killed after
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def browser():
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)  # no stale failure shots from an earlier run
    SCREENSHOTS.mkdir(parents=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def ui_page(browser) -> Page:
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    expect.set_options(timeout=60_000)  # the code location may still be loading on a busy machine
    # Dagster's "Join the Dagster community" dialog is off in the shipped dagster.yaml (`nux`): it
    # must never cover the page; should it appear, the test fails on it.
    def community_dialog(_) -> None:
        raise AssertionError("Dagster's community dialog appeared: nux is on in the instance config")
    page.add_locator_handler(page.get_by_text("Join the Dagster community"), community_dialog)
    yield page
    context.close()


@contextlib.contextmanager
def shown_on_failure(page: Page, ui: UI, name: str):
    """On failure: a full-page screenshot, the page's text and the server's log tail."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            page.screenshot(path=SCREENSHOTS / f"{name}-failure.png", full_page=True)
            print(f"--- page {page.url} ---\n{page.inner_text('body')}")
        print(f"--- dagster dev log ---\n{ui.log_tail()}")
        raise


def snap(page: Page, name: str) -> None:
    page.screenshot(path=SCREENSHOTS / f"{name}.png")


def metadata_row(page: Page, label: str):
    """The asset page's metadata table row whose label is exactly `label`."""
    return page.locator("tr").filter(
        has=page.locator("td").filter(has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")))


def shows_up(locator: Locator, within_s: float) -> bool:
    """Whether `locator` is visible within `within_s`. A page's load event can fire before its own
    queries have rendered the metadata (on a busy machine, always), so an immediate `count()` after
    a reload misses a row that is there: a CI run counted none for four minutes after the refresh
    had landed."""
    try:
        locator.first.wait_for(state="visible", timeout=within_s * 1000)
    except PlaywrightTimeout:
        return False
    return True


def test_launch_a_domain_partition_from_the_asset_graph(ui, ui_page):
    page = ui_page
    with shown_on_failure(page, ui, "launch"):
        page.goto(f"{ui.url}/locations/{_location_name(ui)}/asset-groups/corpus")
        node = page.get_by_text("clean_corpus", exact=True).first
        expect(node).to_be_visible()
        snap(page, "01-asset-graph-corpus")

        node.click()
        expect(page.get_by_text("retrievable units").first).to_be_visible()  # its description
        page.get_by_role("button", name="Materialize selected").click()
        dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize clean_corpus")
        dialog.get_by_text("Select a partition or create one").click()
        page.get_by_placeholder("Filter partitions").fill("code")
        code = page.get_by_role("checkbox", name="code")
        page.get_by_role("menuitem").filter(has=code).click()
        expect(code).to_be_checked()
        dialog.get_by_text("Launch runs to materialize clean_corpus").click()  # closes the picker
        expect(dialog.get_by_text("1 partition", exact=True)).to_be_visible()
        snap(page, "02-partition-code-selected")

        dialog.get_by_role("button", name="Launch 1 run").click()
        toast = page.get_by_text(re.compile(r"^Launched run [0-9a-f]{8}$"))
        expect(toast).to_be_visible()
        short_id = toast.inner_text().split()[-1]

        page.goto(f"{ui.url}/runs")
        page.get_by_role("link", name=short_id).first.click()
        expect(page).to_have_url(re.compile(rf"/runs/{short_id}[0-9a-f-]{{28}}"))
        run_id = page.url.rsplit("/runs/", 1)[1].split("?")[0]
        expect(page.get_by_text("partition: code").first).to_be_visible()
        snap(page, "03-run-launched")

        status = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
        expect(status).to_be_visible(timeout=RUN_SUCCESS_S * 1000)
        snap(page, "04-run-finished")
        assert status.inner_text() == "Success", f"run {run_id} ended {status.inner_text()}"

    # The run went through the server's environment: the version it published (named after the
    # run) is under the server's artifact root.
    version = ui.artifacts.latest("code", "clean_corpus")
    assert version.name == run_id[:8] and (version / CORPUS_FILE).stat().st_size > 0


def test_eval_report_shows_its_figures_and_plots(ui, ui_page, tiny_code_run):
    result, _ = tiny_code_run
    report = next(e for e in result.get_asset_materialization_events()
                  if e.asset_key.to_user_string() == "eval_report").materialization.metadata
    page = ui_page
    with shown_on_failure(page, ui, "report"):
        page.goto(f"{ui.url}/assets/eval_report?view=partitions&partition=code")
        expect(metadata_row(page, "verdict")).to_contain_text(report["verdict"].value)
        # Floats print the same in Python and JavaScript (shortest round-trip form).
        expect(metadata_row(page, "ndcg_at_10")).to_contain_text(repr(report["ndcg_at_10"].value))
        expect(metadata_row(page, "ndcg_at_10_off_the_shelf")).to_contain_text(
            repr(report["ndcg_at_10_off_the_shelf"].value))
        snap(page, "05-eval-report-code")

        metadata_row(page, "report").get_by_text("[Show Markdown]").click()
        dialog = page.get_by_role("dialog")
        expect(dialog.get_by_role("heading", name="Ladder")).to_be_visible()
        expect(dialog.get_by_text("Verdict:")).to_be_visible()
        for alt in FIGURES:
            image = dialog.get_by_role("img", name=alt, exact=True)
            image.scroll_into_view_if_needed()
            expect(image).to_be_visible()
            width, height = image.evaluate("i => i.decode().then(() => [i.naturalWidth, i.naturalHeight])")
            assert width > 100 and height > 100, f"{alt} plot did not render ({width}x{height})"
        dialog.get_by_role("img", name="ladder", exact=True).scroll_into_view_if_needed()
        snap(page, "06-report-with-plots")


def test_serving_index_says_whether_its_promotion_was_forced(ui, ui_page, tiny_code_served):
    """The promotion as the UI shows it: `forced` (the report refused the candidate and
    `promote --force` served it anyway, which tiny_code_served does when the tiny build's report
    refuses it) and the report's reason."""
    page = ui_page
    with shown_on_failure(page, ui, "serving"):
        page.goto(f"{ui.url}/assets/serving_index?view=partitions&partition=code")
        expect(metadata_row(page, "forced")).to_contain_text(str(tiny_code_served.forced).lower())
        expect(metadata_row(page, "reason")).to_contain_text(tiny_code_served.metadata["reason"].value)
        snap(page, "07-serving-index-promotion")


def test_domain_health_tells_the_domains_apart(ui, ui_page):
    """The run launched above (a `code` partition) ends, the daemon's run-status sensor refreshes
    domain_health, and its table says at a glance that `code` is healthy while the built-in domains
    the spec sensor registered were never built."""
    page = ui_page
    with shown_on_failure(page, ui, "health"):
        page.goto(f"{ui.url}/assets/domain_health")
        domains = metadata_row(page, "domains")
        deadline = time.monotonic() + HEALTH_REFRESH_S
        while not shows_up(domains, PAGE_RENDER_S):
            assert time.monotonic() < deadline, "the sensor never refreshed domain_health"
            page.reload()
        # a short table is shown inline in the metadata row (a long one behind "[Show Markdown]")
        code = domains.locator("tr").filter(has=page.locator("td").filter(has_text=re.compile(r"^\s*code\s*$")))
        expect(code).to_contain_text("healthy")
        expect(domains).to_contain_text("never built")
        expect(metadata_row(page, "domains_healthy")).to_contain_text("1")
        snap(page, "08-domain-health")
