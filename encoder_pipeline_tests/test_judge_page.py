"""The judging page in a real browser (Debian's chromium through Playwright, as test_ui_browser.py):
five queries labelled with the keyboard (one typed into the page), one label corrected, the page
reloaded and the server reopened on the same folder, the BEIR files read back as runs read them;
the token and the loopback address; and `encoder-pipeline judge` itself. The page's screenshot lands
in test-artifacts/judge/."""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from judging_fixtures import QUERIES, tiny_store, write_domain_spec, write_queries
from playwright.sync_api import expect, sync_playwright

from encoder_pipeline.domains import load_domain
from encoder_pipeline.judge_page import create_app, open_session, running
from encoder_pipeline.lib.judging import query_id
from encoder_pipeline.lib.sources import read_judged
from encoder_pipeline.resources import PipelineSettings
from encoder_pipeline_tests.conftest import PROJECT_ROOT, run_cli

CHROMIUM = shutil.which("chromium")
SCREENSHOTS = PROJECT_ROOT / "test-artifacts" / "judge"
DOMAIN = "judgetest"
TARGET = 20
TYPED = "read rows of a CSV file as dictionaries"


@dataclass
class Judging:
    store: object
    spec_file: Path
    queries_file: Path
    lines: list

    def session(self):
        # the tiny profile: the base model teaches, so the pool needs no mpnet encode (suite time)
        return open_session(load_domain(DOMAIN), self.store, PipelineSettings(profile="tiny"),
                            queries_file=self.queries_file,
                            depth=3, target=TARGET, say=self.lines.append)

    @property
    def folder(self) -> Path:
        return self.store.domain_dir(DOMAIN) / "judged"


@pytest.fixture
def judging(tmp_path, monkeypatch) -> Judging:
    """A small domain (clean_corpus + eval_set, no rungs) with its spec and a queries file."""
    domains = tmp_path / "domains"
    domains.mkdir()
    monkeypatch.setenv("ENCODER_PIPELINE_DOMAINS", str(domains))
    monkeypatch.setenv("ENCODER_PIPELINE_HOME", str(tmp_path / "artifacts"))
    return Judging(tiny_store(tmp_path / "artifacts", DOMAIN), write_domain_spec(domains, DOMAIN),
                   write_queries(tmp_path / "queries.txt"), [])


def _get(url: str, body: bytes | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a GET, or of a JSON POST of `body`."""
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_every_route_needs_the_token_and_the_server_binds_loopback_only_and_bad_input_is_refused(judging):
    token = secrets.token_urlsafe(24)
    with running(create_app(judging.session(), token, DOMAIN)) as base:
        assert base.startswith("http://127.0.0.1:")
        for path in ("/", "/api/state", f"/api/state?token={token[:-1]}", "/?token="):
            status, _, body = _get(base + path)
            assert status == 403 and b"token" in body, path
        status, headers, body = _get(f"{base}/api/state?token={token}")
        assert status == 200 and json.loads(body)["query"]["text"] == QUERIES[0]
        assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer"
        state = json.loads(body)
        judgment = {"query_id": state["query"]["id"], "doc_id": state["candidates"][0]["doc_id"]}
        for wrong in (b"not json", b"[1]", json.dumps(judgment).encode(),
                      json.dumps({**judgment, "relevance": 2}).encode(),
                      json.dumps({**judgment, "query_id": "h-unknown", "relevance": 1}).encode()):
            status, _, answer = _get(f"{base}/api/judge?token={token}", wrong)
            assert status == 400 and json.loads(answer)["error"], wrong
        assert not judging.folder.exists()  # nothing was recorded
        status, _, answer = _get(f"{base}/api/judge?token={token}", json.dumps({**judgment, "relevance": 1}).encode())
        assert status == 200 and json.loads(answer) == {"judged_queries": 1, "target": TARGET}
        port = int(base.rsplit(":", 1)[1])
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.2", port), timeout=5):
            pass  # bound to 127.0.0.1 itself, not to every address (0.0.0.0 would answer here)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (README, Set up)")
def test_label_correct_reload_and_resume_in_a_browser(judging):
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    token = secrets.token_urlsafe(24)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)
        candidates = page.locator(".candidate")
        labelled = page.locator('.candidate[data-label="0"], .candidate[data-label="1"]')

        def judge_every_candidate() -> None:
            expect(candidates.first).to_be_visible()
            for number in range(candidates.count()):  # focus moves on to the next unjudged one
                page.keyboard.press("1" if number == 0 else "0")
            expect(labelled).to_have_count(candidates.count())

        try:
            with running(create_app(judging.session(), token, DOMAIN, "the function does it")) as base:
                page.goto(f"{base}/?token={token}")
                expect(page.locator("#progress")).to_have_text(f"0 of {TARGET} queries judged")
                expect(page.locator("#relevance")).to_have_text("Relevant means: the function does it")
                for number in range(4):
                    expect(page.locator("#query-text")).to_have_text(QUERIES[number])
                    judge_every_candidate()
                    page.keyboard.press("n")
                page.keyboard.press("/")
                page.keyboard.type(TYPED)
                page.keyboard.press("Enter")
                expect(page.locator("#query-text")).to_have_text(TYPED)
                judge_every_candidate()
                expect(page.locator("#progress")).to_have_text(f"5 of {TARGET} queries judged")
                # No system names by the candidates; the footer says which were pooled.
                assert not any(name in text for text in candidates.all_inner_texts()
                               for name in ("bm25", "off_the_shelf"))
                expect(page.locator("#systems")).to_contain_text("pooled from bm25, off_the_shelf")

                for _ in range(4):  # back to the second query; its relevant candidate was a mistake
                    page.keyboard.press("p")
                expect(page.locator("#query-text")).to_have_text(QUERIES[1])
                relevant = page.locator('.candidate[data-label="1"]')
                expect(relevant).to_have_count(1)
                doc = relevant.get_attribute("data-doc")
                relevant.get_by_role("button", name="Not relevant").click()
                corrected = page.locator(f'.candidate[data-doc="{doc}"]')
                expect(corrected).to_have_attribute("data-label", "0")

                page.reload()
                expect(page.locator("#query-text")).to_have_text(QUERIES[1])
                expect(corrected).to_have_attribute("data-label", "0")
                expect(corrected.locator(".label")).to_have_text("not relevant")
                expect(page.locator("#progress")).to_have_text(f"5 of {TARGET} queries judged")
                expect(page.locator('.candidate[data-label=""]')).to_have_count(0)
                page.screenshot(path=SCREENSHOTS / "page.png", full_page=True)

            written = [json.loads(line)["text"] for line in (judging.folder / "queries.jsonl").read_text().splitlines()]
            assert written == [*QUERIES[:4], TYPED]  # the BEIR files hold every judged query
            assert f"{query_id(QUERIES[1])}\t{doc}\t0" in (judging.folder / "qrels" / "dev.tsv").read_text()
            # a run evaluates the queries with a relevant document: the corrected one now has none
            queries, qrels = read_judged(str(judging.folder), "dev")
            assert list(queries.values()) == [QUERIES[0], *QUERIES[2:4], TYPED]
            assert all(sum(rels.values()) == 1 for rels in qrels.values())
            assert load_domain(DOMAIN).judged_location() == str(judging.folder)  # pointed at the first judgment

            # Closed and opened again: the next query never judged, the labels and progress from the log.
            with running(create_app(judging.session(), token, DOMAIN)) as base:
                page.goto(f"{base}/?token={token}")
                expect(page.locator("#query-text")).to_have_text(QUERIES[4])
                expect(page.locator("#position")).to_have_text(f"Query 6 of {len(QUERIES) + 1}")
                expect(page.locator("#progress")).to_have_text(f"5 of {TARGET} queries judged")
                page.keyboard.press("p")
                expect(page.locator("#query-text")).to_have_text(TYPED)
                expect(labelled).to_have_count(candidates.count())
        except BaseException:
            with contextlib.suppress(Exception):
                page.screenshot(path=SCREENSHOTS / "failure.png", full_page=True)
            raise
        finally:
            browser.close()


@pytest.mark.slow
def test_judge_command_prints_its_url_points_the_spec_and_stops_on_ctrl_c(judging, tmp_path):
    """...and, as it stops, puts the judged set's new size on eval_set's timeline in the UI."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DAGSTER_HOME": str(home)}
    process = subprocess.Popen(
        [sys.executable, "-m", "encoder_pipeline.cli", "judge", "--domain", DOMAIN, "--queries",
         str(judging.queries_file), "--depth", "2", "--no-browser"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while not any("judging" in line and "?token=" in line for line in lines):
            line = process.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(lines)
            lines.append(line)
        url = next(line for line in lines if "?token=" in line).split(" at ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:")
        assert any(f"[judged] will point at {judging.folder}" in line for line in lines), "".join(lines)
        assert _get(url.split("?")[0])[0] == 403
        status, _, body = _get(url.replace("/?", "/api/state?"))
        state = json.loads(body)
        assert status == 200 and state["systems"] == ["bm25", "off_the_shelf"] and state["target"] == 200
        request = urllib.request.Request(url.replace("/?", "/api/judge?"), json.dumps(
            {"query_id": state["query"]["id"], "doc_id": state["candidates"][0]["doc_id"], "relevance": 1}
        ).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["judged_queries"] == 1
        assert load_domain(DOMAIN).judged_location() == str(judging.folder)
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, "".join(lines) + out
    assert f"[judged] path = {judging.folder}" in out and "stopped: 1 of 200 queries judged" in out
    with dg.DagsterInstance.from_config(str(home)) as instance:
        [record] = instance.fetch_observations(dg.AssetKey("eval_set"), limit=5).records
    observed = record.asset_observation
    assert observed.partition == DOMAIN
    assert {key: observed.metadata[key].value for key in ("judged_set_queries", "judged_set_judgments",
                                                         "judged_set_relevant")} == {
        "judged_set_queries": 1, "judged_set_judgments": 1, "judged_set_relevant": 1}


def test_judge_command_refuses_an_unknown_domain_or_one_without_a_corpus(judging):
    code, _, err = run_cli(["judge", "--domain", "nosuch", "--no-browser"])
    assert code == 2 and "no spec for domain 'nosuch'" in err and len(err.strip().splitlines()) == 1
    shutil.copy(judging.spec_file, judging.spec_file.with_name("unbuilt.toml"))
    spec = judging.spec_file.with_name("unbuilt.toml")
    spec.write_text(spec.read_text().replace(f'name = "{DOMAIN}"', 'name = "unbuilt"'))
    code, _, err = run_cli(["judge", "--domain", "unbuilt", "--no-browser"])
    assert code == 2 and err.strip() == (f"error: domain 'unbuilt' has no clean corpus under "
                                         f"{judging.store.root}: run `encoder-pipeline materialize "
                                         "--domain unbuilt` first")
    malformed = judging.queries_file.with_suffix(".jsonl")
    malformed.write_text('{"text": "parse a date"}\n{"text": "wrap text"\n')
    code, _, err = run_cli(["judge", "--domain", DOMAIN, "--queries", str(malformed), "--no-browser"])
    assert code == 2 and err.startswith(f"error: {malformed}:2: not a JSON object")
