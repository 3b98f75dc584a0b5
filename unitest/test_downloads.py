"""utils/downloads.py against a local HTTP server on 127.0.0.1 (no network).

The server serves tiny checkpoints in the official formats. Covered: download -> verify -> convert ->
caption; a corrupted download detected and deleted; an HTML page instead of a checkpoint; resumable partial
downloads (HTTP Range) and a server that ignores Range; the offline error; an unreachable server; the mirror
variable, which also replaces Google Drive. gdown itself cannot be exercised offline against Google Drive:
the Drive-hosted official checkpoints are tested through the mirror path only.
"""

import hashlib
import http.server
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import torch

from unitest import tiny_models
from utils import downloads
from utils.downloads import DownloadError, ModelSpec, OfflineError, Source


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

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.support_range, httpd.cut_after = {}, [], True, None
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
    monkeypatch.setenv(downloads.HOME_ENV, str(tmp_path / "home"))


def _torch_bytes(n=2000, seed=0):
    buf = io.BytesIO()
    torch.save({"w": torch.randn(n, generator=torch.Generator().manual_seed(seed))}, buf)
    return buf.getvalue()


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def _source(server, data, name="weights.pt", with_sha=True):
    server.files[name] = data
    return Source(name, url=f"{server.base}/{name}", sha256=_sha(data) if with_sha else None, kind="torch")


def _files(root):
    """The files in the download cache, without the lock files (left in place by design) and the manifest."""
    return sorted(p.name for p in (root / "downloads").iterdir()
                  if p.suffix != ".lock" and p.name != "manifest.json")


def _leftovers(root):
    return sorted(p.name for p in (root / "downloads").iterdir() if p.suffix in (".part", ".gdown"))


def test_download_verified_and_atomic(server, tmp_path):
    data = _torch_bytes()
    path = downloads.fetch(_source(server, data), root=tmp_path, progress=False)
    assert path == tmp_path / "downloads" / "weights.pt" and path.read_bytes() == data
    assert _leftovers(tmp_path) == []
    downloads.fetch(_source(server, data), root=tmp_path, progress=False)  # cached: no second request
    assert len(server.requests) == 1


def test_corrupted_download_detected_and_not_kept(server, tmp_path):
    data = _torch_bytes()
    source = _source(server, data)
    server.files["weights.pt"] = data[:100] + bytes([data[100] ^ 1]) + data[101:]
    with pytest.raises(DownloadError, match="SHA-256 mismatch.*deleted"):
        downloads.fetch(source, root=tmp_path, progress=False)
    assert not (tmp_path / "downloads" / "weights.pt").exists() and _leftovers(tmp_path) == []


def test_html_page_instead_of_checkpoint_not_kept(server, tmp_path):
    source = _source(server, b"<!DOCTYPE html><html>Google Drive - quota exceeded</html>", with_sha=False)
    with pytest.raises(DownloadError, match="HTML page"):
        downloads.fetch(source, root=tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_interrupted_download_resumes_with_range(server, tmp_path):
    data = _torch_bytes(20000)
    source = _source(server, data)
    server.cut_after = 30000
    with pytest.raises(DownloadError, match="run again to resume"):
        downloads.fetch(source, root=tmp_path, progress=False)
    part = tmp_path / "downloads" / "weights.pt.part"
    assert part.stat().st_size == 30000 and not (tmp_path / "downloads" / "weights.pt").exists()
    path = downloads.fetch(source, root=tmp_path, progress=False)
    assert path.read_bytes() == data and not part.exists()
    assert server.requests[-1] == ("weights.pt", "bytes=30000-")


def test_server_ignoring_range_restarts(server, tmp_path):
    data = _torch_bytes()
    source = _source(server, data)
    server.support_range = False
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "weights.pt.part").write_bytes(b"garbage that is not a prefix")
    assert downloads.fetch(source, root=tmp_path, progress=False).read_bytes() == data


def test_complete_partial_file_is_verified(server, tmp_path):
    data = _torch_bytes()
    source = _source(server, data)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "weights.pt.part").write_bytes(data)  # server answers 416: nothing left
    assert downloads.fetch(source, root=tmp_path, progress=False).read_bytes() == data


def test_offline_error_names_file_and_place(server, tmp_path, monkeypatch):
    monkeypatch.setenv(downloads.OFFLINE_ENV, "1")
    with pytest.raises(OfflineError) as info:
        downloads.fetch(downloads.MODELS["coco"].checkpoint, root=tmp_path, progress=False)
    message = str(info.value)
    assert "IMAGE_CAPTIONING_OFFLINE=1" in message
    assert "1IdaBtMSvtyzF0ByVaBHtvM0JYSXRExRX" in message
    assert str(tmp_path / "downloads" / "coco_weights.pt") in message
    with pytest.raises(OfflineError, match="ViT-B-32.pt"):
        downloads.fetch_clip("ViT-B/32", root=tmp_path, progress=False)
    # a whole model: every missing file in one message, the tokenizer's too (with an empty HF cache)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    with pytest.raises(OfflineError) as info:
        downloads.get_pretrained("coco_transformer", root=tmp_path, progress=False)
    message = str(info.value)
    for path in ("coco_transformer_weights.pt", "RN50x4.pt", "gpt2-tokenizer"):
        assert str(tmp_path / "downloads" / path) in message
    for local in ("vocab.json", "merges.txt"):  # both tokenizer files, each with its place
        assert str(tmp_path / "downloads" / "gpt2-tokenizer" / local) in message
    assert server.requests == []


def test_unreachable_server_is_an_offline_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = Source("x.pt", url=f"http://127.0.0.1:{port}/x.pt")
    with pytest.raises(OfflineError, match=f"place it at {tmp_path / 'downloads' / 'x.pt'}"):
        downloads.fetch(source, root=tmp_path, progress=False)


def test_http_error_is_reported(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        downloads.fetch(Source("absent.pt", url=f"{server.base}/absent.pt"), root=tmp_path, progress=False)


def test_mirror_replaces_every_origin_including_google_drive(server, tmp_path, monkeypatch):
    monkeypatch.setenv(downloads.MIRROR_ENV, server.base + "/models/")
    data = _torch_bytes()
    server.files["models/coco_weights.pt"] = data
    path = downloads.fetch(downloads.MODELS["coco"].checkpoint, root=tmp_path, progress=False)
    assert path.read_bytes() == data and server.requests == [("models/coco_weights.pt", None)]
    # an OpenAI URL is replaced too, and its checksum still verified: the real SHA-256 rejects our tiny file
    server.files["models/ViT-B-32.pt"] = data
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        downloads.fetch_clip("ViT-B/32", root=tmp_path, progress=False)
    assert server.requests[-1] == ("models/ViT-B-32.pt", None)
    assert not (tmp_path / "downloads" / "ViT-B-32.pt").exists()


def test_names_and_listing(tmp_path):
    assert downloads.resolve_model("coco_transformer").clip == "RN50x4"
    with pytest.raises(KeyError, match="known ClipCap models: coco, conceptual, coco_transformer"):
        downloads.resolve_model("cocoa")
    text = "\n".join(downloads.describe_sources(tmp_path))
    for needle in ("coco_weights.pt", "conceptual_weights.pt", "coco_transformer_weights.pt", "RN50x4.pt",
                   "gpt2-vocab.json", "14pXWwB4Zm82rsDdvbGguLfx9F8aM7ovT", "1GYPToCqFREwi285wPLhuVExlz7DDUDfJ",
                   "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af (pinned)",
                   "no published SHA-256: size and SHA-256 are recorded at its first download"):
        assert needle in text


# ------------------------------------------------------------------------- download -> convert -> caption


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return tiny_models.shared_tiny_files(tmp_path_factory)


def _serve_tiny(server, tiny_files, corrupt_checkpoint=False):
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
                                 sha256=_sha(clip), kind="torch"))


def test_download_convert_caption_then_reuse(server, tiny_files, tmp_path, monkeypatch):
    monkeypatch.setenv(downloads.MIRROR_ENV, server.base)
    spec = _serve_tiny(server, tiny_files)
    model = downloads.get_pretrained(spec, root=tmp_path, progress=False)
    assert sorted(name for name, _ in server.requests) == sorted(server.files)
    assert downloads.is_saved_model(tmp_path / "tiny") and model.name == "tiny"
    captions = model.caption([str(tiny_models.DEMO_DIR / "cat.jpg")], max_length=8)
    assert isinstance(captions[0], str) and captions[0]
    # converted once: the next call loads the saved model, no download, no torch conversion
    server.requests.clear()
    again = downloads.get_pretrained(spec, root=tmp_path, progress=False)
    assert server.requests == []
    assert again.caption([str(tiny_models.DEMO_DIR / "cat.jpg")], max_length=8) == captions


def test_truncated_checkpoint_fails_at_conversion_and_is_deleted(server, tiny_files, tmp_path, monkeypatch):
    from utils.convert.common import CheckpointError

    monkeypatch.setenv(downloads.MIRROR_ENV, server.base)
    spec = _serve_tiny(server, tiny_files, corrupt_checkpoint=True)
    with pytest.raises(CheckpointError, match="was deleted"):
        downloads.get_pretrained(spec, root=tmp_path, progress=False)
    assert not (tmp_path / "downloads" / "tiny_clipcap.pt").exists()
    assert not (tmp_path / "tiny").exists() and not list(tmp_path.glob(".tiny.*"))


def test_names_resolve_in_clip_and_clipcap_entry_points(server, tiny_files, tmp_path, monkeypatch):
    """`CLIP.from_pretrained(<CLIP name>)` and `ClipCap.load(<official name>)` download on first use."""
    from models.image_captioning import ClipCap
    from models.siamese.clip import CLIP

    monkeypatch.setenv(downloads.MIRROR_ENV, server.base)
    spec = _serve_tiny(server, tiny_files)
    monkeypatch.setitem(downloads.CLIP_SOURCES, "tiny-clip", spec.clip)
    monkeypatch.setitem(downloads.MODELS, "tiny", spec)
    clip = CLIP.from_pretrained("tiny-clip", visual_only=True)
    assert clip.embed_dim == tiny_models.EMBED_DIM
    assert (tmp_path / "home" / "downloads" / "tiny_clip.pt").is_file()
    model = ClipCap.load("tiny")  # downloaded, converted, saved in the store
    assert model.name == "tiny" and downloads.is_saved_model(tmp_path / "home" / "tiny")
    server.requests.clear()
    again = ClipCap.load("tiny")  # now simply loaded
    assert server.requests == []
    image = [str(tiny_models.DEMO_DIR / "cat.jpg")]
    assert again.caption(image, max_length=8) == model.caption(image, max_length=8)
    with pytest.raises(FileNotFoundError, match="nor an OpenAI CLIP name"):
        CLIP.from_pretrained("ViT-B/33")


# ------------------------------------------------------------------ downloads that cannot be proven whole

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("failure", ["chunked_cut", "reset", "timeout"])
def test_transport_errors_are_download_errors_that_keep_the_part(failure, server, tmp_path, monkeypatch):
    """A chunked body cut short (http.client.IncompleteRead, not an OSError), a reset connection and a silent
    server all end in DownloadError; the received bytes stay in the .part and the next call resumes them."""
    data = _torch_bytes(20000)
    source = _source(server, data)
    monkeypatch.setattr(downloads, "_TIMEOUT_S", 0.5)
    if failure == "chunked_cut":
        server.chunked, server.cut_after = True, 30000
    elif failure == "reset":
        server.reset_after = 30000
    else:
        server.hang_after = 30000
    with pytest.raises(DownloadError, match="run again to resume"):
        downloads.fetch(source, root=tmp_path, progress=False)
    part = tmp_path / "downloads" / "weights.pt.part"
    received = part.stat().st_size
    assert 0 < received <= 30000 and _files(tmp_path) == ["weights.pt.part"]
    server.chunked = False
    assert downloads.fetch(source, root=tmp_path, progress=False).read_bytes() == data
    assert server.requests[-1] == ("weights.pt", f"bytes={received}-")
    assert _files(tmp_path) == ["weights.pt"]


def test_cli_download_cut_mid_file_exits_3_and_resumes(server, tmp_path):
    """`main.py download coco` from a mirror whose chunked response drops mid-file: exit 3, no traceback,
    the .part kept; the next run resumes it (and then refuses the tiny file, which is not the COCO model)."""
    server.files["coco_weights.pt"] = data = _torch_bytes(20000)
    server.chunked, server.cut_after = True, 30000
    env = dict(os.environ, IMAGE_CAPTIONING_HOME=str(tmp_path / "home"), IMAGE_CAPTIONING_MIRROR=server.base)
    env.pop(downloads.OFFLINE_ENV, None)
    run = subprocess.run([sys.executable, "main.py", "download", "coco", "--no-convert"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stderr
    assert "Traceback" not in run.stderr and "IncompleteRead" in run.stderr and "run again to resume" in run.stderr
    part = tmp_path / "home" / "downloads" / "coco_weights.pt.part"
    assert part.stat().st_size == 30000
    server.chunked = False
    run = subprocess.run([sys.executable, "main.py", "download", "coco", "--no-convert"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 3 and "Traceback" not in run.stderr
    assert server.requests[-1] == ("coco_weights.pt", "bytes=30000-")
    assert "not a ClipCap checkpoint" in run.stderr and "was deleted" in run.stderr
    assert not (tmp_path / "home" / "downloads" / "coco_weights.pt").exists() and not part.exists()
    assert len(data) > 30000


def test_no_length_and_no_pin_is_never_published(server, tmp_path):
    """Without Content-Length a truncated body looks complete: with no pinned SHA-256 it is refused."""
    data = _torch_bytes()
    server.no_length = True
    source = _source(server, data[: len(data) // 2], with_sha=False)
    with pytest.raises(DownloadError, match="cannot be proven complete"):
        downloads.fetch(source, root=tmp_path, progress=False)
    assert _files(tmp_path) == [] and not downloads.manifest_path(tmp_path).exists()
    # with a pinned SHA-256 (and size) the same server is fine for the whole file
    pinned = Source("weights.pt", url=source.url, sha256=_sha(data), size=len(data), kind="torch")
    server.files["weights.pt"] = data
    assert downloads.fetch(pinned, root=tmp_path, progress=False).read_bytes() == data


def test_no_length_truncated_pinned_download_is_kept_for_resume(server, tmp_path):
    data = _torch_bytes()
    pinned = _source(server, data)
    pinned = Source(pinned.filename, url=pinned.url, sha256=pinned.sha256, size=len(data), kind="torch")
    server.no_length, server.files["weights.pt"] = True, data[:1000]
    with pytest.raises(DownloadError, match=f"stopped at 1000 of {len(data)} bytes; run again to resume"):
        downloads.fetch(pinned, root=tmp_path, progress=False)
    server.files["weights.pt"] = data
    assert downloads.fetch(pinned, root=tmp_path, progress=False).read_bytes() == data
    assert server.requests[-1] == ("weights.pt", "bytes=1000-")


def test_unbounded_response_is_cut_and_not_kept(server, tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "MAX_DOWNLOAD_BYTES", 5000)
    source = _source(server, _torch_bytes(), with_sha=False)
    with pytest.raises(DownloadError, match="announces .* more than the limit of 5000 bytes"):
        downloads.fetch(source, root=tmp_path, progress=False)
    server.no_length = True  # a server streaming without end
    with pytest.raises(DownloadError, match="sent more bytes .* than the limit of 5000 bytes"):
        downloads.fetch(source, root=tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_first_download_is_recorded_and_later_ones_are_checked(server, tmp_path):
    """Trust on first use: size + SHA-256 recorded in manifest.json; a different file under that name later
    (a new download or the cached copy) is refused with both hashes; a SHA-256 pinned in code wins."""
    data, other = _torch_bytes(seed=0), _torch_bytes(seed=1)
    source = _source(server, data, with_sha=False)
    path = downloads.fetch(source, root=tmp_path, progress=False)
    entry = downloads.read_manifest(tmp_path)["weights.pt"]
    assert entry["sha256"] == _sha(data) and entry["size"] == len(data) and entry["url"] == source.url
    manifest = json.loads(downloads.manifest_path(tmp_path).read_text())
    assert manifest["files"]["weights.pt"] == entry
    # the cached copy changed: refused, kept
    path.write_bytes(other)
    with pytest.raises(DownloadError, match=f"SHA-256 {_sha(other)}.*expected {_sha(data)}.*first download"):
        downloads.fetch(source, root=tmp_path, progress=False)
    assert path.read_bytes() == other
    # a new download of another file under that name: refused, deleted
    path.unlink()
    server.files["weights.pt"] = other
    with pytest.raises(DownloadError, match=f"SHA-256 mismatch: expected {_sha(data)}.*got {_sha(other)}"):
        downloads.fetch(source, root=tmp_path, progress=False)
    assert _files(tmp_path) == []
    # the same file again is accepted
    server.files["weights.pt"] = data
    assert downloads.fetch(source, root=tmp_path, progress=False).read_bytes() == data
    # a hash pinned in code wins over the manifest
    path.unlink()
    server.files["weights.pt"] = other
    pinned = Source("weights.pt", url=source.url, sha256=_sha(other), kind="torch")
    assert downloads.fetch(pinned, root=tmp_path, progress=False).read_bytes() == other
    assert downloads.read_manifest(tmp_path)["weights.pt"]["sha256"] == _sha(data)  # TOFU record unchanged


def test_damaged_manifest_is_refused_not_replaced(server, tmp_path):
    manifest = downloads.manifest_path(tmp_path)
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{not json")
    with pytest.raises(DownloadError, match=f"manifest {manifest} is damaged"):
        downloads.fetch(_source(server, _torch_bytes(), with_sha=False), root=tmp_path, progress=False)
    assert manifest.read_text() == "{not json"


@pytest.mark.parametrize("kind", ["fifo", "device link", "dangling link"])
def test_cached_special_file_is_refused_not_read_or_replaced(kind, server, tmp_path):
    data = _torch_bytes()
    source = _source(server, data)
    dest = tmp_path / "downloads" / "weights.pt"
    dest.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(dest)
    elif kind == "device link":
        dest.symlink_to("/dev/zero")
    else:
        dest.symlink_to(tmp_path / "nowhere.pt")
    problem = {"fifo": "FIFO", "device link": "character device", "dangling link": "dangling symbolic link"}[kind]
    with pytest.raises(DownloadError, match=problem):
        downloads.fetch(source, root=tmp_path, progress=False)
    assert os.path.lexists(dest) and server.requests == []


def test_concurrent_fetches_download_once(server, tmp_path):
    """Two fetches of one file at once (threads here; processes share the same file lock): one download,
    no shared .part written twice, both get the verified file."""
    data = _torch_bytes(20000)
    source = _source(server, data)
    server.delay = 0.5
    results, errors = [], []

    def get():
        try:
            results.append(downloads.fetch(source, root=tmp_path, progress=False))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=get) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(results) == 2 and all(p.read_bytes() == data for p in results)
    assert server.requests == [("weights.pt", None)]


def test_mirror_tokenizer_files_never_replace_files_in_place(server, tiny_files, tmp_path, monkeypatch):
    """A vocab.json already in downloads/gpt2-tokenizer/ is kept (the old code moved the mirror's file over
    it); the missing merges.txt is downloaded there directly and recorded."""
    monkeypatch.setenv(downloads.MIRROR_ENV, server.base)
    _serve_tiny(server, tiny_files)
    directory = tmp_path / "downloads" / "gpt2-tokenizer"
    directory.mkdir(parents=True)
    (directory / "vocab.json").write_text('{"mine": 0}')
    assert downloads.fetch_gpt2_tokenizer("gpt2", root=tmp_path, progress=False) == str(directory)
    assert (directory / "vocab.json").read_text() == '{"mine": 0}'
    assert (directory / "merges.txt").read_bytes() == server.files["gpt2-merges.txt"]
    assert server.requests == [("gpt2-merges.txt", None)]
    assert set(downloads.read_manifest(tmp_path)) == {"gpt2-merges.txt"}


def _tokenizer_sources(monkeypatch, base):
    monkeypatch.setattr(downloads, "GPT2_TOKENIZER_FILES", {
        "vocab.json": Source("gpt2-vocab.json", url=f"{base}/gpt2-vocab.json"),
        "merges.txt": Source("gpt2-merges.txt", url=f"{base}/gpt2-merges.txt")})
    monkeypatch.setattr(downloads, "_in_hf_cache", lambda name: False)


def test_gpt2_tokenizer_without_the_hub_cache_comes_through_our_transport(server, tiny_files, tmp_path,
                                                                          monkeypatch):
    """Not in the Hugging Face cache: both files are downloaded by our transport (verified, recorded in the
    manifest) into downloads/gpt2-tokenizer/, and load as a tokenizer."""
    from utils.tokenizer import load_gpt2_tokenizer

    monkeypatch.delenv(downloads.OFFLINE_ENV, raising=False)
    _serve_tiny(server, tiny_files)
    _tokenizer_sources(monkeypatch, server.base)
    directory = downloads.fetch_gpt2_tokenizer("gpt2", root=tmp_path, progress=False)
    assert directory == str(tmp_path / "downloads" / "gpt2-tokenizer")
    assert sorted(server.requests) == [("gpt2-merges.txt", None), ("gpt2-vocab.json", None)]
    assert set(downloads.read_manifest(tmp_path)) == {"gpt2-vocab.json", "gpt2-merges.txt"}
    assert len(load_gpt2_tokenizer(directory)) > 0


def test_gpt2_tokenizer_unreachable_or_offline_fails_at_once_naming_both_files(tmp_path, monkeypatch):
    """No network (a closed port here) or offline mode: an OfflineError in seconds that names vocab.json and
    merges.txt and where to put them, not minutes of hub retries ending in a wrong diagnosis."""
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    _tokenizer_sources(monkeypatch, closed)
    monkeypatch.delenv(downloads.OFFLINE_ENV, raising=False)
    start = time.monotonic()
    with pytest.raises(downloads.OfflineError) as info:
        downloads.fetch_gpt2_tokenizer("gpt2", root=tmp_path, progress=False)
    assert time.monotonic() - start < 10
    directory = tmp_path / "downloads" / "gpt2-tokenizer"
    assert str(directory / "vocab.json") in str(info.value) and str(directory / "merges.txt") in str(info.value)
    monkeypatch.setenv(downloads.OFFLINE_ENV, "1")
    with pytest.raises(downloads.OfflineError, match="merges.txt") as info:
        downloads.fetch_gpt2_tokenizer("gpt2", root=tmp_path, progress=False)
    assert str(directory / "vocab.json") in str(info.value)


# ----------------------------------------------------------------------------- the checkpoint's identity


def test_official_specs_state_their_checkpoints():
    gpt2 = {"n_embd": 768, "n_layer": 12, "vocab_size": 50257, "n_positions": 1024}
    for name in ("coco", "conceptual"):
        assert downloads.MODELS[name].expect == {"mapping_type": "mlp", "prefix_length": 10, "prefix_size": 512,
                                                 **gpt2}
    assert downloads.MODELS["coco_transformer"].expect == {
        "mapping_type": "transformer", "prefix_length": 40, "clip_length": 40, "num_layers": 8, "prefix_size": 640,
        **gpt2}


TINY_MLP = {"mapping_type": "mlp", "prefix_length": tiny_models.PREFIX_LENGTH, "prefix_size": tiny_models.EMBED_DIM,
            "n_embd": tiny_models.GPT["n_embd"], "n_layer": tiny_models.GPT["n_layer"]}


def test_mirror_serving_another_checkpoint_is_refused(server, tiny_files, tmp_path, monkeypatch):
    """A mirror serves a transformer-mapper ClipCap as the MLP model's checkpoint: refused (expected vs found),
    nothing kept, nothing converted; the right file is then accepted (also without Content-Length)."""
    monkeypatch.setenv(downloads.MIRROR_ENV, server.base)
    spec = _serve_tiny(server, tiny_files)
    spec = ModelSpec("tiny", spec.checkpoint, clip=spec.clip, expect=TINY_MLP)
    wrong = tiny_models.build_tiny_clipcap(tmp_path / "wrong.pt", tiny_files["tokenizer"], kind="transformer")
    server.files["tiny_clipcap.pt"] = wrong.read_bytes()
    from utils.convert.common import CheckpointError

    with pytest.raises(CheckpointError) as info:
        downloads.get_pretrained(spec, root=tmp_path, progress=False)
    message = str(info.value)
    assert "not the checkpoint of 'tiny'" in message and "expected mapping_type='mlp'" in message
    assert "found mapping_type='transformer'" in message and "was deleted" in message
    assert "tiny_clipcap.pt" not in _files(tmp_path) and _leftovers(tmp_path) == []
    assert not (tmp_path / "tiny").exists() and "tiny_clipcap.pt" not in downloads.read_manifest(tmp_path)
    # the right checkpoint, from a server without Content-Length: identity-checked, published, recorded
    server.files["tiny_clipcap.pt"] = tiny_files["checkpoint"].read_bytes()
    server.no_length = True
    path = downloads.fetch_checkpoint(spec, root=tmp_path, progress=False)
    assert path.read_bytes() == server.files["tiny_clipcap.pt"]
    assert downloads.read_manifest(tmp_path)["tiny_clipcap.pt"]["sha256"] == _sha(path.read_bytes())


def test_real_spec_refuses_a_tiny_checkpoint_as_coco(server, tiny_files, tmp_path, monkeypatch):
    monkeypatch.setenv(downloads.MIRROR_ENV, server.base)
    server.files["coco_weights.pt"] = tiny_files["checkpoint"].read_bytes()
    from utils.convert.common import CheckpointError

    with pytest.raises(CheckpointError, match="expected prefix_length=10, prefix_size=512, n_embd=768, n_layer=12"):
        downloads.fetch_checkpoint("coco", root=tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_cached_checkpoint_of_another_model_is_refused_and_kept(tiny_files, tmp_path):
    """A hand-placed file under an official name is checked too, and never deleted (it is the user's)."""
    from utils.convert.common import CheckpointError

    cached = tmp_path / "downloads" / "coco_weights.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(tiny_files["checkpoint"].read_bytes())
    with pytest.raises(CheckpointError, match="not the checkpoint of 'coco'.*was kept: delete or replace it"):
        downloads.fetch_checkpoint("coco", root=tmp_path, progress=False)
    assert cached.exists()
