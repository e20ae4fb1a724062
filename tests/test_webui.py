"""The web chat page, driven in headless Chromium: type a message, press Send, watch the reply stream in.

Needs the `playwright` Python package and the system Chromium at /usr/bin/chromium (Debian: apt-get install
chromium); `playwright install` is never run, so no browser is downloaded. Skips cleanly when either is absent.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from chatforge.config import ModelConfig, TokenizerConfig
from chatforge.engine import Engine
from chatforge.model import GPT
from chatforge.serve import create_app
from chatforge.tokenizer import Tokenizer

CHROMIUM = os.environ.get("CHATFORGE_CHROMIUM", "/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
uvicorn = pytest.importorskip("uvicorn")
if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?"] * 5


@pytest.fixture(scope="module")
def engine():
    tok = Tokenizer.train(CORPUS, TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1))
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=128, vocab_size=tok.vocab_size,
                      init_std=0.2)
    return Engine(GPT(cfg), tok, device="cpu")


@pytest.fixture(scope="module")
def server_url(engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny-web"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_web_chat_streams_a_reply(server_url, engine):
    shot = Path(tempfile.gettempdir()) / "chatforge_webui.png"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server_url + "/")
            assert "tiny-web" in page.title()
            page.fill("#max_tokens", "40")
            page.fill("#temperature", "0")
            page.fill("#input", "Hello there")
            # Catch the page's own request, to check the reply came over SSE in pieces, not in one block.
            with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as resp_info:
                page.click("#send")
            resp = resp_info.value
            assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
            page.wait_for_selector(".msg.user")
            # The reply bubble fills in as deltas arrive; Send is re-enabled when the stream has ended.
            page.wait_for_function("document.querySelector('.msg.assistant')?.textContent.length > 0",
                                   timeout=20_000)
            page.wait_for_function("!document.getElementById('send').disabled", timeout=20_000)
            reply = page.eval_on_selector(".msg.assistant", "e => e.textContent")
            page.screenshot(path=str(shot))
            assert page.inner_text(".msg.user") == "Hello there"
            # The page sent the settings typed in, and shows exactly the engine's greedy reply to them.
            sent = json.loads(resp.request.post_data)
            assert sent["messages"] == [{"role": "user", "content": "Hello there"}]
            assert sent["max_tokens"] == 40 and sent["temperature"] == 0 and sent["stream"] is True
            want = engine.chat(sent["messages"], max_new_tokens=40, temperature=0)
            assert want.strip() and reply == want, (reply, want)
            assert page.query_selector(".msg.error") is None, page.inner_text(".msg.error")
            assert not errors, errors
            events = [line[6:] for line in resp.text().splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            deltas = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
            deltas = [d for d in deltas if d]
            assert len(deltas) >= 2 and "".join(deltas) == reply  # streamed in pieces, all of them shown
        finally:
            browser.close()
    from PIL import Image
    with Image.open(shot) as im:  # a real screenshot of the page's viewport, not a blank frame
        assert im.format == "PNG" and im.size == (1280, 720), im.size
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 24)) > 2


def test_default_settings_work_and_a_rejected_message_leaves_the_history(server_url):
    """Found by outside testing: the page's default max tokens failed every message, and a rejected long
    message stayed in the history so every later message failed too."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(server_url + "/")
            page.wait_for_function("document.getElementById('max_tokens').value === '128'", timeout=10_000)

            def say(text: str) -> None:
                n = len(page.query_selector_all(".msg"))
                page.fill("#input", text)
                page.click("#send")
                page.wait_for_function(f"document.querySelectorAll('.msg').length > {n + 1}"
                                       " && !document.getElementById('send').disabled", timeout=60_000)

            say("Hello there")  # the page's own defaults: no error
            assert page.query_selector(".msg.error") is None, page.inner_text(".msg.error")
            say("fox " * 300)  # longer than the 128-token context: refused
            assert "left out of the conversation" in page.inner_text(".msg.error")
            say("Hello again")  # works: the refused message is not sent again, the oldest exchange is dropped
            assert len(page.query_selector_all(".msg.error")) == 1
            notes = page.query_selector_all(".msg.note")  # if the first reply filled the context, it was dropped
            assert all("left out to fit the context" in n.inner_text() for n in notes)
            assert page.eval_on_selector_all(".msg.assistant", "els => els[els.length - 1].textContent").strip()
        finally:
            browser.close()


def test_the_page_fits_a_phone(server_url):
    """Found by outside testing: at 375 px the header took three rows (~155 px) and the message box 93 px."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 375, "height": 667})
            page.goto(server_url + "/")
            header = page.eval_on_selector("header", "e => e.getBoundingClientRect().height")
            box = page.eval_on_selector("#input", "e => e.getBoundingClientRect().width")
            assert header <= 60, header
            assert box >= 300, box
            page.screenshot(path=str(Path(tempfile.gettempdir()) / "chatforge_phone.png"))
            assert not page.is_visible("#temperature")
            page.click("#settings")  # the settings are one tap away
            assert page.is_visible("#temperature") and page.is_visible("#max_tokens")
            page.fill("#input", "Hello there")
            page.click("#send")
            page.wait_for_function("document.querySelector('.msg.assistant')?.textContent.length > 0"
                                   " && !document.getElementById('send').disabled", timeout=60_000)
            wide = browser.new_page(viewport={"width": 1280, "height": 800})
            wide.goto(server_url + "/")
            assert wide.is_visible("#temperature") and not wide.is_visible("#settings")
        finally:
            browser.close()
