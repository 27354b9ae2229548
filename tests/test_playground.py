"""The playground page at GET / in a real headless Chromium (Debian's package, driven by Playwright): it shows the
model, streams a reply into the page with TTFT and tokens/s, and its Stop button aborts the request in the engine.
Skips when Playwright or a Chromium binary is missing (.ci/run installs both)."""

from __future__ import annotations

import shutil
import time

import pytest

from longcat_service.server.app import ServerConfig
from longcat_service.server.background import BackgroundServer
from tests.fake_engine import FakeEngine, Script

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install -y chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server():
    engine = FakeEngine(Script(step_delay_s=0.03, token_text="cat "), max_model_len=4096)
    with BackgroundServer(lambda: engine, ServerConfig(port=0, http_port=0)) as srv:
        yield srv


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.server.http.port}/")
        yield page
        browser.close()


def assistant_text(page) -> str:
    replies = page.locator(".msg.assistant .content")
    return replies.last.inner_text() if replies.count() else ""


def test_page_shows_the_model(page, server):
    sync_api.expect(page.locator("#model-info")).to_contain_text(server.config.options.model_name)


def test_a_prompt_streams_text_and_stop_aborts_it_in_the_engine(page, server):
    page.fill("#max_tokens", "2000")
    page.fill("#prompt", "Tell me about cats")
    page.click("#send")
    sync_api.expect(page.locator(".msg.user").last).to_have_text("userTell me about cats")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .content')[0].textContent.length > 0")
    first = assistant_text(page)
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant .content')[0].textContent.length > {len(first)}")
    assert assistant_text(page).startswith("cat cat")  # more text arrived after the first: it streams
    sync_api.expect(page.locator("#ttft")).to_contain_text("ms")
    assert server.engine.running, "the request should still be generating"
    page.click("#stop")
    sync_api.expect(page.locator("#finish")).to_have_text("stopped")
    end = time.monotonic() + 10
    while server.engine.running and time.monotonic() < end:
        time.sleep(0.02)
    assert not server.engine.running and len(server.engine.aborted) == 1
    stopped_at = assistant_text(page)
    time.sleep(0.3)
    assert assistant_text(page) == stopped_at  # nothing arrives after Stop
    assert page.locator("#send").is_enabled() and not page.locator("#stop").is_enabled()


def test_a_complete_reply_shows_finish_reason_token_count_and_rate(page, server):
    page.fill("#max_tokens", "6")
    page.fill("#temperature", "0")
    page.fill("#prompt", "Again")
    page.press("#prompt", "Enter")  # Enter sends
    sync_api.expect(page.locator("#finish")).to_have_text("length")
    assert page.locator(".msg.assistant .content").last.inner_text() == "cat " * 6
    assert page.locator("#ntokens").inner_text() == "6"
    assert float(page.locator("#tps").inner_text()) > 0
