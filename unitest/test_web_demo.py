"""The Gradio web demo (`models.image_captioning.web_demo`, ``main.py serve``), driven in a real browser.

One server for the module (a tiny random model, on 127.0.0.1 and a free port), a headless Chromium through
Playwright (Debian's ``chromium`` package: Playwright's own browser download does not run on these
machines; ``apt-get install chromium``, or ``python -m playwright install chromium`` elsewhere), and
Gradio's own client against the same server. Set ``IMAGE_CAPTIONING_SCREENSHOT=demo/web_demo.png`` to save
the page as README shows it.
"""

import os
import shutil
import socket

import pytest

from unitest.tiny_models import DEMO_DIR, build_tiny_clipcap, shared_tiny_files

CHROMIUM = os.environ.get("IMAGE_CAPTIONING_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytest.importorskip("gradio")
playwright_api = pytest.importorskip("playwright.sync_api")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, model) of a running demo."""
    from models.image_captioning.clip_cap import ClipCap
    from models.image_captioning.pretrained import convert_model
    from models.image_captioning.web_demo import build_demo

    files = shared_tiny_files(tmp_path_factory)
    directory = tmp_path_factory.mktemp("web_demo")
    checkpoint = build_tiny_clipcap(directory / "clipcap.pt", files["tokenizer"], stop_boost=1.5)
    convert_model(ClipCap, checkpoint, files["clip"], files["tokenizer"], directory / "model", name="tiny_demo")
    model = ClipCap.load(str(directory / "model"))
    demo = build_demo(model)
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", model
    demo.close()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set IMAGE_CAPTIONING_CHROMIUM)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def _words(texts):
    """Texts with whitespace runs as one space: the page shows them so (and HTML turns \\r into \\n)."""
    return [" ".join(t.split()) for t in texts]


def _caption_in_page(browser, url, paths, screenshot=None):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(url)
        page.set_input_files("#images input[type=file]", [str(p) for p in paths])
        page.wait_for_timeout(500)  # the upload completes before the click is queued
        page.click("#caption-button")
        page.wait_for_selector("#results tr.ok, #results tr.error", timeout=120_000)
        rows = page.locator("#results tr.ok, #results tr.error")
        out = [(rows.nth(i).get_attribute("class"), rows.nth(i).inner_text()) for i in range(rows.count())]
        captions = [t.inner_text() for t in page.locator("#results .caption").all()]
        if screenshot:
            page.screenshot(path=screenshot, full_page=True)
        return out, captions
    finally:
        page.close()


def test_browser_upload_shows_the_caption(server, browser, tmp_path):
    url, model = server
    photo = DEMO_DIR / "cat.jpg"
    expected = model.caption([str(photo)])[0]
    shot = os.environ.get("IMAGE_CAPTIONING_SCREENSHOT") or str(tmp_path / "page.png")
    rows, captions = _caption_in_page(browser, url, [photo], screenshot=shot)
    assert [cls for cls, _ in rows] == ["ok"] and "cat.jpg" in rows[0][1]
    assert _words(captions) == _words([expected]) and expected
    assert os.path.getsize(shot) > 10_000


def test_browser_shows_the_error_of_a_text_file(server, browser, tmp_path):
    url, model = server
    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is not an image\n")
    rows, captions = _caption_in_page(browser, url, [fake, DEMO_DIR / "rocket.jpg"])
    assert [cls for cls, _ in rows] == ["error", "ok"]  # the bad file is reported, the photo still captioned
    assert "holiday.jpg" in rows[0][1] and "not an image" in rows[0][1]
    assert _words(captions) == _words(model.caption([str(DEMO_DIR / "rocket.jpg")]))


def test_gradio_client_api(server):
    from gradio_client import Client, handle_file

    url, model = server
    client = Client(url, verbose=False)
    page = client.predict([handle_file(str(DEMO_DIR / "coffee.jpg"))], "", "beam", 3, 1.0, 0.9, 2, 67,
                          api_name="/caption")
    import html

    best = model.generate(model.encode_images([str(DEMO_DIR / "coffee.jpg")]), method="beam", beam_size=3,
                          num_captions=2)[0]
    for candidate in best:
        assert html.escape(candidate["text"]) in page
    assert page.count('class="caption"') == 2
