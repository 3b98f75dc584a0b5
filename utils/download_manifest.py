"""What a downloadable file is and must be: `Source` (its name, origin and the hash pinned in code) and the
download manifest (the size and SHA-256 recorded at a file's first verified download: trust on first use).

The transport (`utils.downloads.fetch`) asks `pin_of` what a file must be before it publishes or uses it,
and `record`s a file that had no pin once it is proven whole. The manifest lives in
``<store>/downloads/manifest.json``; a damaged one raises `DownloadError` and is never silently replaced
(it is what detects a file that changed since its first download).

Example::

    source = Source("weights.pt", url="https://example.org/weights.pt", kind="torch")
    pin_of(source)          # None before its first download, then a Pin(sha256, size, where)
"""

import hashlib
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from utils.file_utils import file_lock, open_regular_file, read_json, write_json_atomic
from utils.model_store import home_dir

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_MANIFEST_MAX_BYTES = 16 * 1024**2


class DownloadError(RuntimeError):
    """A file could not be downloaded, or what was downloaded is not what was expected."""


class OfflineError(DownloadError):
    """A file is needed, is not in the cache, and cannot be downloaded (offline mode or no network)."""


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


def downloads_dir(root=None) -> Path:
    """``<store>/downloads``: the cache of raw downloaded files (``root`` defaults to the model store)."""
    return Path(root or home_dir()) / "downloads"


def sha256_of(path) -> str:
    """The SHA-256 (hex) of a regular file (a FIFO or device is refused, never read)."""
    with open_regular_file(path, max_bytes=None) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class Pin:
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
        data = read_json(path, _MANIFEST_MAX_BYTES)
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("sha256"), str)
                                                  for e in files.values()):
            raise ValueError("'files' must map file names to {sha256, size}")
    except (OSError, ValueError, KeyError, TypeError) as e:  # UnsafePathError, JSONDecodeError are ValueErrors
        raise DownloadError(
            f"the download manifest {path} is damaged ({type(e).__name__}: {e}). It records the SHA-256 of each "
            f"file at its first download; repair it, or delete it to trust the cached files again") from e
    return files


def pin_of(source, root=None) -> Pin | None:
    """The SHA-256 a file must have: `Source.sha256` (pinned in code, always wins), else the manifest's."""
    if source.sha256:
        return Pin(source.sha256.lower(), source.size, "(pinned in code, Source.sha256)")
    entry = read_manifest(root).get(source.filename)
    if entry is None:
        return None
    return Pin(entry["sha256"], entry.get("size"),
               f"(recorded in {manifest_path(root)} at its first download, {entry.get('recorded', '?')}, "
               f"from {entry.get('url', '?')})")


def record(source, size, sha256, url, root=None):
    """Trust on first use: add the file's size and SHA-256 to the manifest (atomically, under its lock)."""
    path = manifest_path(root)
    with file_lock(path):
        files = read_manifest(root)
        files[source.filename] = {"sha256": sha256, "size": size, "url": url,
                                  "recorded": datetime.now(UTC).isoformat(timespec="seconds")}
        write_json_atomic(path, {"version": 1, "files": dict(sorted(files.items()))})
    logger.info("recorded %s (%d bytes, sha256 %s) in %s", source.filename, size, sha256, path)


def forget(source, sha256, root=None) -> bool:
    """Remove the manifest's entry for ``source`` if it records ``sha256`` (under the manifest's lock): for a
    file the library downloaded, recorded and then deleted (it could not be converted), so that its hash does
    not stay pinned against every later, good download. True when an entry was removed; an entry recording
    another hash (a file recorded by someone else meanwhile) is kept."""
    path = manifest_path(root)
    with file_lock(path):
        files = read_manifest(root)
        entry = files.get(source.filename)
        if entry is None or entry["sha256"] != sha256:
            return False
        del files[source.filename]
        write_json_atomic(path, {"version": 1, "files": dict(sorted(files.items()))})
    logger.info("removed %s (sha256 %s) from %s: the file was deleted", source.filename, sha256, path)
    return True


def describe_pin(source, manifest):
    """One line for ``download --list``: the file's pinned or recorded SHA-256, or that it has none yet
    (``manifest``: `read_manifest`'s answer, None when it could not be read)."""
    if source.sha256:
        return f"sha256={source.sha256} (pinned)"
    entry = manifest.get(source.filename) if isinstance(manifest, dict) else None
    if entry:
        return f"sha256={entry['sha256']} ({entry.get('size')} bytes, recorded at its first download)"
    return "no published SHA-256: size and SHA-256 are recorded at its first download, then checked"
