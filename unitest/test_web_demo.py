"""The Gradio web demo (`models.image_captioning.web_demo`, ``main.py serve``), driven in a real browser.

One server for the module (a tiny random model, on 127.0.0.1 and a free port), a headless Chromium through
Playwright (Debian's ``chromium`` package: Playwright's own browser download does not run on these
machines; ``apt-get install chromium``, or ``python -m playwright install chromium`` elsewhere), and
Gradio's own client against the same server. Set ``IMAGE_CAPTIONING_SCREENSHOT=demo/web_demo.png`` to save
the page as README shows it.
"""

import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from testing.tiny_models import DEMO_DIR, ROOT, build_tiny_clipcap, shared_tiny_files

CHROMIUM = os.environ.get("IMAGE_CAPTIONING_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytest.importorskip("gradio")
playwright_api = pytest.importorskip("playwright.sync_api")


#: the server's upload limit (small, so that a test file over it is quick to write)
UPLOAD_LIMIT = 2**20


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
    demo = build_demo(model, max_file_bytes=UPLOAD_LIMIT)
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                max_file_size=UPLOAD_LIMIT)
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
    """The /caption API returns the page and the results as data (captions, scores, errors)."""
    from gradio_client import Client, handle_file

    url, model = server
    client = Client(url, verbose=False)
    page, data = client.predict([handle_file(str(DEMO_DIR / "coffee.jpg"))], "", "beam", 3, 1.0, 0.9, 2, 67,
                                api_name="/caption")
    import html

    best = model.generate(model.encode_images([str(DEMO_DIR / "coffee.jpg")]), method="beam", beam_size=3,
                          num_captions=2)[0]
    for candidate in best:
        assert html.escape(candidate["text"]) in page
    assert page.count('class="caption"') == 2
    assert data["errors"] == 0 and [r["name"] for r in data["results"]] == ["coffee.jpg"]
    assert data["results"][0]["captions"] == [c["text"] for c in best]
    assert data["results"][0]["scores"] == pytest.approx([float(c["score"]) for c in best], abs=1e-4)


def test_api_data_reports_errors(server, tmp_path):
    from gradio_client import Client, handle_file

    url, _ = server
    fake = tmp_path / "notes.jpg"
    fake.write_text("not an image")
    _, data = Client(url, verbose=False).predict([handle_file(str(fake))], "", "greedy", 5, 1.0, 0.9, 1, 10,
                                                 api_name="/caption")
    assert data["errors"] == 1 and data["results"][0]["captions"] == []
    assert "not an image" in data["results"][0]["error"]


def _visible(page, elem_id):
    return page.locator(f"#{elem_id}").is_visible()


def test_decoding_controls_follow_the_method(server, browser):
    url, _ = server
    page = browser.new_page()
    try:
        page.goto(url)
        page.wait_for_selector("#caption-button")
        controls = ("beam-size", "temperature", "top-p", "num-captions")
        assert [_visible(page, c) for c in controls] == [False] * 4  # greedy: none
        page.get_by_label("beam", exact=True).check()
        page.wait_for_selector("#beam-size", state="visible")
        assert [_visible(page, c) for c in controls] == [True, True, False, True]  # beam takes a temperature
        page.get_by_label("sample", exact=True).check()
        page.wait_for_selector("#top-p", state="visible")  # sample's own control (beam's temperature stays)
        page.wait_for_selector("#beam-size", state="hidden")
        assert [_visible(page, c) for c in controls] == [False, True, True, True]
    finally:
        page.close()


def test_header_describes_the_model_in_words_and_the_picker_offers_images(server, browser):
    url, model = server
    page = browser.new_page()
    try:
        page.goto(url)
        header = page.locator("#header").inner_text()
        assert "ClipCap(" not in header and "tiny_demo" in header
        assert "CLIP" in header and "MLP mapper (4 prefix tokens)" in header and "GPT-2 (2 layers, width 64" in header
        accept = page.locator("#images input[type=file]").get_attribute("accept") or ""
        assert "image" in accept
    finally:
        page.close()


def test_long_names_and_captions_wrap_inside_the_page(server, browser, tmp_path):
    """A long unbroken file name (as a long caption) wraps: the results table is no wider than its column."""
    url, _ = server
    long_name = tmp_path / ("a" * 180 + ".jpg")
    shutil.copy(DEMO_DIR / "cat.jpg", long_name)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(url)
        page.set_input_files("#images input[type=file]", [str(long_name)])
        page.wait_for_timeout(500)
        page.click("#caption-button")
        page.wait_for_selector("#results tr.ok", timeout=120_000)
        table = page.locator("#results table").bounding_box()
        column = page.locator("#output").bounding_box()
        assert table["x"] + table["width"] <= column["x"] + column["width"] + 1, (table, column)
    finally:
        page.close()


def test_refused_upload_is_reported(server, browser, tmp_path):
    """A file over the upload limit is refused by the browser; the results then say so, by name."""
    url, _ = server
    big = tmp_path / "huge_photo.jpg"
    big.write_bytes(b"\xff" * (UPLOAD_LIMIT + 1000))
    page = browser.new_page()
    try:
        page.goto(url)
        page.wait_for_selector("#caption-button")
        page.wait_for_timeout(300)  # the page's load script has run
        page.set_input_files("#images input[type=file]", [str(big)])
        page.wait_for_timeout(500)
        page.click("#caption-button")
        page.wait_for_selector("#results tr.error", timeout=60_000)
        text = page.locator("#results").inner_text()
        assert "huge_photo.jpg" in text and "not uploaded" in text and "1 MiB" in text
        assert "drop or upload images" not in text
    finally:
        page.close()


def test_one_log_line_per_request(server, caplog):
    from gradio_client import Client, handle_file

    url, _ = server
    caplog.set_level(logging.INFO, logger="models.image_captioning.web_demo")
    Client(url, verbose=False).predict([handle_file(str(DEMO_DIR / "cat.jpg"))], "", "greedy", 5, 1.0, 0.9, 1, 10,
                                       api_name="/caption")
    lines = [r.getMessage() for r in caplog.records if r.name == "models.image_captioning.web_demo"]
    assert len(lines) == 1 and lines[0].startswith("caption request: 1 image(s), greedy, ")
    assert lines[0].endswith(", 0 error(s)")


def test_serve_prints_only_its_own_line(tmp_path_factory, tmp_path):
    """``main.py serve`` at the default verbosity: no TensorFlow lines, no Gradio share hint, one line of ours."""
    from testing.tiny_models import shared_tiny_model

    model = str(shared_tiny_model(tmp_path_factory))
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_XLA_FLAGS",
                                                             "IMAGE_CAPTIONING_XLA_CACHE_DIR")}
    env.update(IMAGE_CAPTIONING_HOME=str(tmp_path / "home"), IMAGE_CAPTIONING_OFFLINE="1")
    port = _free_port()
    process = subprocess.Popen([sys.executable, "main.py", "serve", "--model", model, "--port", str(port)], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()  # blocks until the server is up (or the process ended)
        time.sleep(1)
    finally:
        process.terminate()
        out, err = process.communicate(timeout=60)
    assert first == f"serving tiny on http://127.0.0.1:{port}/ (Ctrl-C to stop)\n", (first, err)
    assert "share=True" not in out + err and "absl" not in err and "oneDNN" not in err
    assert err.strip() == "", err
