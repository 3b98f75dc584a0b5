"""When a stored caption still answers for an image file: one rule for ``caption`` / ``predict`` (map.json),
`cached_answers` and ``batch --skip-existing`` (its records).

A stored caption answers when it was made with the same settings (`prediction.generation_settings`: the
model's identity, the method and its arguments, ``exif_transpose``) from the same bytes: the stored entry's
``size`` and ``sha256`` equal those of the file as it is now (`content_stamp`). Size and modification time
would be cheaper (a ``stat``), but a file rewritten with its size and time kept (``os.utime``, a copy with
``cp -p`` or ``rsync -t`` of another version, a coarse clock) would keep a caption of other pixels.

What it costs: the stamp of an image being captioned is taken from the very bytes that are decoded (no
second read); an image answered from storage is read once to be hashed (SHA-256, about 1 GB/s here), which
is what a rerun of thousands of already captioned images pays instead of loading the model.
Entries without a ``sha256`` (written before this rule) never answer: they are captioned again. Nor does
anything for a request of random draws without a seed (settings marked ``"unseeded"``,
`prediction.generation_settings`): it asks for a new draw, which no stored caption is.
"""

import hashlib

from utils.file_utils import DEFAULT_MAX_BYTES, UnsafePathError, open_regular_file

_CHUNK = 1 << 20


def content_stamp(data) -> dict:
    """``{"size", "sha256"}`` of bytes (what the caption was made from)."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def stream_stamp(f, max_bytes=DEFAULT_MAX_BYTES) -> dict | None:
    """`content_stamp` of what a binary file object holds, read in chunks; None past ``max_bytes``."""
    digest, size = hashlib.sha256(), 0
    while chunk := f.read(_CHUNK):
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            return None
        digest.update(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def file_stamp(path, max_bytes=DEFAULT_MAX_BYTES) -> dict | None:
    """`content_stamp` of the regular file ``path`` as it is now; None when it cannot be read (missing,
    special file, larger than ``max_bytes``): such a file is never fresh."""
    try:
        with open_regular_file(path, max_bytes) as f:
            return stream_stamp(f, max_bytes)
    except (OSError, UnsafePathError):
        return None


def stamp_matches(stored, stamp) -> bool:
    """Whether the stored entry or record ``stored`` was made from the bytes whose stamp is ``stamp``."""
    return (stamp is not None and isinstance(stored, dict) and isinstance(stored.get("sha256"), str)
            and stored.get("size") == stamp["size"] and stored["sha256"] == stamp["sha256"])


def answers(stored, settings, stamp) -> bool:
    """Whether ``stored`` (a map.json entry or a batch record) answers for the file whose stamp is ``stamp``
    (a dict or a callable giving it, called only when the settings match: a file is read only when needed)."""
    if settings.get("unseeded") or not isinstance(stored, dict) or stored.get("settings") != settings:
        return False
    return stamp_matches(stored, stamp() if callable(stamp) else stamp)


def is_fresh(stored, settings, path, max_bytes=DEFAULT_MAX_BYTES) -> bool:
    """`answers` for the local file ``path`` as it is now (read and hashed only when the settings match)."""
    return answers(stored, settings, lambda: file_stamp(path, max_bytes))
