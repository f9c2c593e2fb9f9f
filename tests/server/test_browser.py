"""The web page in headless Chromium (Debian's ``chromium``, driven by Playwright): fill, choose a format, generate, see
progress and the image. Skipped, saying why, where chromium or playwright is missing; ``.ci/run`` installs both."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from server_harness import cancel, start_blocker

from kandinsky22.jobs import DEFAULT_STRENGTH
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


# -- the image tasks ---------------------------------------------------------------------------------------------------


def _launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else None)


def _open(browser, server):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.set_default_timeout(WAIT_MS)
    page.goto(server.url + "/")
    page.wait_for_selector("#task option[value=inpaint]", state="attached")
    return page


def _png(path: Path, size: tuple[int, int], mask: bool = False) -> Path:
    """A PNG file of this size: a gradient, or a mask (white = repaint) of a rectangle in the middle."""
    if mask:
        image = PIL.Image.new("L", size, 0)
        image.paste(255, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    else:
        x = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :, None]
        y = np.linspace(255, 0, size[1], dtype=np.uint8)[:, None, None]
        image = PIL.Image.fromarray(np.concatenate(np.broadcast_arrays(x, y, (x // 2 + y // 2)), axis=2))
    image.save(path)
    return path


def _data_url_bytes(value: str) -> bytes:
    header, data = value.split(",", 1)
    assert header == "data:image/png;base64", header
    return base64.b64decode(data)


def _result_size(page) -> list[int]:
    image = page.wait_for_selector("figure.result img")
    page.wait_for_function("document.querySelector('figure.result img').naturalWidth > 0")
    return image.evaluate("img => [img.naturalWidth, img.naturalHeight]")


def test_img2img_from_the_page_takes_the_uploaded_image_and_its_size(server, tmp_path):
    source = _png(tmp_path / "source.png", (80, 64))
    with sync_api.sync_playwright() as playwright:
        browser = _launch(playwright)
        try:
            page = _open(browser, server)
            # The server's tasks, mix left to the API
            tasks = page.eval_on_selector_all("#task option", "options => options.map(o => o.value)")
            assert tasks == ["text2img", "img2img", "inpaint", "depth"]
            assert not page.is_visible("#image") and not page.is_visible("#strength")
            page.select_option("#task", "img2img")
            assert (
                page.is_visible("#image") and not page.is_visible("#mask_image") and not page.is_visible("#hint_image")
            )
            # Strength at the API's default; the size blank (the input's), and blank is allowed
            assert page.input_value("#strength") == str(DEFAULT_STRENGTH["img2img"])
            assert page.input_value("#width") == page.input_value("#height") == ""
            page.fill("#prompt", "a red cat")
            page.fill("#steps", "4")
            page.fill("#prior_steps", "2")
            page.fill("#seed", "7")
            page.set_input_files("#image", str(source))
            with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v1/jobs")) as posted:
                page.click("#generate")
            sent = posted.value.post_data_json
            assert sent["task"] == "img2img" and sent["strength"] == DEFAULT_STRENGTH["img2img"]
            assert _data_url_bytes(sent["image"]) == source.read_bytes()
            for absent in ("width", "height", "mask_image", "hint_image", "keep_unmasked", "mask_blur"):
                assert absent not in sent, absent
            assert _result_size(page) == [80, 64]
            assert page.inner_text("#progress-text").startswith("done"), page.inner_text("#progress-text")
            assert not page.is_visible("#error")
        finally:
            browser.close()


def test_inpaint_from_the_page_sends_the_mask_and_its_options(server, tmp_path):
    source = _png(tmp_path / "source.png", (64, 80))
    mask = _png(tmp_path / "mask.png", (64, 80), mask=True)
    with sync_api.sync_playwright() as playwright:
        browser = _launch(playwright)
        try:
            page = _open(browser, server)
            page.select_option("#task", "inpaint")
            assert page.is_visible("#mask_image") and page.is_visible("#keep_unmasked")
            assert not page.is_visible("#strength") and not page.is_checked("#keep_unmasked")
            assert page.input_value("#mask_blur") == "0"
            page.fill("#prompt", "a hat")
            page.fill("#steps", "2")
            page.fill("#prior_steps", "2")
            page.set_input_files("#image", str(source))
            # Without a mask: the API's answer, naming the field, in the error line; the form usable again
            page.click("#generate")
            page.wait_for_selector("#error", state="visible")
            assert "mask_image" in page.inner_text("#error"), page.inner_text("#error")
            assert page.is_enabled("#generate")

            page.set_input_files("#mask_image", str(mask))
            page.check("#keep_unmasked")
            page.fill("#mask_blur", "2.5")
            with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v1/jobs")) as posted:
                page.click("#generate")
            sent = posted.value.post_data_json
            assert sent["task"] == "inpaint" and sent["keep_unmasked"] is True and sent["mask_blur"] == 2.5
            assert _data_url_bytes(sent["image"]) == source.read_bytes()
            assert _data_url_bytes(sent["mask_image"]) == mask.read_bytes()
            for absent in ("width", "height", "strength", "hint_image"):
                assert absent not in sent, absent
            assert _result_size(page) == [64, 80]
            assert page.inner_text("#progress-text").startswith("done"), page.inner_text("#progress-text")
            assert not page.is_visible("#error")
        finally:
            browser.close()


def _post(page) -> dict:
    """Click Generate; the JSON body the page posted (the test's route aborts it, so no job runs)."""
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v1/jobs")) as posted:
        page.click("#generate")
    page.wait_for_selector("#generate:enabled")
    return posted.value.post_data_json


def test_the_task_selector_shows_and_sends_only_the_chosen_tasks_inputs(server, tmp_path):
    source = _png(tmp_path / "source.png", (64, 64))
    with sync_api.sync_playwright() as playwright:
        browser = _launch(playwright)
        try:
            page = _open(browser, server)
            page.route("**/v1/jobs", lambda route: route.abort())
            page.fill("#prompt", "a room")
            default_width = page.input_value("#width")
            # depth: the hint and an optional image; strength (at depth's default) only once an image is chosen
            page.select_option("#task", "depth")
            assert page.is_visible("#hint_image") and page.is_visible("#image") and not page.is_visible("#strength")
            page.set_input_files("#hint_image", str(source))
            sent = _post(page)
            assert sent["task"] == "depth" and "strength" not in sent and "image" not in sent
            assert _data_url_bytes(sent["hint_image"]) == source.read_bytes()
            page.set_input_files("#image", str(source))
            assert page.input_value("#strength") == str(DEFAULT_STRENGTH["depth"])
            sent = _post(page)
            assert (
                sent["strength"] == DEFAULT_STRENGTH["depth"] and _data_url_bytes(sent["image"]) == source.read_bytes()
            )

            # img2img, then back to text2img: the image inputs hidden and not sent, the size the server's default again
            page.select_option("#task", "img2img")
            assert _post(page)["task"] == "img2img"
            page.select_option("#task", "text2img")
            for field in ("image", "mask_image", "hint_image", "strength", "keep_unmasked", "mask_blur"):
                assert not page.is_visible(f"#{field}"), field
            assert page.input_value("#width") == default_width and page.get_attribute("#width", "required") is not None
            sent = _post(page)
            assert sent["task"] == "text2img" and sent["width"] == sent["height"] == int(default_width)
            for absent in ("image", "mask_image", "hint_image", "strength", "keep_unmasked", "mask_blur"):
                assert absent not in sent, absent
        finally:
            browser.close()
