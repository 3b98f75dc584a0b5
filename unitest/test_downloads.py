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
import socket
import threading
import urllib.parse

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
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
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
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True, name="test-http")
    thread.start()
    yield httpd
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
                  if p.suffix != ".lock" and p.name != downloads.MANIFEST_NAME)


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
    assert "vocab.json and merges.txt" in message
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
                   "gpt2-vocab.json", "14pXWwB4Zm82rsDdvbGguLfx9F8aM7ovT", "1GYPToCqFREwi285wPLhuVExlz7DDUDfJ"):
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
