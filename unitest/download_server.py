"""A loopback HTTP server (127.0.0.1) and the tiny official-format files it serves, for the download tests.

The server's knobs reproduce what real servers do wrong: no Range support, no Content-Length, a chunked body
cut short, a reset connection, a silence past the client's timeout, a slow answer (for concurrent fetches).
Importing the fixtures (`server`, `clean_env`, `tiny_files`) into a test module makes them that module's.
"""

import hashlib
import http.server
import io
import socket
import struct
import threading
import time
import urllib.parse

import pytest
import torch

from models.image_captioning.presets import ModelSpec
from testing import tiny_models
from utils import downloads, model_store
from utils.downloads import Source


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        name = urllib.parse.unquote(self.path.lstrip("/"))
        server.requests.append((name, self.headers.get("Range")))
        data = server.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        range_header = self.headers.get("Range")
        if range_header and server.support_range:
            start = int(range_header.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            status = 206
        body = data[start:]
        if server.delay:
            time.sleep(server.delay)
        self.send_response(status)
        if server.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif not server.no_length:
            self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if server.chunked:  # chunks of 1000 bytes; with cut_after, the connection drops mid-body
            payload = body if server.cut_after is None else body[: server.cut_after]
            for i in range(0, len(payload), 1000):
                piece = payload[i : i + 1000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            if server.cut_after is None:
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                server.cut_after = None
            return
        if server.reset_after is not None:  # a part, then a TCP reset (RST)
            self.wfile.write(body[: server.reset_after])
            self.wfile.flush()
            time.sleep(0.1)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.wfile = io.BytesIO()  # the handler's own flush/close at the end must not fail
            server.reset_after = None
            return
        if server.hang_after is not None:  # a part, then silence (the client's timeout must end it)
            self.wfile.write(body[: server.hang_after])
            self.wfile.flush()
            server.hang_after = None
            server.hang.wait(10)
            return
        if server.cut_after is not None:  # announce everything, send a part, hang up
            self.wfile.write(body[: server.cut_after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            server.cut_after = None
            return
        self.wfile.write(body)

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        """The hub's file metadata (what huggingface_hub reads before a download): the repository's commit, the
        file's ETag and length, for the files served under ``<repo>/resolve/<revision>/``."""
        server = self.server
        name = urllib.parse.unquote(self.path.lstrip("/"))
        server.heads.append(name)
        data = server.files.get(name)
        if data is None or "/resolve/" not in name:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.heads, httpd.support_range, httpd.cut_after = {}, [], [], True, None
    httpd.chunked = httpd.no_length = False
    httpd.reset_after = httpd.hang_after = None
    httpd.delay, httpd.hang = 0, threading.Event()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True, name="test-http")
    thread.start()
    yield httpd
    httpd.hang.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv(downloads.MIRROR_ENV, raising=False)
    monkeypatch.delenv(downloads.OFFLINE_ENV, raising=False)
    monkeypatch.setenv(model_store.HOME_ENV, str(tmp_path / "home"))


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return tiny_models.shared_tiny_files(tmp_path_factory)


def torch_bytes(n=2000, seed=0):
    buf = io.BytesIO()
    torch.save({"w": torch.randn(n, generator=torch.Generator().manual_seed(seed))}, buf)
    return buf.getvalue()


def sha(data):
    return hashlib.sha256(data).hexdigest()


def served_source(server, data, name="weights.pt", with_sha=True):
    server.files[name] = data
    return Source(name, url=f"{server.base}/{name}", sha256=sha(data) if with_sha else None, kind="torch")


def cached_files(root):
    """The files in the download cache, without the lock files (left in place by design) and the manifest."""
    return sorted(p.name for p in (root / "downloads").iterdir()
                  if p.suffix != ".lock" and p.name != "manifest.json")


def leftovers(root):
    return sorted(p.name for p in (root / "downloads").iterdir() if p.suffix in (".part", ".gdown"))


def serve_tiny(server, tiny_files, corrupt_checkpoint=False):
    checkpoint = tiny_files["checkpoint"].read_bytes()
    clip = tiny_files["clip"].read_bytes()
    server.files.update({
        "tiny_clipcap.pt": checkpoint[: len(checkpoint) // 2] if corrupt_checkpoint else checkpoint,
        "tiny_clip.pt": clip,
        "gpt2-vocab.json": (tiny_files["tokenizer"] / "vocab.json").read_bytes(),
        "gpt2-merges.txt": (tiny_files["tokenizer"] / "merges.txt").read_bytes(),
    })
    # origins that cannot be reached: only the mirror serves them
    return ModelSpec("tiny", Source("tiny_clipcap.pt", drive_id="not-a-real-drive-id", kind="torch"),
                     clip=Source("tiny_clip.pt", url="https://example.invalid/clip/tiny_clip.pt",
                                 sha256=sha(clip), kind="torch"))
