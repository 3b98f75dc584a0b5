"""Images from http(s) URLs (`utils.image_io.read_url`) and from list files (``caption --from-file``), against
a loopback HTTP server on 127.0.0.1 (no network): a good image, a 404, an oversized body (announced or not),
a server that goes silent, endless ``100 Continue`` answers, headers dripped a byte at a time, a body shorter
than announced, a redirect to another scheme; each bad URL fails alone."""

import socket
import threading
import time
from pathlib import Path

import pytest

import main
from testing import tiny_models
from unitest.http_helpers import QuietHandler, running
from utils.image_io import ImageReadError, expand_paths, read_image, read_url

ROOT = Path(__file__).resolve().parents[1]
CAT = (ROOT / "demo" / "cat.jpg").read_bytes()
HUNG_UP = []  # the paths of the slow answers whose client hung up before the end


class _Handler(QuietHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/cat.jpg":
            self.send_bytes(CAT)
        elif self.path == "/big-announced":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif self.path == "/big-unannounced":  # no Content-Length: the body runs until the connection closes
            self.send_response(200)
            self.end_headers()
            self.close_connection = True
            for _ in range(100):
                self.wfile.write(b"x" * 10_000)
        elif self.path == "/silent":
            self.send_silence()
        elif self.path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif self.path == "/empty":
            self.send_bytes(b"")
        elif self.path == "/continue-flood":  # interim answers for 5 s (before the fix: read for ever), then the cat
            self._slowly([b"HTTP/1.1 100 Continue\r\n\r\n"] * 500, 0.01, b"HTTP/1.1 200 OK\r\n")
        elif self.path == "/drip-headers":  # the status line and a header a byte every 0.1 s (5 s), then the cat
            head = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 30 + b"\r\n"
            self._slowly([head[i : i + 1] for i in range(len(head))], 0.1, b"")
        elif self.path == "/short-body":  # announces 1000 bytes, sends 10, closes
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.close_connection = True
        else:
            self.send_error(404)

    def _slowly(self, pieces, pause, status):
        """``pieces`` ``pause`` s apart, then ``status`` and the cat with its length (unless the client hung up)."""
        try:
            for piece in pieces:
                self.wfile.write(piece)
                time.sleep(pause)
            self.wfile.write(status + b"Content-Length: %d\r\n\r\n" % len(CAT) + CAT)
        except OSError:  # the client hung up
            HUNG_UP.append(self.path)
        self.close_connection = True


@pytest.fixture(scope="module")
def server():
    with running(_Handler) as httpd:
        yield f"http://127.0.0.1:{httpd.port}"


def test_read_url(server):
    assert read_url(f"{server}/cat.jpg") == CAT
    image = read_image(f"{server}/cat.jpg")
    assert image.size == read_image(ROOT / "demo" / "cat.jpg").size
    cases = {"/missing.jpg": "HTTP error 404", "/big-announced": "exceeds the limit of 100000 bytes",
             "/big-unannounced": "more than 100000 bytes", "/to-file": "file:///etc/passwd. is not allowed", "/empty": "empty response"}
    for path, message in cases.items():
        with pytest.raises(ImageReadError, match=message):
            read_url(f"{server}{path}", max_bytes=100_000)
    start = time.monotonic()
    with pytest.raises(ImageReadError, match="cannot download|not downloaded within"):
        read_url(f"{server}/silent", timeout=0.5)
    assert time.monotonic() - start < 2.5
    for url in ("ftp://example.com/a.jpg", "file:///etc/passwd"):
        with pytest.raises(ImageReadError, match="unsupported URL scheme"):
            read_image(url)
    assert expand_paths([f"{server}/cat.jpg"]) == [(f"{server}/cat.jpg", None)]


@pytest.mark.parametrize("path", ["/continue-flood", "/drip-headers"])
def test_read_url_deadline_covers_status_line_and_headers(server, path):
    """``timeout`` bounds the whole transfer: endless ``100 Continue`` answers or headers sent a byte at a time
    (each byte well within the socket's timeout) end at the deadline, not when the server stops."""
    start = time.monotonic()
    with pytest.raises(ImageReadError, match="not downloaded within 1 s"):
        read_url(f"{server}{path}", timeout=1)
    assert time.monotonic() - start < 2.5


def test_read_url_deadline_covers_the_name_lookup(server, monkeypatch):
    """``getaddrinfo`` has no timeout of its own: a host whose DNS server never answers held ``caption`` for
    what the system resolver allowed; the lookup is now inside ``timeout`` too."""
    answer, lookup = threading.Event(), socket.getaddrinfo

    def hung(host, *args, **kwargs):  # the name's server never answers (until the test ends)
        if host == "hung.test":
            answer.wait(30)
            host = "127.0.0.1"
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hung)
    port = server.rsplit(":", 1)[1]
    start = time.monotonic()
    try:
        with pytest.raises(ImageReadError, match="not downloaded within 1 s"):
            read_url(f"http://hung.test:{port}/cat.jpg", timeout=1)
        assert time.monotonic() - start < 2.5
    finally:
        answer.set()
    assert read_url(f"{server}/cat.jpg", timeout=5) == CAT


def test_read_url_refuses_a_body_cut_short(server):
    with pytest.raises(ImageReadError, match="connection closed 990 bytes before the announced end"):
        read_url(f"{server}/short-body")


def test_caption_url_that_never_ends_its_headers_fails_alone(server, tmp_path_factory, tmp_path, monkeypatch,
                                                              capsys):
    """``caption <endless interim answers> <good URL>``: the first fails at the deadline, the second is
    captioned (before the fix the run waited on the first for as long as the server kept answering)."""
    from utils import image_io

    monkeypatch.setattr(image_io.read_url, "__defaults__", (image_io.DEFAULT_MAX_BYTES, 1.0))  # a 1 s deadline
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))
    model = str(tiny_models.shared_tiny_model(tmp_path_factory))
    HUNG_UP.clear()
    code = main.main(["caption", f"{server}/continue-flood", f"{server}/cat.jpg", "--model", model,
                      "--output-dir", str(tmp_path / "out"), "--max-length", "4", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [f"{server}/cat.jpg"]
    assert f"{server}/continue-flood: not downloaded within 1 s" in err
    for _ in range(100):  # the server sees the hang-up at its next write (before the fix: read to the flood's end)
        if "/continue-flood" in HUNG_UP:  # (an earlier test's slow answer may note its own hang-up meanwhile)
            break
        time.sleep(0.02)
    assert "/continue-flood" in HUNG_UP


def test_caption_urls_and_list_file(server, tmp_path_factory, tmp_path, monkeypatch, capsys):
    """URLs on the command line and in a --from-file list: a failed URL fails alone; URL results are not
    written to map.json."""
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(tmp_path / "home"))
    model = str(tiny_models.shared_tiny_model(tmp_path_factory))
    listing = tmp_path / "list.txt"
    listing.write_text(f"# images\n{server}/missing.jpg\n\n{ROOT / 'demo' / 'rocket.jpg'}\n")
    code = main.main(["caption", f"{server}/cat.jpg", "--from-file", str(listing), "--model", model,
                      "--output-dir", str(tmp_path / "out"), "--max-length", "4", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [f"{server}/cat.jpg", str(ROOT / "demo" / "rocket.jpg")]
    assert f"error: {server}/missing.jpg: HTTP error 404" in err and "1 of 3 inputs" in err
    stored = (tmp_path / "out" / "map.json").read_text()
    assert "rocket.jpg" in stored and server not in stored
    # a list that cannot be read, or lists nothing: usage errors before any model is loaded
    assert main.main(["caption", "--from-file", str(tmp_path / "none.txt"), "--model", model]) == 2
    (tmp_path / "comments.txt").write_text("# nothing\n\n")
    assert main.main(["caption", "--from-file", str(tmp_path / "comments.txt"), "--model", model]) == 2
    assert "no images listed" in capsys.readouterr().err
