"""Model names → download sources, verified resumable downloads, and the converted-model store.

Names:

- ClipCap models (`MODELS`): ``coco`` (MLP mapper, COCO), ``conceptual`` (MLP mapper, Conceptual Captions),
  ``coco_transformer`` (transformer mapper, COCO). The official checkpoints come from Google Drive (gdown);
  each names the CLIP it was trained on and the GPT-2 tokenizer.
- CLIP models (`CLIP_SOURCES`): OpenAI's published files (``ViT-B/32``, ``RN50x4``, ...). Their URL path
  embeds the file's SHA-256, which is verified after download.
- The GPT-2 tokenizer: ``vocab.json`` and ``merges.txt`` fetched like every file into
  ``downloads/gpt2-tokenizer/``, unless the Hugging Face cache already holds them (`fetch_gpt2_tokenizer`).

Files are cached in ``pretrained_models/downloads/``; a converted model is saved once in
``pretrained_models/<name>/`` and loaded from there afterwards (no torch needed then).

What a download guarantees (`fetch`):

- **Nothing unproven is published.** A download goes to ``<file>.part`` and is renamed into the cache only
  once proven whole and right: its SHA-256 equals the pinned one; or, with no pinned hash, the server
  announced its length and every byte arrived, or (Google Drive, no length) the checkpoint passed its
  identity check. A ClipCap checkpoint must also be the one its name promises (`ModelSpec.expect`: mapper
  type, prefix length, CLIP size, GPT-2 size), else `CheckpointError`. A bad download is deleted.
- **Pinning, trust on first use.** `Source.sha256` / `Source.size` pin a file in code (OpenAI's CLIP URLs
  carry their SHA-256). The official ClipCap checkpoints and GPT-2 tokenizer files have no published hash:
  their size and SHA-256 are recorded in ``downloads/manifest.json`` at their first verified download, and
  every later download or use of that file name is checked against them (a different new download is
  deleted; a changed cached file is refused and kept, since it may have been placed by hand). A hash pinned
  in code wins over the manifest.
- **Transport errors** (a connection reset, a timeout, a chunked body cut short, a malformed response)
  raise `DownloadError` (exit 3 from the CLI) and keep the ``.part``: the next run resumes it (HTTP
  ``Range``). Responses are bounded by the pinned size, else by `MAX_DOWNLOAD_BYTES`.
- **One download per file** at a time, across threads and processes (a lock on ``<file>.lock``, left in
  place); the others wait, then use (and check) the downloaded file.

Environment variables:

- ``IMAGE_CAPTIONING_MIRROR=<base URL>``: fetch every file from ``<base URL>/<file name>`` instead of its
  origin (file names: see ``python main.py download --list``; the GPT-2 tokenizer's files are
  ``gpt2-vocab.json`` and ``gpt2-merges.txt``). Checksums are still verified.
- ``IMAGE_CAPTIONING_OFFLINE=1``: never download; a missing file raises `OfflineError` saying which file
  to put where. The same error is raised when the network cannot be reached.
- ``IMAGE_CAPTIONING_HOME=<dir>``: where the model store lives (default: ``pretrained_models/`` in the
  repository).

Example::

    from utils.downloads import get_pretrained
    model = get_pretrained("coco")          # downloads, verifies, converts once, then loads
    print(model.caption("demo/cat.jpg"))
"""

import contextlib
import hashlib
import http.client
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tqdm.auto import tqdm

from utils.convert.common import CheckpointError
from utils.file_utils import (
    UnsafePathError,
    check_model_name,
    check_replaceable,
    file_lock,
    open_regular_file,
    path_problem,
    read_regular_file,
    write_json_atomic,
)
from utils.store import HOME_ENV, home_dir  # noqa: F401 (HOME_ENV, home_dir: part of this module's API)

logger = logging.getLogger(__name__)

MIRROR_ENV = "IMAGE_CAPTIONING_MIRROR"
OFFLINE_ENV = "IMAGE_CAPTIONING_OFFLINE"

_CHUNK = 1 << 20
_TIMEOUT_S = 60  # seconds without a byte before a transfer counts as failed
#: The most bytes accepted for a file without a pinned size (the largest official file is ~1.3 GB).
MAX_DOWNLOAD_BYTES = 8 * 1024**3
MANIFEST_NAME = "manifest.json"
_MANIFEST_MAX_BYTES = 16 * 1024**2


class DownloadError(RuntimeError):
    """A file could not be downloaded, or what was downloaded is not what was expected."""


class OfflineError(DownloadError):
    """A file is needed, is not in the cache, and cannot be downloaded (offline mode or no network)."""


# ----------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One downloadable file.

    ``filename`` is its name in the cache and on a mirror; ``url`` a direct HTTP(S) address, or
    ``drive_id`` a Google Drive file id; ``sha256`` / ``size`` (when known) pin the file: every download and
    cached copy must match them (without them, the manifest's record of the first download pins it);
    ``kind="torch"`` checks that the bytes are a PyTorch checkpoint (zip archive or pickle), which catches
    the HTML pages Google Drive serves instead of a file when its quota is exceeded.

    Pinning an official hash later is one field: ``Source("coco_weights.pt", drive_id=..., sha256="...")``.
    """

    filename: str
    url: str | None = None
    drive_id: str | None = None
    sha256: str | None = None
    kind: str | None = None
    size: int | None = None

    @property
    def origin(self):
        if self.url:
            return self.url
        if self.drive_id:
            return f"https://drive.google.com/uc?id={self.drive_id}"
        return None


def _openai_clip(url):
    # OpenAI's URLs are .../clip/models/<sha256>/<file name>
    return Source(filename=url.rsplit("/", 1)[1], url=url, sha256=url.rsplit("/", 2)[1], kind="torch")


#: OpenAI's published CLIP checkpoints (the ``_MODELS`` table of the ``clip`` package, v1.0).
CLIP_SOURCES = {
    name: _openai_clip(url) for name, url in {
        "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
        "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
        "RN50x4": "https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
        "RN50x16": "https://openaipublic.azureedge.net/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
        "RN50x64": "https://openaipublic.azureedge.net/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
        "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
        "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
        "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
        "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
    }.items()
}

#: The GPT-2 tokenizer files, as named on a mirror, with their origin on huggingface.co.
GPT2_TOKENIZER_FILES = {
    "vocab.json": Source("gpt2-vocab.json", url="https://huggingface.co/openai-community/gpt2/resolve/main/vocab.json"),
    "merges.txt": Source("gpt2-merges.txt", url="https://huggingface.co/openai-community/gpt2/resolve/main/merges.txt"),
}


@dataclass(frozen=True)
class ModelSpec:
    """A ClipCap model that can be downloaded by name.

    ``checkpoint``: the official ClipCap ``.pt``; ``clip``: a `CLIP_SOURCES` name or a `Source`;
    ``tokenizer``: ``"gpt2"`` (the hub's GPT-2 tokenizer) or a local directory; ``clipcap_kwargs``:
    extra arguments for ``ClipCap.from_pretrained``; ``expect``: what the checkpoint must be, as
    `utils.convert.clipcap.clipcap_identity` describes it (``mapping_type``, ``prefix_length``,
    ``prefix_size``, ``clip_length``, ``num_layers``, GPT-2's ``n_embd`` / ``n_layer`` / ``vocab_size``...):
    a download that differs is refused (`CheckpointError`) before it is published under this name.
    """

    name: str
    checkpoint: Source
    clip: str | Source
    tokenizer: str = "gpt2"
    description: str = ""
    clipcap_kwargs: dict = field(default_factory=dict)
    expect: dict = field(default_factory=dict)


#: GPT-2 124M ("gpt2"), which every official ClipCap checkpoint fine-tunes or keeps frozen.
_GPT2_124M = {"n_embd": 768, "n_layer": 12, "vocab_size": 50257, "n_positions": 1024}


#: The official ClipCap checkpoints (rmokady/CLIP_prefix_caption README), with the CLIP each was trained on.
MODELS = {
    "coco": ModelSpec(
        "coco", Source("coco_weights.pt", drive_id="1IdaBtMSvtyzF0ByVaBHtvM0JYSXRExRX", kind="torch"),
        clip="ViT-B/32", description="MLP mapper + fine-tuned GPT-2, trained on COCO captions",
        expect={"mapping_type": "mlp", "prefix_length": 10, "prefix_size": 512, **_GPT2_124M}),
    "conceptual": ModelSpec(
        "conceptual", Source("conceptual_weights.pt", drive_id="14pXWwB4Zm82rsDdvbGguLfx9F8aM7ovT", kind="torch"),
        clip="ViT-B/32", description="MLP mapper + fine-tuned GPT-2, trained on Conceptual Captions",
        expect={"mapping_type": "mlp", "prefix_length": 10, "prefix_size": 512, **_GPT2_124M}),
    "coco_transformer": ModelSpec(
        "coco_transformer",
        Source("coco_transformer_weights.pt", drive_id="1GYPToCqFREwi285wPLhuVExlz7DDUDfJ", kind="torch"),
        clip="RN50x4", description="transformer mapper + frozen GPT-2, trained on COCO captions",
        expect={"mapping_type": "transformer", "prefix_length": 40, "clip_length": 40, "num_layers": 8,
                "prefix_size": 640, **_GPT2_124M}),
}


def resolve_model(name_or_spec) -> ModelSpec:
    """A `ModelSpec` from a name in `MODELS` (or the spec itself); unknown names list the known ones."""
    if isinstance(name_or_spec, ModelSpec):
        return name_or_spec
    if name_or_spec in MODELS:
        return MODELS[name_or_spec]
    raise KeyError(f"unknown model name {name_or_spec!r}; known ClipCap models: {', '.join(MODELS)} "
                   f"(or give a directory holding a saved model)")


# ------------------------------------------------------------------------------------------------ places


def downloads_dir(root=None) -> Path:
    return Path(root or home_dir()) / "downloads"


def is_offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def mirror_url(source: Source) -> str | None:
    """``<mirror>/<file name>`` when ``IMAGE_CAPTIONING_MIRROR`` is set, else None."""
    base = os.environ.get(MIRROR_ENV, "").strip()
    if not base:
        return None
    return base.rstrip("/") + "/" + urllib.parse.quote(source.filename)


def _where_from(source):
    mirror = mirror_url(source)
    if mirror:
        return mirror
    if source.drive_id:
        return f"{source.origin} (Google Drive; e.g. `gdown {source.drive_id}`)"
    return source.origin


# ----------------------------------------------------------------------------------------- pins, manifest


@dataclass(frozen=True)
class _Pin:
    """What a file must be: its SHA-256, its size (when known) and where that came from (for messages)."""

    sha256: str
    size: int | None
    where: str


def manifest_path(root=None) -> Path:
    """``<store>/downloads/manifest.json``: size + SHA-256 of every file at its first verified download."""
    return downloads_dir(root) / MANIFEST_NAME


def read_manifest(root=None) -> dict:
    """``{file name: {"sha256", "size", "url", "recorded"}}`` from the manifest ({} when there is none).

    A damaged manifest raises `DownloadError` (it is never silently replaced: it is what detects a file
    that changed since its first download).
    """
    path = manifest_path(root)
    if not os.path.lexists(path):
        return {}
    try:
        data = json.loads(read_regular_file(path, max_bytes=_MANIFEST_MAX_BYTES))
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("sha256"), str)
                                                  for e in files.values()):
            raise ValueError("'files' must map file names to {sha256, size}")
    except (OSError, ValueError, KeyError, TypeError) as e:  # UnsafePathError, JSONDecodeError are ValueErrors
        raise DownloadError(
            f"the download manifest {path} is damaged ({type(e).__name__}: {e}). It records the SHA-256 of each "
            f"file at its first download; repair it, or delete it to trust the cached files again") from e
    return files


def _pin(source, root) -> _Pin | None:
    """The SHA-256 a file must have: `Source.sha256` (pinned in code, always wins), else the manifest's."""
    if source.sha256:
        return _Pin(source.sha256.lower(), source.size, "(pinned in utils/downloads.py)")
    entry = read_manifest(root).get(source.filename)
    if entry is None:
        return None
    return _Pin(entry["sha256"], entry.get("size"),
                f"(recorded in {manifest_path(root)} at its first download, {entry.get('recorded', '?')}, "
                f"from {entry.get('url', '?')})")


def _record(source, size, sha256, url, root):
    """Trust on first use: add the file's size and SHA-256 to the manifest (atomically, under its lock)."""
    path = manifest_path(root)
    with file_lock(path):
        files = read_manifest(root)
        files[source.filename] = {"sha256": sha256, "size": size, "url": url,
                                  "recorded": datetime.now(UTC).isoformat(timespec="seconds")}
        write_json_atomic(path, {"version": 1, "files": dict(sorted(files.items()))})
    logger.info("recorded %s (%d bytes, sha256 %s) in %s", source.filename, size, sha256, path)


# -------------------------------------------------------------------------------------------- downloading


def fetch(source: Source, root=None, progress=True, verify=None, dest=None) -> Path:
    """The cached path of ``source``, downloading and verifying it first if needed.

    A file is published in the cache only once it is proven whole and right: its SHA-256 equals the pinned
    one (`Source.sha256`, else the one the manifest recorded at its first download); or, at a first download
    without a pinned hash, the server announced its length and it all arrived, or ``verify`` accepted it
    (then its size and SHA-256 are recorded in the manifest, and every later use is checked against them).
    ``verify(path)`` is an extra check (e.g. the checkpoint's identity) run on every download and cached file;
    it raises (e.g. `CheckpointError`) to refuse. ``dest`` overrides the cache path.

    Raises `OfflineError` (offline mode, or the network is unreachable) naming the URL and the exact path
    where to place the file by hand; `DownloadError` when a transfer fails (the ``.part`` file is kept and
    the next call resumes it) or when the file is not the expected one (the bad download is deleted). A
    cached file that does not match its pin is refused, never deleted (it may have been placed by hand).
    Concurrent calls for the same file (threads or processes) download it once (a lock on ``<dest>.lock``).
    """
    dest = Path(dest) if dest is not None else downloads_dir(root) / source.filename
    if os.path.lexists(dest):
        return _check_cached(dest, source, _pin(source, root), verify)
    if is_offline():
        raise OfflineError(
            f"{source.filename} is not in the cache and downloads are disabled ({OFFLINE_ENV}=1). "
            f"Download it from {_where_from(source)} and place it at {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _download_lock(dest, source):
        if os.path.lexists(dest):  # another process downloaded it meanwhile
            return _check_cached(dest, source, _pin(source, root), verify)
        pin = _pin(source, root)
        url = mirror_url(source)
        if url is None and source.url is None and source.drive_id is not None:
            part, url, whole = _drive_download(source, dest, progress), source.origin, False
        else:
            url = url or source.url
            part = dest.with_name(dest.name + ".part")
            whole = _http_download(url, dest, part, source, pin, progress)
        _verify_and_publish(part, dest, source, url, pin, verify, whole, root)
    return dest


@contextlib.contextmanager
def _download_lock(dest, source):
    """`file_lock` on ``dest``, saying so when another process holds it (a download can take minutes)."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(dest, timeout=0))
        except TimeoutError:
            logger.warning("waiting for another process downloading %s (lock %s.lock)", source.filename, dest)
            stack.enter_context(file_lock(dest))
        yield


def _check_cached(dest, source, pin, verify):
    """``dest`` if the cached file is a regular file matching its pin and ``verify``; refused (kept) otherwise."""
    problem = path_problem(dest)
    if problem:
        raise DownloadError(f"{problem}; it should be the cached download of {source.filename}. Move it away "
                            f"(it was not touched) and run again to download the file")
    if pin is not None:
        size = os.stat(dest).st_size
        actual = sha256_of(dest)
        if actual != pin.sha256 or (pin.size is not None and size != pin.size):
            raise DownloadError(
                f"the cached {dest} is not the expected file: SHA-256 {actual} ({size} bytes), expected "
                f"{pin.sha256} ({pin.size if pin.size is not None else '?'} bytes) {pin.where}. It was damaged "
                f"or replaced: delete it to download it again (it was not deleted); if the new file is the "
                f"one you want, remove its entry from {dest.parent / MANIFEST_NAME}")
    if verify is not None:
        try:
            verify(dest)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (the cached file {dest} was kept: delete or replace it and "
                                  "try again)") from e
    return dest


def _unreachable(source, dest, url, error):
    return OfflineError(
        f"cannot download {source.filename} from {url} ({type(error).__name__}: {error}). No network? "
        f"Download it elsewhere and place it at {dest}, or set {MIRROR_ENV} to a server holding it")


def _http_download(url, dest, part, source, pin, progress) -> bool:
    """Download ``url`` into ``part``, resuming it (HTTP Range); True when the server announced the length and
    every byte of it arrived (the transport proves the file whole), False when it could not tell.

    Every transport error (connection reset or refused mid-body, timeout, a chunked body cut short, a
    malformed response) raises `DownloadError` and keeps ``part``, so the next call resumes it.
    """
    pinned_size = pin is not None and pin.size is not None
    limit = pin.size if pinned_size else MAX_DOWNLOAD_BYTES
    why_limit = (f"its pinned size ({limit} bytes) {pin.where}" if pinned_size
                 else f"the limit of {limit} bytes (utils.downloads.MAX_DOWNLOAD_BYTES)")
    offset = part.stat().st_size if part.is_file() else 0
    if offset > limit:  # larger than the file can be: not a prefix of it
        part.unlink()
        offset = 0
    if offset and pin is not None and offset == pin.size:
        return False  # complete already: the pinned SHA-256 decides
    headers = {"User-Agent": "image_captioning"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to fetch: the partial file may be complete
            return False
        raise DownloadError(f"cannot download {source.filename} from {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise _unreachable(source, dest, url, e) from e
    except (http.client.HTTPException, ValueError) as e:  # a malformed status line or URL
        raise DownloadError(f"cannot download {source.filename} from {url}: {type(e).__name__}: {e}") from e
    with response:
        if offset and response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                raise DownloadError(f"{url}: asked to resume at byte {offset}, the server answered "
                                    f"{response.headers.get('Content-Range')!r}; delete {part} and retry")
            mode = "ab"
        else:  # the server ignored the Range header: start over
            offset, mode = 0, "wb"
        length = _content_length(response)
        total = offset + length if length is not None else None
        if total is not None and total > limit:
            raise DownloadError(f"{url} announces {total} bytes for {source.filename}, more than {why_limit}; "
                                "refusing it (nothing was written)")
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=source.filename, disable=not progress) as bar:
            try:  # read1: what arrived is written before an error can lose it (read() drops a partial chunk)
                while chunk := response.read1(_CHUNK):
                    if f.tell() + len(chunk) > limit:
                        break
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:  # resets, timeouts, IncompleteRead, ...
                partial = getattr(e, "partial", b"")
                if isinstance(partial, bytes) and f.tell() + len(partial) <= limit:
                    f.write(partial)
                raise DownloadError(f"download of {source.filename} from {url} interrupted after {f.tell()} "
                                    f"bytes ({type(e).__name__}: {e}); run again to resume from {part}") from e
            oversized = bool(chunk)
    if oversized:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url} sent more bytes for {source.filename} than {why_limit}: not the expected "
                            "file; the partial download was deleted")
    size = part.stat().st_size
    expected = total if total is not None else (pin.size if pin is not None else None)
    if expected is not None and size < expected:
        raise DownloadError(f"download of {source.filename} from {url} stopped at {size} of {expected} "
                            f"bytes; run again to resume from {part}")
    return total is not None and size == total


def _content_length(response):
    value = response.headers.get("Content-Length")
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is None or length >= 0 else None


def _content_range_start(value):
    try:  # "bytes 100-999/1000"
        return int(value.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def _drive_download(source, dest, progress):
    """Google Drive through gdown (it resumes from its own partial file); returns the staged file, which
    `_verify_and_publish` then checks like any other (gdown's length check is not relied upon)."""
    import gdown

    staging = dest.with_name(dest.name + ".gdown")
    try:
        gdown.download(id=source.drive_id, output=str(staging), quiet=not progress, resume=True)
    except Exception as e:  # gdown raises its own exceptions and requests' ConnectionError
        if isinstance(e, OSError | ConnectionError) or "connection" in type(e).__name__.lower():
            raise _unreachable(source, dest, source.origin, e) from e
        raise DownloadError(f"cannot download {source.filename} from {source.origin} with gdown: "
                            f"{type(e).__name__}: {e}. Run again to resume, or download it by hand and place "
                            f"it at {dest}") from e
    if not staging.is_file():
        raise DownloadError(f"gdown did not write {staging} for {source.origin}; download {source.filename} by "
                            f"hand and place it at {dest}")
    return staging


def sha256_of(path) -> str:
    """The SHA-256 (hex) of a regular file (a FIFO or device is refused, never read)."""
    with open_regular_file(path, max_bytes=None) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _verify_and_publish(part, dest, source, url, pin, verify, whole, root):
    """Publish ``part`` as ``dest`` only when proven whole and right (see `fetch`); otherwise delete it."""
    size = part.stat().st_size
    actual = sha256_of(part)
    problem = None
    if pin is not None and (actual != pin.sha256 or (pin.size is not None and size != pin.size)):
        problem = (f"SHA-256 mismatch: expected {pin.sha256} ({pin.size if pin.size is not None else '?'} bytes) "
                   f"{pin.where}, got {actual} ({size} bytes)")
    if problem is None and source.kind == "torch":
        problem = _not_a_torch_file(part)
    if problem:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{source.filename} downloaded from {url} is corrupt or not the expected file "
                            f"({problem}); it was deleted. Run again to retry, or place a good copy at {dest}")
    if verify is not None:
        try:
            verify(part)
        except CheckpointError as e:
            part.unlink(missing_ok=True)
            raise CheckpointError(f"{e} ({source.filename} downloaded from {url} was deleted; nothing was "
                                  f"published as {dest})") from e
    elif pin is None and not whole:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{source.filename} from {url} cannot be proven complete: its length was not announced (no "
            f"Content-Length, or fetched by gdown) and no SHA-256 is pinned for it; the download ({size} bytes) "
            f"was deleted. Use a server that sends Content-Length, pin its SHA-256 (Source(sha256=...)), or "
            f"place a verified copy at {dest}")
    os.replace(part, dest)
    if pin is None:
        _record(source, size, actual, url, root)
    logger.info("downloaded %s to %s", source.filename, dest)


def _not_a_torch_file(path):
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # zip archive (torch>=1.6) or legacy pickle
        return None
    if head.lstrip()[:1] == b"<":
        return "an HTML page, not a checkpoint (Google Drive's quota or confirmation page?)"
    return f"not a PyTorch checkpoint (starts with {head[:16]!r})"


# ------------------------------------------------------------------------------------------- whole models


def fetch_clip(name_or_source, root=None, progress=True) -> Path:
    """The path of an OpenAI CLIP ``.pt`` (downloaded and SHA-256-verified on first use)."""
    if isinstance(name_or_source, Source):
        return fetch(name_or_source, root, progress)
    if name_or_source not in CLIP_SOURCES:
        raise KeyError(f"unknown CLIP model {name_or_source!r}; known: {', '.join(CLIP_SOURCES)}")
    return fetch(CLIP_SOURCES[name_or_source], root, progress)


def fetch_checkpoint(name_or_spec, root=None, progress=True) -> Path:
    """The path of a ClipCap model's checkpoint, downloaded if needed, and checked to be that model's
    (`ModelSpec.expect`; a readable ClipCap checkpoint at least) before it is published or used."""
    from utils.convert.clipcap import check_clipcap_checkpoint

    spec = resolve_model(name_or_spec)
    return fetch(spec.checkpoint, root, progress,
                 verify=lambda path: check_clipcap_checkpoint(path, spec.expect, name=spec.name))


def fetch_gpt2_tokenizer(name="gpt2", root=None, progress=True):
    """A directory or hub name that ``utils.tokenizer.load_gpt2_tokenizer`` loads.

    A local directory is returned as is; another hub name goes to the hub and its cache. ``"gpt2"``: the
    Hugging Face cache when it already holds the tokenizer; otherwise ``vocab.json`` and ``merges.txt`` are
    fetched by this module's transport (from the mirror, else huggingface.co) straight into
    ``downloads/gpt2-tokenizer/``: verified and recorded like every download, files already there checked and
    never overwritten, and an unreachable network an `OfflineError` at once (not the hub's minutes of retries)
    naming both files and where to place them.
    """
    if os.path.isdir(name):
        return str(name)
    if name != "gpt2":
        return name  # another hub repository: the hub and its cache handle it
    directory = downloads_dir(root) / "gpt2-tokenizer"
    present = all(os.path.lexists(directory / local) for local in GPT2_TOKENIZER_FILES)
    if not present and not os.environ.get(MIRROR_ENV, "").strip() and _in_hf_cache(name):
        return name
    missing = []
    for local, source in GPT2_TOKENIZER_FILES.items():
        try:
            fetch(source, root, progress, dest=directory / local)
        except OfflineError as e:  # name every missing file at once
            missing.append(str(e))
    if missing:
        raise OfflineError("the GPT-2 tokenizer: " + "; ".join(missing))
    return str(directory)


def _in_hf_cache(name):
    from huggingface_hub import try_to_load_from_cache

    for repo in (name, f"openai-community/{name}"):
        found = [try_to_load_from_cache(repo, local) for local in GPT2_TOKENIZER_FILES]
        if all(isinstance(path, str) for path in found):
            return True
    return False


def spec_files(spec, root=None):
    """(source, cache path) of every file a model needs: what to place where for an offline install."""
    spec = resolve_model(spec)
    clip = spec.clip if isinstance(spec.clip, Source) else CLIP_SOURCES[spec.clip]
    files = [(spec.checkpoint, downloads_dir(root) / spec.checkpoint.filename),
             (clip, downloads_dir(root) / clip.filename)]
    if spec.tokenizer == "gpt2":
        files += [(s, downloads_dir(root) / "gpt2-tokenizer" / local) for local, s in GPT2_TOKENIZER_FILES.items()]
    return files


def saved_model_dir(name, root=None) -> Path:
    """``<model store>/<name>``; ValueError unless ``name`` is a plain name (`check_model_name`), so a name can
    never point outside the store ("", "..", "/abs", "a/b" are refused)."""
    return Path(root or home_dir()) / check_model_name(name)


def is_saved_model(directory, architecture="clipcap") -> bool:
    """Whether ``directory`` is a model this library saved: a real folder whose config.json (a regular file)
    names ``architecture`` ("clipcap"; a saved CLIP: "openai_clip"). Only such folders are ever replaced."""
    directory = Path(directory)
    if directory.is_symlink() or not directory.is_dir():
        return False
    try:
        config = json.loads(read_regular_file(directory / "config.json", max_bytes=1 << 20))
    except (UnsafePathError, OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("architecture") == architecture


def download_model(name_or_spec, root=None, progress=True):
    """Download (or find in the cache) every file of a ClipCap model; returns (checkpoint, clip, tokenizer)."""
    spec = resolve_model(name_or_spec)
    found, missing = [], []
    for get in (lambda: fetch_checkpoint(spec, root, progress), lambda: fetch_clip(spec.clip, root, progress),
                lambda: fetch_gpt2_tokenizer(spec.tokenizer, root, progress)):
        try:
            found.append(get())
        except OfflineError as e:  # report every missing file at once, not one per attempt
            missing.append(str(e))
    if missing:
        raise OfflineError(f"model {spec.name!r} cannot be prepared offline:\n  - " + "\n  - ".join(missing))
    return tuple(found)


def convert_model(checkpoint, clip, tokenizer, directory, name=None, overwrite=False, clip_name=None,
                  **clipcap_kwargs):
    """Convert an official ClipCap ``.pt`` + CLIP ``.pt`` + tokenizer and save it to ``directory`` atomically.

    ``clip_name``: the OpenAI name of that CLIP ("ViT-B/32"), recorded in the config (``clip_name``) so that
    `ClipCap.save_official` can say which CLIP the exported checkpoint needs.

    The model is written to a temporary sibling directory and renamed, so an interrupted conversion never
    leaves a half-saved model that would be picked up later. An existing ``directory`` is replaced only when
    it is empty or a saved ClipCap (`is_saved_model`) and ``overwrite``; anything else raises `UnsafePathError`
    before the conversion starts (nothing is deleted). ``name`` (default: the folder's name) goes into the
    config; it must be a plain model name. Returns the loaded `ClipCap`.
    """
    from models.image_captioning.clip_cap import ClipCap
    from models.siamese.clip import CLIP
    from utils.tokenizer import load_gpt2_tokenizer

    directory = Path(directory)
    name = check_model_name(name if name is not None else directory.name)
    check_replaceable(directory, is_saved_model, overwrite)  # refuse before the (long) conversion
    # ClipCap needs only the image encoder: the text encoder is neither converted nor saved
    clip_model = clip if not isinstance(clip, str | os.PathLike) else CLIP.from_pretrained(str(clip), visual_only=True)
    tok = load_gpt2_tokenizer(str(tokenizer)) if isinstance(tokenizer, str | os.PathLike) else tokenizer
    # name=None: from_pretrained would save into the model store itself; we save once, atomically, below
    model = ClipCap.from_pretrained(str(checkpoint), clip=clip_model, tokenizer=tok, **clipcap_kwargs)
    model.config["name"] = name
    if clip_name is not None:
        model.config["clip_name"] = str(clip_name)
    model.save(directory, overwrite=overwrite)  # a complete new folder renamed into place (replace_dir)
    return model


def get_pretrained(name_or_spec, root=None, force_convert=False, progress=True):
    """A ready `ClipCap` by name: downloaded, verified and converted on first use, then loaded from disk.

    Example::

        model = get_pretrained("coco")   # pretrained_models/coco/ afterwards; later calls just load it
    """
    from utils.convert.common import CheckpointError

    spec = resolve_model(name_or_spec)
    directory = saved_model_dir(spec.name, root)
    if is_saved_model(directory) and not force_convert:
        from models.image_captioning.clip_cap import ClipCap

        return ClipCap.load(str(directory))
    already_cached = (downloads_dir(root) / spec.checkpoint.filename).is_file()
    checkpoint, clip, tokenizer = download_model(spec, root, progress)
    try:
        return convert_model(checkpoint, clip, tokenizer, directory, name=spec.name, overwrite=force_convert,
                             clip_name=spec.clip if isinstance(spec.clip, str) else None, **spec.clipcap_kwargs)
    except CheckpointError as e:
        if not already_cached:  # we downloaded it just now: do not keep a file that cannot be converted
            checkpoint.unlink(missing_ok=True)
            raise CheckpointError(f"{e} (the downloaded file {checkpoint} was deleted)") from e
        raise CheckpointError(f"{e} (delete or replace {checkpoint} and try again)") from e


def _describe_pin(source, manifest):
    if source.sha256:
        return f"sha256={source.sha256} (pinned)"
    entry = manifest.get(source.filename) if isinstance(manifest, dict) else None
    if entry:
        return f"sha256={entry['sha256']} ({entry.get('size')} bytes, recorded at its first download)"
    return "no published SHA-256: size and SHA-256 are recorded at its first download, then checked"


def describe_sources(root=None):
    """Lines describing every known name, its files, their origin, cache path and pinned or recorded
    SHA-256 (for the CLI)."""
    try:
        manifest = read_manifest(root)
    except DownloadError as e:
        manifest = None
        lines = [f"warning: {e}"]
    else:
        lines = []
    lines.append("ClipCap models:")
    for spec in MODELS.values():
        lines.append(f"  {spec.name}: {spec.description} (CLIP {spec.clip}) -> {saved_model_dir(spec.name, root)}")
        for source, path in spec_files(spec, root):
            lines.append(f"      {source.filename:28s} {source.origin}\n      {'':28s} -> {path}\n"
                         f"      {'':28s} {_describe_pin(source, manifest)}")
    lines.append("CLIP models:")
    for name, source in CLIP_SOURCES.items():
        lines.append(f"  {name}: {source.filename} sha256={source.sha256}")
    return lines
