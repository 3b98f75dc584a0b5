"""utils/downloads.py (the transport) against a local HTTP server on 127.0.0.1 (no network).

Covered: a verified, atomic download; a corrupted download detected and deleted; an HTML page instead of a
checkpoint; resumable partial downloads (HTTP Range) and a server that ignores Range; an unreachable server;
the mirror variable, which also replaces Google Drive; transport errors that keep the ``.part``; downloads
that cannot be proven whole; trust on first use (`utils.download_manifest`); special files in the cache;
concurrent fetches; the GPT-2 tokenizer's and language model's files (`models.image_captioning.gpt2_hub`:
huggingface_hub, against the server's hub paths). Whole official models: test_downloads_models.py.
"""

import json
import os
import socket
import threading
import time
import zipfile

import pytest

from models.image_captioning import gpt2_hub, presets
from models.siamese.presets import fetch_clip
from unitest import download_server
from unitest.download_server import cached_files, leftovers, serve_tiny, served_source, sha, torch_bytes
from utils import downloads
from utils.download_manifest import manifest_path, read_manifest
from utils.downloads import DownloadError, OfflineError, Source

#: the fixtures, bound here so that pytest finds them (clean_env is autouse)
server, clean_env, tiny_files = download_server.server, download_server.clean_env, download_server.tiny_files


def test_download_verified_and_atomic(server, tmp_path):
    data = torch_bytes()
    path = downloads.fetch(served_source(server, data), root=tmp_path, progress=False)
    assert path == tmp_path / "downloads" / "weights.pt" and path.read_bytes() == data
    assert leftovers(tmp_path) == []
    downloads.fetch(served_source(server, data), root=tmp_path, progress=False)  # cached: no second request
    assert len(server.requests) == 1


def test_corrupted_download_detected_and_not_kept(server, tmp_path):
    data = torch_bytes()
    source = served_source(server, data)
    server.files["weights.pt"] = data[:100] + bytes([data[100] ^ 1]) + data[101:]
    with pytest.raises(DownloadError, match="SHA-256 mismatch.*deleted"):
        downloads.fetch(source, root=tmp_path, progress=False)
    assert not (tmp_path / "downloads" / "weights.pt").exists() and leftovers(tmp_path) == []


def test_html_page_instead_of_checkpoint_not_kept(server, tmp_path):
    source = served_source(server, b"<!DOCTYPE html><html>Google Drive - quota exceeded</html>", with_sha=False)
    with pytest.raises(DownloadError, match="HTML page"):
        downloads.fetch(source, root=tmp_path, progress=False)
    assert cached_files(tmp_path) == []


def test_interrupted_download_resumes_with_range(server, tmp_path):
    data = torch_bytes(20000)
    source = served_source(server, data)
    server.cut_after = 30000
    with pytest.raises(DownloadError, match="run again to resume"):
        downloads.fetch(source, root=tmp_path, progress=False)
    part = tmp_path / "downloads" / "weights.pt.part"
    assert part.stat().st_size == 30000 and not (tmp_path / "downloads" / "weights.pt").exists()
    path = downloads.fetch(source, root=tmp_path, progress=False)
    assert path.read_bytes() == data and not part.exists()
    assert server.requests[-1] == ("weights.pt", "bytes=30000-")


def test_server_ignoring_range_restarts(server, tmp_path):
    data = torch_bytes()
    source = served_source(server, data)
    server.support_range = False
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "weights.pt.part").write_bytes(b"garbage that is not a prefix")
    assert downloads.fetch(source, root=tmp_path, progress=False).read_bytes() == data


def test_complete_partial_file_is_verified(server, tmp_path):
    data = torch_bytes()
    source = served_source(server, data)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "weights.pt.part").write_bytes(data)  # server answers 416: nothing left
    assert downloads.fetch(source, root=tmp_path, progress=False).read_bytes() == data


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
    data = torch_bytes()
    server.files["models/coco_weights.pt"] = data
    path = downloads.fetch(presets.MODELS["coco"].checkpoint, root=tmp_path, progress=False)
    assert path.read_bytes() == data and server.requests == [("models/coco_weights.pt", None)]
    # an OpenAI URL is replaced too, and its checksum still verified: the real SHA-256 rejects our tiny file
    server.files["models/ViT-B-32.pt"] = data
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        fetch_clip("ViT-B/32", root=tmp_path, progress=False)
    assert server.requests[-1] == ("models/ViT-B-32.pt", None)
    assert not (tmp_path / "downloads" / "ViT-B-32.pt").exists()


# ------------------------------------------------------------------ downloads that cannot be proven whole


@pytest.mark.parametrize("failure", ["chunked_cut", "reset", "timeout"])
def test_transport_errors_are_download_errors_that_keep_the_part(failure, server, tmp_path, monkeypatch):
    """A chunked body cut short (http.client.IncompleteRead, not an OSError), a reset connection and a silent
    server all end in DownloadError; the received bytes stay in the .part and the next call resumes them."""
    data = torch_bytes(20000)
    source = served_source(server, data)
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
    assert 0 < received <= 30000 and cached_files(tmp_path) == ["weights.pt.part"]
    server.chunked = False
    assert downloads.fetch(source, root=tmp_path, progress=False).read_bytes() == data
    assert server.requests[-1] == ("weights.pt", f"bytes={received}-")
    assert cached_files(tmp_path) == ["weights.pt"]


def test_no_length_and_no_pin_is_never_published(server, tmp_path):
    """Without Content-Length a truncated body looks complete: with no pinned SHA-256 it is refused."""
    data = torch_bytes()
    server.no_length = True
    source = served_source(server, data[: len(data) // 2], with_sha=False)
    with pytest.raises(DownloadError, match="cannot be proven complete"):
        downloads.fetch(source, root=tmp_path, progress=False)
    assert cached_files(tmp_path) == [] and not manifest_path(tmp_path).exists()
    # with a pinned SHA-256 (and size) the same server is fine for the whole file
    pinned = Source("weights.pt", url=source.url, sha256=sha(data), size=len(data), kind="torch")
    server.files["weights.pt"] = data
    assert downloads.fetch(pinned, root=tmp_path, progress=False).read_bytes() == data


def test_no_length_truncated_pinned_download_is_kept_for_resume(server, tmp_path):
    data = torch_bytes()
    pinned = served_source(server, data)
    pinned = Source(pinned.filename, url=pinned.url, sha256=pinned.sha256, size=len(data), kind="torch")
    server.no_length, server.files["weights.pt"] = True, data[:1000]
    with pytest.raises(DownloadError, match=f"stopped at 1000 of {len(data)} bytes; run again to resume"):
        downloads.fetch(pinned, root=tmp_path, progress=False)
    server.files["weights.pt"] = data
    assert downloads.fetch(pinned, root=tmp_path, progress=False).read_bytes() == data
    assert server.requests[-1] == ("weights.pt", "bytes=1000-")


def test_unbounded_response_is_cut_and_not_kept(server, tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "MAX_DOWNLOAD_BYTES", 5000)
    source = served_source(server, torch_bytes(), with_sha=False)
    with pytest.raises(DownloadError, match="announces .* more than the limit of 5000 bytes"):
        downloads.fetch(source, root=tmp_path, progress=False)
    server.no_length = True  # a server streaming without end
    with pytest.raises(DownloadError, match="sent more bytes .* than the limit of 5000 bytes"):
        downloads.fetch(source, root=tmp_path, progress=False)
    assert cached_files(tmp_path) == []


def test_first_download_is_recorded_and_later_ones_are_checked(server, tmp_path):
    """Trust on first use: size + SHA-256 recorded in manifest.json; a different file under that name later
    (a new download or the cached copy) is refused with both hashes; a SHA-256 pinned in code wins."""
    data, other = torch_bytes(seed=0), torch_bytes(seed=1)
    source = served_source(server, data, with_sha=False)
    path = downloads.fetch(source, root=tmp_path, progress=False)
    entry = read_manifest(tmp_path)["weights.pt"]
    assert entry["sha256"] == sha(data) and entry["size"] == len(data) and entry["url"] == source.url
    manifest = json.loads(manifest_path(tmp_path).read_text())
    assert manifest["files"]["weights.pt"] == entry
    # the cached copy changed: refused, kept
    path.write_bytes(other)
    with pytest.raises(DownloadError, match=f"SHA-256 {sha(other)}.*expected {sha(data)}.*first download"):
        downloads.fetch(source, root=tmp_path, progress=False)
    assert path.read_bytes() == other
    # a new download of another file under that name: refused, deleted
    path.unlink()
    server.files["weights.pt"] = other
    with pytest.raises(DownloadError, match=f"SHA-256 mismatch: expected {sha(data)}.*got {sha(other)}"):
        downloads.fetch(source, root=tmp_path, progress=False)
    assert cached_files(tmp_path) == []
    # the same file again is accepted
    server.files["weights.pt"] = data
    assert downloads.fetch(source, root=tmp_path, progress=False).read_bytes() == data
    # a hash pinned in code wins over the manifest
    path.unlink()
    server.files["weights.pt"] = other
    pinned = Source("weights.pt", url=source.url, sha256=sha(other), kind="torch")
    assert downloads.fetch(pinned, root=tmp_path, progress=False).read_bytes() == other
    assert read_manifest(tmp_path)["weights.pt"]["sha256"] == sha(data)  # TOFU record unchanged


def _flip_a_storage_byte(data):
    """``data`` (a torch zip) with one byte of its first storage record flipped: the zip's CRC-32 no longer
    matches, every shape still reads."""
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    start = info.header_offset + 30 + int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    return data[:start] + bytes([data[start] ^ 0x40]) + data[start + 1:]


def test_a_corrupt_zip_record_is_never_recorded(server, tmp_path):
    """Trust on first use records a file's SHA-256 only once every zip record matches its CRC-32: a flipped
    storage byte (which a shapes-only check does not see) is refused and deleted, nothing recorded, and the
    good file then downloads."""
    data = torch_bytes()
    source = served_source(server, _flip_a_storage_byte(data), with_sha=False)
    checked = []
    with pytest.raises(DownloadError, match=r"zip record '.*/data/0' is damaged \(BadZipFile: Bad CRC-32.*deleted"):
        downloads.fetch(source, root=tmp_path, progress=False, verify=checked.append)
    assert cached_files(tmp_path) == [] and leftovers(tmp_path) == [] and checked == []
    assert read_manifest(tmp_path) == {}
    server.files["weights.pt"] = data
    assert downloads.fetch(source, root=tmp_path, progress=False).read_bytes() == data
    assert read_manifest(tmp_path)["weights.pt"]["sha256"] == sha(data)


def test_a_damaged_legacy_checkpoint_is_never_recorded(server, tmp_path):
    """A legacy (non-zip) checkpoint has no checksums: without a pinned hash its structure is checked before its
    SHA-256 is recorded (it was not: a file cut short, served with a matching Content-Length, was published
    and pinned, and every good download after it refused as a mismatch)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.randn(2000, generator=torch.Generator().manual_seed(0))}, buf,
               _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    assert not data.startswith(b"PK")
    source = served_source(server, data[:-400], with_sha=False)
    with pytest.raises(DownloadError, match=r"damaged legacy checkpoint: .*storage .*truncated.*deleted"):
        downloads.fetch(source, root=tmp_path, progress=False)
    assert cached_files(tmp_path) == [] and leftovers(tmp_path) == [] and read_manifest(tmp_path) == {}
    server.files["weights.pt"] = data
    assert downloads.fetch(source, root=tmp_path, progress=False).read_bytes() == data
    assert read_manifest(tmp_path)["weights.pt"]["sha256"] == sha(data)


def test_damaged_manifest_is_refused_not_replaced(server, tmp_path):
    manifest = manifest_path(tmp_path)
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{not json")
    with pytest.raises(DownloadError, match=f"manifest {manifest} is damaged"):
        downloads.fetch(served_source(server, torch_bytes(), with_sha=False), root=tmp_path, progress=False)
    assert manifest.read_text() == "{not json"


@pytest.mark.parametrize("kind", ["fifo", "device link", "dangling link"])
def test_cached_special_file_is_refused_not_read_or_replaced(kind, server, tmp_path):
    data = torch_bytes()
    source = served_source(server, data)
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
    data = torch_bytes(20000)
    source = served_source(server, data)
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
    serve_tiny(server, tiny_files)
    directory = tmp_path / "downloads" / "gpt2-tokenizer"
    directory.mkdir(parents=True)
    (directory / "vocab.json").write_text('{"mine": 0}')
    assert gpt2_hub.fetch_gpt2_tokenizer("gpt2", root=tmp_path, progress=False) == str(directory)
    assert (directory / "vocab.json").read_text() == '{"mine": 0}'
    assert (directory / "merges.txt").read_bytes() == server.files["gpt2-merges.txt"]
    assert server.requests == [("gpt2-merges.txt", None)]
    assert set(read_manifest(tmp_path)) == {"gpt2-merges.txt"}


def _tokenizer_sources(monkeypatch, base):
    """The hub at ``base`` (files at <base>/<repo>/resolve/main/<file>), its cache empty, huggingface_hub online
    (conftest sets HF_HUB_OFFLINE for every other test)."""
    import huggingface_hub.constants

    monkeypatch.setattr(gpt2_hub, "HUB_URL", base)
    monkeypatch.setattr(gpt2_hub, "_in_hf_cache", lambda name, files=None: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def _serve_gpt2_tokenizer(server, tiny_files):
    for name in ("vocab.json", "merges.txt"):  # where the hub has them (GPT-2 moved under openai-community/)
        server.files[f"openai-community/gpt2/resolve/main/{name}"] = (tiny_files["tokenizer"] / name).read_bytes()


def test_the_transport_knows_no_model():
    """utils/downloads.py moves bytes: the hub's GPT-2 files live beside the presets (gpt2_hub)."""
    text = open(downloads.__file__, encoding="utf-8").read()
    assert "gpt2" not in text and "huggingface.co" not in text
    assert not any(hasattr(downloads, name) for name in ("fetch_gpt2_tokenizer", "fetch_gpt2_model", "hub_sources"))


def test_gpt2_tokenizer_without_the_hub_cache_comes_through_huggingface_hub(server, tiny_files, tmp_path,
                                                                           monkeypatch):
    """Not in the Hugging Face cache: both files are downloaded by huggingface_hub (the hub's metadata, then the
    file) and published by our transport (verified, recorded in the manifest) into downloads/gpt2-tokenizer/,
    and load as a tokenizer."""
    from utils.tokenizer import load_gpt2_tokenizer

    monkeypatch.delenv(downloads.OFFLINE_ENV, raising=False)
    _serve_gpt2_tokenizer(server, tiny_files)
    _tokenizer_sources(monkeypatch, server.base)
    directory = gpt2_hub.fetch_gpt2_tokenizer("gpt2", root=tmp_path, progress=False)
    assert directory == str(tmp_path / "downloads" / "gpt2-tokenizer")
    assert sorted(server.requests) == [("openai-community/gpt2/resolve/main/merges.txt", None),
                                       ("openai-community/gpt2/resolve/main/vocab.json", None)]
    assert set(server.heads) == {"openai-community/gpt2/resolve/main/merges.txt",
                                 "openai-community/gpt2/resolve/main/vocab.json"}  # huggingface_hub's protocol
    assert set(read_manifest(tmp_path)) == {"gpt2-vocab.json", "gpt2-merges.txt"}
    assert sorted(os.listdir(directory)) == ["merges.txt", "vocab.json"]
    assert len(load_gpt2_tokenizer(directory)) > 0
    assert gpt2_hub.fetch_gpt2_tokenizer("gpt2", root=tmp_path, progress=False) == directory
    assert len(server.requests) == 2  # cached: checked against the manifest, not fetched again


def test_a_hub_file_that_differs_from_its_recorded_hash_is_deleted(server, tiny_files, tmp_path, monkeypatch):
    """Trust on first use holds for hub files: a later download of gpt2-vocab.json that is not the file recorded
    the first time is deleted, and nothing is published."""
    monkeypatch.delenv(downloads.OFFLINE_ENV, raising=False)
    _serve_gpt2_tokenizer(server, tiny_files)
    _tokenizer_sources(monkeypatch, server.base)
    first = gpt2_hub.fetch_gpt2_tokenizer("gpt2", root=tmp_path, progress=False)
    os.remove(os.path.join(first, "vocab.json"))  # the user removes it; the hub's file then changes
    server.files["openai-community/gpt2/resolve/main/vocab.json"] = b'{"changed": 0}'
    with pytest.raises(DownloadError, match="SHA-256 mismatch.*deleted"):
        gpt2_hub.fetch_gpt2_tokenizer("gpt2", root=tmp_path, progress=False)
    assert sorted(os.listdir(first)) == ["merges.txt"]


def test_gpt2_tokenizer_unreachable_or_offline_fails_at_once_naming_both_files(tmp_path, monkeypatch):
    """No network (a closed port here) or offline mode: an OfflineError in seconds that names vocab.json and
    merges.txt and where to put them, not minutes of hub retries ending in a wrong diagnosis."""
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    _tokenizer_sources(monkeypatch, closed)
    monkeypatch.delenv(downloads.OFFLINE_ENV, raising=False)
    start = time.monotonic()
    with pytest.raises(OfflineError) as info:
        gpt2_hub.fetch_gpt2_tokenizer("gpt2", root=tmp_path, progress=False)
    assert time.monotonic() - start < 10
    directory = tmp_path / "downloads" / "gpt2-tokenizer"
    assert str(directory / "vocab.json") in str(info.value) and str(directory / "merges.txt") in str(info.value)
    monkeypatch.setenv(downloads.OFFLINE_ENV, "1")
    with pytest.raises(OfflineError, match="merges.txt") as info:
        gpt2_hub.fetch_gpt2_tokenizer("gpt2", root=tmp_path, progress=False)
    assert str(directory / "vocab.json") in str(info.value)


def test_any_hub_repository_tokenizer_and_model_come_through_our_transport(server, tiny_files, tmp_path,
                                                                         monkeypatch):
    """Not only "gpt2": any GPT-2-family repository name gets its tokenizer and language model the same way:
    from the mirror (files named <owner>--<name>-<file>) or the hub (<repo>/resolve/main/<file>), verified,
    recorded in the manifest, into downloads/<owner>--<name>-tokenizer|model/; and they load."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from utils.convert.hf_gpt2 import load_gpt2
    from utils.tokenizer import load_gpt2_tokenizer

    monkeypatch.delenv(downloads.OFFLINE_ENV, raising=False)
    repo = "someone/gpt2-fr"
    tokenizer_files = {name: (tiny_files["tokenizer"] / name).read_bytes() for name in ("vocab.json", "merges.txt")}
    server.files.update({f"someone--gpt2-fr-{name}": data for name, data in tokenizer_files.items()})
    hf_dir = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=1, n_head=3)).save_pretrained(hf_dir)
    server.files.update({f"{repo}/resolve/main/{name}": (hf_dir / name).read_bytes()
                         for name in ("config.json", "model.safetensors")})
    _tokenizer_sources(monkeypatch, server.base)
    monkeypatch.setenv(downloads.MIRROR_ENV, server.base)  # the tokenizer from the mirror
    directory = gpt2_hub.fetch_gpt2_tokenizer(repo, root=tmp_path, progress=False)
    assert directory == str(tmp_path / "downloads" / "someone--gpt2-fr-tokenizer")
    assert len(load_gpt2_tokenizer(directory)) > 0
    monkeypatch.delenv(downloads.MIRROR_ENV)  # the model from the hub
    model_dir = gpt2_hub.fetch_gpt2_model(repo, root=tmp_path, progress=False)
    assert model_dir == str(tmp_path / "downloads" / "someone--gpt2-fr-model")
    assert load_gpt2(model_dir).n_head == 3
    assert set(read_manifest(tmp_path)) == {"someone--gpt2-fr-vocab.json", "someone--gpt2-fr-merges.txt",
                                            "someone--gpt2-fr-config.json", "someone--gpt2-fr-model.safetensors"}
    assert gpt2_hub.fetch_gpt2_model(repo, root=tmp_path, progress=False) == model_dir  # cached: no request
    assert len(server.requests) == 4
    with pytest.raises(OfflineError, match="someone--other-model"):  # another one offline: named at once
        monkeypatch.setenv(downloads.OFFLINE_ENV, "1")
        gpt2_hub.fetch_gpt2_model("someone/other", root=tmp_path, progress=False)
    assert gpt2_hub.fetch_gpt2_tokenizer("../not/a repo", root=tmp_path) == "../not/a repo"  # the loader names it
