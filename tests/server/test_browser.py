"""The web page in headless Chromium (Debian's ``chromium``, driven by Playwright): fill, choose a format, generate, see
progress and the image. Skipped, saying why, where chromium or playwright is missing; ``.ci/run`` installs both."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from server_harness import cancel, start_blocker

from kandinsky22.recipe import DEFAULT_QUALITY

CHROMIUM = "/usr/bin/chromium"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

WAIT_MS = 120_000

# Records every text the progress line shows, so the test sees the live updates, not only the last one.
RECORD_PROGRESS = """
window.progressTexts = [];
document.addEventListener("DOMContentLoaded", () => {
  const line = document.getElementById("progress-text");
  new MutationObserver(() => window.progressTexts.push(line.textContent))
    .observe(line, { childList: true, characterData: true, subtree: true });
});
"""


def test_generate_from_the_page(server, tmp_path):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else None)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.set_default_timeout(WAIT_MS)
            page.add_init_script(RECORD_PROGRESS)
            page.goto(server.url + "/")
            page.wait_for_selector("#scheduler option[value=ddpm]", state="attached")
            assert "cpu" in page.inner_text("#server-info")

            # Keep the worker busy, so that the page's job waits in the queue first.
            blocker = start_blocker(server)
            page.fill("#prompt", "a red cat, 4k photo")
            page.fill("#negative_prompt", "blurry")
            for field, value in (("width", "64"), ("height", "96"), ("steps", "2"), ("prior_steps", "2")):
                page.fill(f"#{field}", value)
            page.fill("#seed", "42")
            assert page.input_value("#output_format") == "png" and not page.is_visible("#quality")
            page.select_option("#output_format", "webp")
            # The quality input shows for the lossy formats, at the API's default, and goes as output_compression.
            assert page.is_visible("#quality") and page.input_value("#quality") == str(DEFAULT_QUALITY)
            page.fill("#quality", "55")
            # The noise-level spacing is offered for the samplers that take one (not ddpm, the default)
            assert page.is_disabled("#sigmas")
            page.select_option("#scheduler", "euler")
            assert page.is_enabled("#sigmas") and page.input_value("#sigmas") == ""
            page.select_option("#sigmas", "karras")
            with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v1/jobs")) as posted:
                page.click("#generate")
            assert posted.value.post_data_json["output_format"] == "webp"
            assert posted.value.post_data_json["output_compression"] == 55
            assert posted.value.post_data_json["scheduler"] == "euler"
            assert posted.value.post_data_json["sigmas"] == "karras"
            page.wait_for_function("window.progressTexts.some(t => t.startsWith('queued'))")
            assert page.is_visible("#cancel") and page.is_disabled("#generate")
            cancel(server, blocker)

            image = page.wait_for_selector("figure.result img")
            page.wait_for_function("document.querySelector('figure.result img').naturalWidth > 0")
            size = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert size == [64, 96]
            assert page.inner_text("figure.result .seed") == "seed 42"
            link = page.query_selector("figure.result a")
            assert link.get_attribute("download") == "kandinsky22-42.webp"
            assert link.get_attribute("href").endswith("/images/0.webp")

            texts = page.evaluate("window.progressTexts")
            assert any(t.startswith("queued — 0 ahead") for t in texts), texts
            assert texts[-1].startswith("done — 1 image(s)") and "decoder 2/2" in texts[-1], texts
            assert page.evaluate("document.getElementById('progress').value") == 1
            assert page.is_enabled("#generate") and not page.is_visible("#error")

            screenshot = tmp_path / "kandinsky22-page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"screenshot of the page: {screenshot}")
        finally:
            browser.close()


def test_a_request_that_gets_no_answer_is_shown_and_the_form_is_usable_again(server):
    """The POST fails at the network level: the page said nothing and kept Generate disabled ("submitting…")."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else None)
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(server.url + "/")
            page.wait_for_selector("#scheduler option[value=ddpm]", state="attached")
            sent = []
            page.route(
                "**/v1/jobs",
                lambda route: (sent.append(route.request.post_data_json), route.abort("connectionrefused")),
            )
            page.fill("#prompt", "a red cat")
            page.fill("#width", "64")
            page.fill("#height", "64")
            page.click("#generate")
            page.wait_for_selector("#error", state="visible", timeout=20_000)
            assert "could not reach the server" in page.inner_text("#error")
            assert page.is_enabled("#generate") and not page.is_visible("#cancel")
            # A PNG request (the default) sends no quality: the API refuses one for PNG.
            assert sent[0]["output_format"] == "png" and "output_compression" not in sent[0]
            assert "sigmas" not in sent[0]  # ddpm takes none: the API would refuse one
            assert not page.is_visible("#quality")
        finally:
            browser.close()
