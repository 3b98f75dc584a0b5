"""Transport: verified, resumable downloads of single files into the model store's ``downloads/`` cache.

This module knows files, not models: a `Source` (name, origin, pinned hash; `utils.download_manifest`)
goes in, a verified local path comes out. Which files make which model lives beside the models:
`models.image_captioning.presets` (the official ClipCap checkpoints) and `models.siamese.presets` (OpenAI's
CLIP files); fetching and converting a whole model is `models.image_captioning.pretrained`.

What a download guarantees (`fetch`):

- **Nothing unproven is published.** A download goes to ``<file>.part`` and is renamed into the cache only
  once proven whole and right: its SHA-256 equals the pinned one; or, with no pinned hash, the server
  announced its length and every byte arrived, or (Google Drive, no length) the caller's ``verify`` check
  (e.g. a ClipCap checkpoint's identity) accepted it; a checkpoint (``kind="torch"``) without a pinned hash
  also has every zip record's CRC-32 checked first (a legacy, non-zip one: its structure). A bad download is
  deleted.
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

Another client may download from a file's origin (``fetch(..., client=)``: huggingface_hub for the hub's
files); what it downloads is published under the same rules.

Environment variables:

- ``IMAGE_CAPTIONING_MIRROR=<base URL>``: fetch every file from ``<base URL>/<file name>`` instead of its
  origin (file names: see ``python main.py download --list``). Checksums are still verified.
- ``IMAGE_CAPTIONING_OFFLINE=1``: never download; a missing file raises `OfflineError` saying which file
  to put where. The same error is raised when the network cannot be reached.
- ``IMAGE_CAPTIONING_HOME=<dir>``: where the model store lives (`utils.model_store`).

Example::

    from utils.downloads import Source, fetch
    path = fetch(Source("weights.pt", url="https://example.org/weights.pt", sha256="..."))
"""

import contextlib
import http.client
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from utils.convert.common import CheckpointError
from utils.download_manifest import (
    MANIFEST_NAME,
    DownloadError,
    OfflineError,
    Source,
    downloads_dir,
    pin_of,
    record,
    sha256_of,
)
from utils.file_utils import file_lock, path_problem

__all__ = ["MAX_DOWNLOAD_BYTES", "MIRROR_ENV", "OFFLINE_ENV", "DownloadError", "OfflineError", "Source",
           "downloads_dir", "fetch", "is_offline", "mirror_url", "sha256_of"]

logger = logging.getLogger(__name__)

MIRROR_ENV = "IMAGE_CAPTIONING_MIRROR"
OFFLINE_ENV = "IMAGE_CAPTIONING_OFFLINE"

_CHUNK = 1 << 20
_TIMEOUT_S = 60  # seconds without a byte before a transfer counts as failed
#: The most bytes accepted for a file without a pinned size (the largest official file is ~1.3 GB).
MAX_DOWNLOAD_BYTES = 8 * 1024**3
#: A downloaded zip's records may unpack to at most this many times its size when their CRCs are checked (torch
#: stores them uncompressed: 1x), so a small crafted archive cannot make the check read without end.
_ZIP_CHECK_MULTIPLE = 4

# ------------------------------------------------------------------------------------------------ places

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


# -------------------------------------------------------------------------------------------- downloading


def fetch(source: Source, root=None, progress=True, verify=None, dest=None, client=None) -> Path:
    """The cached path of ``source``, downloading and verifying it first if needed.

    A file is published in the cache only once it is proven whole and right: its SHA-256 equals the pinned
    one (`Source.sha256`, else the one the manifest recorded at its first download); or, at a first download
    without a pinned hash, the server announced its length and it all arrived, or ``verify`` accepted it
    (then its size and SHA-256 are recorded in the manifest, and every later use is checked against them).
    ``verify(path)`` is an extra check (e.g. the checkpoint's identity) run on every download and cached file;
    it raises (e.g. `CheckpointError`) to refuse. ``dest`` overrides the cache path. ``client(dest)`` downloads
    from the origin instead of this module's HTTP (not from a mirror): it returns the path of a file it proved
    whole (a staging path on ``dest``'s file system), or raises `OfflineError` / `DownloadError`; the file is
    then checked and published as this module's own downloads are.

    Raises `OfflineError` (offline mode, or the network is unreachable) naming the URL and the exact path
    where to place the file by hand; `DownloadError` when a transfer fails (the ``.part`` file is kept and
    the next call resumes it) or when the file is not the expected one (the bad download is deleted). A
    cached file that does not match its pin is refused, never deleted (it may have been placed by hand).
    Concurrent calls for the same file (threads or processes) download it once (a lock on ``<dest>.lock``).
    """
    dest = Path(dest) if dest is not None else downloads_dir(root) / source.filename
    if os.path.lexists(dest):
        return _check_cached(dest, source, pin_of(source, root), verify)
    if is_offline():
        raise OfflineError(
            f"{source.filename} is not in the cache and downloads are disabled ({OFFLINE_ENV}=1). "
            f"Download it from {_where_from(source)} and place it at {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _download_lock(dest, source):
        if os.path.lexists(dest):  # another process downloaded it meanwhile
            return _check_cached(dest, source, pin_of(source, root), verify)
        pin = pin_of(source, root)
        url = mirror_url(source)
        if url is None and client is not None:
            part, url, whole = Path(client(dest)), source.origin, True
        elif url is None and source.url is None and source.drive_id is not None:
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


def _verify_and_publish(part, dest, source, url, pin, verify, whole, root):
    """Publish ``part`` as ``dest`` only when proven whole and right (see `fetch`); otherwise delete it."""
    size = part.stat().st_size
    actual = sha256_of(part)
    problem = None
    if pin is not None and (actual != pin.sha256 or (pin.size is not None and size != pin.size)):
        problem = (f"SHA-256 mismatch: expected {pin.sha256} ({pin.size if pin.size is not None else '?'} bytes) "
                   f"{pin.where}, got {actual} ({size} bytes)")
    if problem is None and source.kind == "torch":
        # without a pinned SHA-256, what is recorded below is trusted from now on: every record's CRC first
        problem = _not_a_torch_file(part, check_records=pin is None and (whole or verify is not None))
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
        record(source, size, actual, url, root)
    logger.info("downloaded %s to %s", source.filename, dest)


def _not_a_torch_file(path, check_records=False):
    """Why ``path`` is not a PyTorch checkpoint, or None. ``check_records``: a zip's every record is also read
    (in chunks) and checked against its CRC-32, so a flipped byte anywhere is caught before the file's hash
    is recorded; a legacy, non-zip file has no checksums, so its structure is checked instead (its pickles,
    and every storage present at its declared length: a file cut short or spliced, though not a flipped byte
    inside a storage)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):  # zip archive (torch>=1.6)
        return _zip_problem(path) if check_records else None
    if head[:1] == b"\x80":  # legacy pickle
        return _legacy_problem(path) if check_records else None
    if head.lstrip()[:1] == b"<":
        return "an HTML page, not a checkpoint (Google Drive's quota or confirmation page?)"
    return f"not a PyTorch checkpoint (starts with {head[:16]!r})"


def _legacy_problem(path):
    """Why the legacy checkpoint ``path`` is damaged (`utils.convert.torch_file.read_checkpoint`'s structural
    check: storages skipped over, not read), or None."""
    from utils.convert.torch_file import read_checkpoint

    try:
        read_checkpoint(path, shapes_only=True)
    except CheckpointError as e:
        return f"a damaged legacy checkpoint: {e}"
    return None


def _zip_problem(path):
    """Why the zip ``path`` is damaged (a record failing its CRC-32, a bad header, an unreadable directory), or
    None; one streaming pass, `_CHUNK` bytes at a time, bounded by `_ZIP_CHECK_MULTIPLE` times the file."""
    size = os.stat(path).st_size
    name = None
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            claimed = sum(info.file_size for info in infos)
            if claimed > _ZIP_CHECK_MULTIPLE * size + _CHUNK:
                return (f"its zip records claim {claimed} bytes in a file of {size} bytes: a corrupt archive "
                        "or a zip bomb")
            for info in infos:
                name = info.filename
                with archive.open(info) as member:
                    while member.read(_CHUNK):
                        pass
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError, ValueError) as e:
        where = f"its zip record {name!r}" if name is not None else "its zip directory"
        return f"{where} is damaged ({type(e).__name__}: {e})"
    return None
