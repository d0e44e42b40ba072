"""The chat web page at `/` in headless Chromium: attach an image, ask, watch the answer stream in.

Needs Debian's `chromium` (/usr/bin/chromium, or HYPEROWL_CHROMIUM) and Playwright for Python (no
downloaded browsers). Without them the test fails; HYPEROWL_SKIP_BROWSER=1 skips it instead.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hyperowl.serve.settings import ServerSettings
from tests.test_serve import Reference, picture, thread_server

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str:
    """The Chromium binary, or a skip (HYPEROWL_SKIP_BROWSER=1) / failure saying how to install it."""
    path = os.environ.get("HYPEROWL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if os.environ.get("HYPEROWL_SKIP_BROWSER") == "1":
        pytest.skip("HYPEROWL_SKIP_BROWSER=1")
    if not Path(path).is_file():
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (or set HYPEROWL_SKIP_BROWSER=1)")
    return path


@pytest.fixture(scope="module")
def ref(tiny_checkpoint: Path) -> Iterator[Reference]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Reference(tiny_checkpoint)
    torch.set_num_threads(threads)


def test_page_streams_an_answer_about_an_uploaded_image(ref: Reference, tmp_path: Path) -> None:
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is not installed: `pip install playwright` (no browser download needed)")
    image = picture(4)
    image.save(tmp_path / "shapes.png")
    question = "Describe the picture."
    parts = [{"type": "image"}, {"type": "text", "text": question}]
    expected, _, tokens = ref.answer([{"role": "user", "content": parts}], images=[image], max_tokens=24)
    assert tokens >= 3 and expected.strip(), "pick a question whose answer has several tokens"
    with thread_server(ref.model, ref.processor, ServerSettings(model_name="web")) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent === 'web'")
            page.click("summary")  # open the settings
            page.fill("#max-tokens", "24")
            page.set_input_files("#files", str(tmp_path / "shapes.png"))
            page.fill("#prompt", question)
            # Record every text the answer bubble shows: a streamed answer grows piece by piece.
            page.evaluate("""() => {
                window.seen = [];
                new MutationObserver(() => {
                    const answer = document.querySelector('.msg.assistant:last-child');
                    const text = answer ? answer.textContent : '';
                    if (text && text !== window.seen[window.seen.length - 1]) window.seen.push(text);
                }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
            }""")
            page.click("#send")
            page.wait_for_selector(".msg[data-done='1']", timeout=60_000)
            assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").text_content()
            seen = page.evaluate("window.seen")
            assert seen[-1] == expected
            assert len(seen) >= 2 and all(b.startswith(a) for a, b in itertools.pairwise(seen)), seen
            assert page.locator(".msg.user img").count() == 1
        finally:
            browser.close()
