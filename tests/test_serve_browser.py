"""The web chat page in a real headless browser (Debian's chromium driven by playwright): load it,
pick a persona, type a message, see a streamed reply appear; the stop button cancels a reply.

Skipped where playwright or a chromium binary is missing (LLMGEN_CHROMIUM names the binary;
default /usr/bin/chromium). Set LLMGEN_SCREENSHOT=path.png to keep a screenshot of the page.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("playwright")
CHROMIUM = os.environ.get("LLMGEN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no chromium at {CHROMIUM} (apt-get install chromium)")]

from test_serve import Running, ckpt  # noqa: E402,F401  (the tiny model fixture and the in-process server)


@pytest.fixture(scope="module")
def page(ckpt):  # noqa: F811
    from playwright.sync_api import sync_playwright

    s = Running(ckpt, max_batch=4)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1100, "height": 700})
        pg.goto(s.url + "/")
        yield pg, s
        browser.close()
    s.stop()


def test_a_message_gets_a_streamed_reply(page):
    pg, s = page
    pg.wait_for_function("document.querySelectorAll('#model option').length === 3")
    assert pg.locator("#model option").all_inner_texts()[1].startswith("support:")
    pg.select_option("#model", "tiny/support")
    assert "customer-service" in pg.input_value("#system")  # the persona's system prompt is filled in
    pg.fill("#maxTokens", "24")
    pg.fill("#input", "Where is my order?")
    pg.click("#send")
    reply = pg.locator(".msg.assistant").last
    reply.locator(".meta").wait_for(timeout=60_000)  # written when the stream has ended
    streamed = reply.evaluate("e => e.firstChild.textContent")  # the reply's text node, before the meta line
    assert len(streamed) > 0 and "tokens in" in reply.locator(".meta").inner_text()
    assert pg.locator(".msg.user").last.inner_text() == "Where is my order?"
    if os.environ.get("LLMGEN_SCREENSHOT"):
        pg.screenshot(path=os.environ["LLMGEN_SCREENSHOT"])


def test_stop_cancels_the_reply_and_frees_the_row(page):
    pg, s = page
    pg.click("#reset")
    pg.fill("#maxTokens", "600")  # with the persona's system prompt, within the 1,024-token context
    pg.fill("#input", "Tell me everything.")
    pg.click("#send")
    pg.wait_for_function("document.querySelector('.msg.assistant') && "
                         "document.querySelector('.msg.assistant').textContent.length > 0")
    pg.click("#stop")
    pg.wait_for_function("!document.querySelector('#send').disabled")
    import time

    deadline = time.time() + 10
    while s.health()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert s.health()["running"] == 0
