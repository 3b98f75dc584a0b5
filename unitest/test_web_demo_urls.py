"""The web demo's URL box faces strangers (`models.image_captioning.web_demo.Captioner`, ``main.py serve``).

Server paths (an image, ``/etc/passwd``, a missing file, a folder, ``file://``, relative paths) and loopback
URLs (a live server, a closed port) all get one and the same message and no thumbnail; the operator's
``--allow-private-urls`` opens loopback URLs (never paths); uploads are read as before; Gradio's analytics
stay off. The browser and Gradio-client tests of the page are in ``test_web_demo.py``.
"""

import os
import shutil
import socket
import time

import pytest

import main
from testing.tiny_models import DEMO_DIR
from unitest.http_helpers import QuietHandler, closed_port, running
from utils.safe_fetch import REFUSED

CAT = DEMO_DIR / "cat.jpg"


class _Handler(QuietHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.requests.append(self.path)
        if self.path == "/silent":  # headers, then nothing for 3 s
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.flush()
            time.sleep(3)
            return
        self.send_bytes(CAT.read_bytes())


@pytest.fixture
def server():
    with running(_Handler, requests=[]) as httpd:
        yield httpd


def _captioner(model, **kwargs):
    from models.image_captioning.web_demo import Captioner

    return Captioner(model, **kwargs)


def _refused(row):
    return row["error"] == REFUSED and "thumbnail" not in row and "candidates" not in row


def test_url_box_reads_no_server_path(tiny_clipcap, tmp_path, monkeypatch):
    photos = tmp_path / "srv" / "photos"
    photos.mkdir(parents=True)
    photo = photos / "x.jpg"
    shutil.copy(CAT, photo)
    monkeypatch.chdir(tmp_path)
    paths = [str(photo), "/etc/passwd", str(photos / "missing.jpg"), str(photos), f"file://{photo}",
             "file:///etc/passwd", os.path.join("srv", "photos", "x.jpg"), "srv/photos", "./srv/photos/x.jpg",
             "~/x.jpg", "ftp://127.0.0.1/x.jpg"]
    rows = _captioner(tiny_clipcap).caption([], "\n".join(paths))
    assert len(rows) == len(paths)
    assert all(_refused(row) for row in rows), [row["error"] for row in rows]
    # the page shows the message, never what the path held nor whether it exists
    from models.image_captioning.web_demo import _render

    page = _render(rows, 0.0)
    for leak in ("root:", "directory", "no such", "not an image", "regular file", "Errno"):
        assert leak not in page


def test_url_box_refuses_loopback_unless_the_operator_allows_it(tiny_clipcap, server):
    port = server.server_address[1]
    closed = f"http://127.0.0.1:{closed_port()}/cat.jpg"
    local = [f"http://127.0.0.1:{port}/cat.jpg", f"http://localhost:{port}/cat.jpg", f"http://[::1]:{port}/cat.jpg",
             f"http://[::ffff:127.0.0.1]:{port}/cat.jpg", f"http://2130706433:{port}/cat.jpg",
             f"http://0x7f.1:{port}/cat.jpg", f"http://0.0.0.0:{port}/cat.jpg", closed]
    rows = _captioner(tiny_clipcap).caption([], "\n".join(local))
    assert all(_refused(row) for row in rows), [row["error"] for row in rows]
    assert server.requests == []  # nothing was even asked

    # one request (one decode): an upload, the same photo by a loopback URL, a closed port, a path
    upload, fetched, *others = _captioner(tiny_clipcap, allow_private_urls=True).caption(
        [str(CAT)], f"{local[0]}\n{closed}\n/etc/passwd")
    assert upload["error"] is None and upload["thumbnail"] and upload["candidates"][0]["text"]  # uploads are read
    assert fetched["error"] is None and fetched["thumbnail"] == upload["thumbnail"]
    assert [c["text"] for c in fetched["candidates"]] == [c["text"] for c in upload["candidates"]]
    assert [c["score"] for c in fetched["candidates"]] == pytest.approx([c["score"] for c in upload["candidates"]])
    assert all(_refused(row) for row in others)  # a closed port reads as a refusal; paths stay refused
    assert server.requests == ["/cat.jpg"]


def test_launched_demo_sends_no_analytics_and_takes_no_server_path(tiny_clipcap, monkeypatch):
    gradio = pytest.importorskip("gradio")
    import httpx

    from models.image_captioning import web_demo

    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    calls, files_seen, lookups = [], [], []
    for name in ("version_check", "initiated_analytics", "launched_analytics", "_do_analytics_request"):
        monkeypatch.setattr(gradio.analytics, name, lambda *a, _n=name, **k: calls.append(_n))
    getaddrinfo = socket.getaddrinfo  # and no name is looked up but this machine's: nothing leaves it
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: lookups.append(host) or getaddrinfo(host, *a, **k))
    caption = web_demo.Captioner.caption
    monkeypatch.setattr(web_demo.Captioner, "caption",
                        lambda self, files, *a, **k: files_seen.append(files) or caption(self, files, *a, **k))
    demo = web_demo.build_demo(tiny_clipcap)
    port = closed_port()
    try:
        assert demo.analytics_enabled is False and os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
        demo.queue(default_concurrency_limit=1)
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        # the upload box through the API: a server path instead of an upload is Gradio's to refuse
        api = f"http://127.0.0.1:{port}/gradio_api/call/caption"
        event = httpx.post(api, json={"data": [[{"path": str(CAT), "meta": {"_type": "gradio.FileData"}}], "",
                                               "greedy", 3, 1.0, 0.9, 1, 67]}).json()["event_id"]
        answer = httpx.get(f"{api}/{event}", timeout=60).text
    finally:
        demo.close()
    assert calls == []
    assert set(lookups) <= {"127.0.0.1", "localhost", None}, lookups
    assert files_seen == [] and "event: error" in answer and "caption" not in answer


def test_serve_flag_reaches_the_demo(tiny_model_dir, monkeypatch):
    pytest.importorskip("gradio")
    from models.image_captioning import web_demo

    seen = []
    monkeypatch.setattr(web_demo, "serve", lambda model, **kwargs: seen.append(kwargs["allow_private_urls"]))
    assert main.main(["serve", "--model", str(tiny_model_dir)]) == 0
    assert main.main(["serve", "--model", str(tiny_model_dir), "--allow-private-urls"]) == 0
    assert seen == [False, True]


def test_one_request_fetches_its_urls_within_one_budget(tiny_clipcap, server):
    port = server.server_address[1]
    captioner = _captioner(tiny_clipcap, allow_private_urls=True, url_budget_s=0.6)
    start = time.monotonic()
    rows = captioner.caption([], "\n".join([f"http://127.0.0.1:{port}/silent"] * 4))
    assert time.monotonic() - start < 1.5  # not 4 x 3 s, nor 4 x 0.6 s
    assert all(_refused(row) for row in rows)


def _peak_bytes(call):
    """(what ``call()`` returned or raised, the most bytes Python held at once during it)."""
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            result = call()
        except ValueError as e:
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_url_box_is_bounded_before_it_is_split():
    """A huge URL text is refused from its length, and too many URLs from a split that stops one past the
    limit: nothing is built per URL beyond ``max_images`` (before the fix: a list and a closure per word, 1.7 GB
    and 16 s of the only worker for 9.5 MB of ``"a "``)."""
    from models.image_captioning.web_demo import MAX_URL_TEXT

    captioner = _captioner(None, max_images=16)
    huge = "a " * 5_000_000
    error, peak = _peak_bytes(lambda: captioner._read([], huge))
    assert isinstance(error, ValueError) and f"more than {MAX_URL_TEXT}" in str(error)
    assert peak < 100_000
    many = "a " * (MAX_URL_TEXT // 2 - 1)  # within the length, far more URLs than allowed
    error, peak = _peak_bytes(lambda: captioner._read([], many))
    assert isinstance(error, ValueError) and "at most 16 images per request" in str(error)
    assert peak < 2 * len(many) + 50_000  # the one-past-the-limit remainder, not 32767 words and closures
    error, _ = _peak_bytes(lambda: captioner._read([str(CAT)] * 10, "a " * 7))  # files and URLs together
    assert isinstance(error, ValueError) and "at most 16 images per request" in str(error)


def test_refused_uploads_note_is_read_up_to_the_limit():
    """The hidden note of uploads the browser refused is read one line at a time up to ``limit`` names
    (before the fix: split into a list of every line first)."""
    from models.image_captioning.web_demo import _refused_rows

    note = "big.jpg (30.0 MiB)\n\n" * 500_000
    rows, peak = _peak_bytes(lambda: _refused_rows(note, 20 << 20, 16))
    assert [row["name"] for row in rows] == ["big.jpg (30.0 MiB)"] * 16
    assert peak < 1_000_000
