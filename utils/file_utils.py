"""Safe file operations: the one place where the library writes, replaces, locks and reads files.

Every path the library writes, deletes or reads goes through these helpers, which hold its guarantees:

- **Names** (`check_model_name`): a model name is one plain path component (letters, digits, ``._-``,
  not ``.``/``..``, no separators), so a name can never reach outside the model store.
- **Atomic writes** (`atomic_write`, `write_json_atomic`): a temporary file in the same folder, flushed,
  fsync'ed and renamed over the target; readers see the old file or the new one, never half of one. The file
  gets the permissions a plain ``open(path, "w")`` would give (``0o666 & ~umask``), not ``mkstemp``'s 0600.
- **Folders** (`replace_dir`): a complete new folder is built beside the target and renamed into place; an
  existing target is replaced only when the caller proved it is one of ours (``is_ours``), otherwise
  `UnsafePathError`. Nothing is deleted that this library did not create.
- **Locks** (`file_lock`): an inter-process lock (``flock`` on POSIX) on ``<path>.lock``, so concurrent runs
  can read-merge-write a shared file without losing each other's results; the lock file is deleted on release.
- **Crash recovery** (`recover_replacements`): every folder built beside a target or renamed aside carries a
  marker and is ``flock``-ed by its writer; the next run that touches the target finishes (publishes a complete
  staged copy) or rolls back (renames the previous copy back) a replacement whose writer was killed, and
  removes the stale temporaries of dead writers: only entries named and marked as ours.
- **Bounded reads** (`read_regular_file`): only regular files are read (a FIFO, device or socket gets its
  own error instead of blocking or reading forever), and never more than ``max_bytes``; JSON files through
  `read_json`, which also bounds their nesting (`MAX_JSON_DEPTH`: no RecursionError from a crafted file).

Example::

    from utils.file_utils import check_model_name, file_lock, write_json_atomic
    check_model_name("my_coco")                  # ValueError for "", "..", "a/b", "/tmp/x"
    with file_lock("out/map.json"):
        write_json_atomic("out/map.json", {"a.jpg": "a cat."})
"""

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from filelock import FileLock, Timeout

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

#: The default cap on the bytes read from one input file (images, lists of paths).
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class UnsafePathError(ValueError):
    """A path that the library refuses to write, replace or read (it could destroy or hang on data)."""


def check_model_name(name) -> str:
    """``name`` if it is a plain model name, else ValueError saying what a name may be.

    A name is one path component of 1-128 characters: letters, digits, ``.``, ``_`` and ``-``, starting with
    a letter or digit (so never ``""``, ``.``, ``..``, a hidden name, an absolute path or ``a/b``).
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid model name {name!r}: a name is one plain folder name of letters, digits, "
                         "'.', '_' and '-' (starting with a letter or digit, at most 128 characters); "
                         "to write somewhere else give a directory (--output DIR)")
    return name


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, racily, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    return 0o777 & ~_umask()


def atomic_write(path, data, mode="w", encoding="utf-8"):
    """Write ``data`` (str for mode "w", bytes for "wb") to ``path`` atomically; returns the Path.

    The parent folder is created if needed. On any error (KeyboardInterrupt included) the target is left as
    it was and the temporary file is removed.
    """
    with atomic_open(path, mode, encoding=encoding) as f:
        f.write(data)
    return Path(path)


_LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def json_text(data, indent=1, **dumps_kwargs) -> str:
    """``json.dumps(data)`` with non-ASCII kept, and lone surrogates (a file name's undecodable bytes, which
    Python holds as ``\\udc80``-``\\udcff``) written as ``\\uXXXX`` escapes: valid UTF-8 that ``json.loads``
    reads back to the same string (so ``os.fsencode`` gives back the name's bytes)."""
    text = json.dumps(data, indent=indent, ensure_ascii=False, **dumps_kwargs)
    return _LONE_SURROGATE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def write_json_atomic(path, data, indent=1):
    """`atomic_write` of ``data`` as JSON (UTF-8, non-ASCII kept, lone surrogates escaped: `json_text`)."""
    return atomic_write(path, json_text(data, indent=indent))


def _temp_file_entries(path):
    """The entries of ``path``'s folder that may be `atomic_open` temporaries of ``path``."""
    try:
        return [e for e in os.scandir(path.parent) if e.name.startswith(f".{path.name}.~w")]
    except OSError:
        return []


@contextlib.contextmanager
def atomic_open(path, mode="w", encoding="utf-8", newline=None):
    """An atomic write for writers that need a file object (``np.savez``, ``csv``): yields the temporary file,
    which replaces ``path`` only when the block ends without error (umask-respecting permissions).

    Example::

        with atomic_open("out/emb.npz", "wb") as f:
            np.savez(f, embeddings=x)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(path.parent, _temp_file_entries(path), {"removed": []})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.~w{os.getpid()}-", suffix=".tmp", dir=path.parent)
    try:
        _lock_fd(fd)  # tells a later run that this temporary's writer is alive (`recover_replacements`)
        os.fchmod(fd, default_file_mode())
        text = {} if "b" in mode else {"encoding": encoding, "newline": newline}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


#: The marker file inside every folder this library builds beside a target or renames aside: JSON saying whose
#: it is (``library``), for which target (``target``) and in which state: "writing" (a staging folder being
#: filled), "complete" (a staging folder ready to publish), "old" (the previous copy, renamed aside) or "trash"
#: (a folder being deleted). Only folders carrying it are ever finished, rolled back or removed by recovery.
PARTIAL_MARKER = ".image_captioning.partial"
_LIBRARY = "image_captioning"
_MARKER_MAX_BYTES = 4096
_STATES = ("writing", "complete", "old", "trash")
#: ``.<target>.<pid>-<random>.tmp`` (staging) and ``.<target>.old.<pid>-<random>`` (previous copy or trash)
_STAGING_RE = re.compile(r"\.(?P<target>.+)\.\d+-[A-Za-z0-9_]+\.tmp")
_OLD_RE = re.compile(r"\.(?P<target>.+)\.old\.\d+-[A-Za-z0-9_]+")
#: atomic_open's temporaries: ``.<name>.~w<pid>-<random>.tmp``
_TEMP_FILE_RE = re.compile(r"\.(?P<target>.+)\.~w\d+-[A-Za-z0-9_]+\.tmp")


def _lock_fd(fd, blocking=True) -> bool:
    """``flock`` an open descriptor (a folder's or a file's) exclusively; False when ``blocking`` is off and
    another process holds it. The lock lives as long as the descriptor, follows the inode through renames
    and dies with its process (kill -9 included): how recovery tells a live writer from a dead one."""
    if fcntl is None:  # no flock (Windows): every writer is taken as alive, nothing is recovered
        return blocking
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _open_dir_locked(path, blocking=True):
    """An open descriptor on folder ``path``, locked (`_lock_fd`), or None when busy or gone."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    if _lock_fd(fd, blocking):
        return fd
    os.close(fd)
    return None


def _write_marker(directory, target, state):
    """Write (atomically) the `PARTIAL_MARKER` of ``directory``."""
    atomic_write(Path(directory) / PARTIAL_MARKER,
                 json.dumps({"library": _LIBRARY, "target": target, "state": state, "pid": os.getpid()}))


def _read_marker(directory):
    """The marker dict of ``directory`` (a real folder holding our marker as a small regular file), or None."""
    directory = Path(directory)
    if directory.is_symlink() or not directory.is_dir():
        return None
    try:
        marker = json.loads(read_regular_file(directory / PARTIAL_MARKER, _MARKER_MAX_BYTES))
    except (OSError, ValueError):
        return None
    if (not isinstance(marker, dict) or marker.get("library") != _LIBRARY
            or not isinstance(marker.get("target"), str) or marker.get("state") not in _STATES):
        return None
    return marker


def _unique_sibling(target, kind):
    """A fresh unused name beside ``target``: ``.<name>.<pid>-<rnd>.tmp`` (kind "tmp") or
    ``.<name>.old.<pid>-<rnd>`` (kind "old"); created as an empty folder (mkdtemp), so no one else takes it."""
    target = Path(target)
    prefix = f".{target.name}.{os.getpid()}-" if kind == "tmp" else f".{target.name}.old.{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp" if kind == "tmp" else "", dir=target.parent))


def _remove_marked_dir(path):
    """Delete a folder of ours, its marker last: a deletion killed half-way leaves a folder that is still
    recognisable (and so removed by the next recovery), never an anonymous half folder."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path):
            if entry.name == PARTIAL_MARKER:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / PARTIAL_MARKER)
        os.rmdir(path)


@contextlib.contextmanager
def staging_dir(target):
    """A new empty folder beside ``target`` (same file system, so it can be renamed onto it), removed on
    error; yields its Path. Use with `publish_dir`, or through `replace_dir`.

    The folder is ``.<target>.<pid>-<random>.tmp``, locked (``flock``) by this process until the block ends and
    marked (`PARTIAL_MARKER`, "writing"): if the process dies (kill -9, power), the next run that touches
    ``target`` removes it (`recover_replacements`, which is run here first).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_replacements(target.parent, target.name)
    staging = _unique_sibling(target, "tmp")
    fd = _open_dir_locked(staging)
    try:
        os.chmod(staging, default_dir_mode())
        _write_marker(staging, target.name, "writing")
        yield staging
    finally:
        try:
            if os.path.lexists(staging):  # not published: made by this call, so ours (marker or not)
                _remove_marked_dir(staging)
        finally:
            if fd is not None:
                os.close(fd)


def publish_dir(staging, target, is_ours=None, overwrite=True):
    """Rename the complete folder ``staging`` (from `staging_dir`) to ``target``.

    An existing ``target`` is replaced only when it is empty, or when ``overwrite`` and ``is_ours(target)`` (a
    folder this library wrote, e.g. a saved model); it is first renamed aside, then the old copy (ours)
    removed. Raises `UnsafePathError` for anything else: an existing file, a symlink, a folder that is not
    ours, or one that is ours without ``overwrite``.

    Crash-safe: the staging folder is marked "complete" first and the previous copy "old" before it is renamed
    aside, so a process killed between the two renames leaves a state the next run finishes
    (`recover_replacements` publishes the complete copy); killed while deleting the old copy, it leaves a
    marked folder that the next run removes.
    """
    staging, target = Path(staging), Path(target)
    if _read_marker(staging) is not None:
        _write_marker(staging, target.name, "complete")
    if not os.path.lexists(target):
        _rename_published(staging, target)
        return target
    check_replaceable(target, is_ours, overwrite)
    target_fd = _lock_target(target)  # held while the previous copy is renamed aside and deleted
    try:
        _write_marker(target, target.name, "old")
        old = _unique_sibling(target, "old")
        os.rmdir(old)  # a fresh unique name to rename the previous folder to
        os.rename(target, old)
        try:
            _rename_published(staging, target)
        except BaseException:
            os.rename(old, target)  # put the previous one back
            with contextlib.suppress(OSError):
                os.unlink(target / PARTIAL_MARKER)
            raise
        _write_marker(old, target.name, "trash")
        _remove_marked_dir(old)
    finally:
        if target_fd is not None:
            os.close(target_fd)
    return target


def _lock_target(target):
    """`_open_dir_locked` on the folder now at ``target`` (retried if another writer replaced it meanwhile)."""
    while True:
        fd = _open_dir_locked(target)
        with contextlib.suppress(FileNotFoundError):
            if fd is not None and not os.path.samestat(os.fstat(fd), os.stat(target)):
                os.close(fd)
                continue
        return fd


def _rename_published(staging, target):
    """Rename ``staging`` to ``target``, then drop its marker (a published folder carries none)."""
    os.rename(staging, target)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(target) / PARTIAL_MARKER)


def remove_dir(path):
    """Delete a folder of ours (e.g. an old checkpoint) so that a kill half-way leaves nothing anonymous: it is
    marked "trash" and renamed to ``.<name>.old.<pid>-<random>`` first, then deleted marker last; the next
    `recover_replacements` on its parent finishes a deletion that was killed."""
    path = Path(path)
    fd = _open_dir_locked(path)
    try:
        _write_marker(path, path.name, "trash")
        trash = _unique_sibling(path, "old")
        os.rmdir(trash)
        os.rename(path, trash)
        _remove_marked_dir(trash)
    finally:
        if fd is not None:
            os.close(fd)


def recover_replacements(parent, name=None) -> dict:
    """Finish or roll back the folder replacements and deletions that a dead process left in ``parent`` (for
    target ``name`` only, or every target), and remove its temporaries; returns what was done
    (``{"published": [...], "restored": [...], "removed": [...]}``, paths).

    Only entries of ours are touched: folders named like `staging_dir` / `publish_dir` names
    (``.<name>.<pid>-<rnd>.tmp``, ``.<name>.old.<pid>-<rnd>``) that carry our `PARTIAL_MARKER` for that very
    target, and `atomic_open` temporaries (``.<name>.~w<pid>-<rnd>.tmp`` files); and only when no live process
    holds their lock (``flock``, released by the kernel when its process dies, whatever its pid became).
    For a target that is missing: a complete staged copy is published (the new model), else the previous copy
    is renamed back. Every other stale staged, previous or trashed copy is removed.
    """
    parent = Path(parent)
    done = {"published": [], "restored": [], "removed": []}
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(".")
                   and (name is None or e.name.startswith(f".{name}."))]
    except OSError:  # no such folder (nothing to recover), or unreadable (nothing we may touch)
        return done
    _remove_stale_temp_files(parent, entries, done)
    held, by_target = [], {}
    try:
        for entry in entries:
            found = _stale_partial(entry, name, held)
            if found is not None:
                by_target.setdefault(found[0]["target"], []).append(found)
        for target, partials in by_target.items():
            _recover_target(parent / target, partials, done)
        for target in ([name] if name is not None else by_target):
            _drop_stale_target_marker(parent / target)
    finally:
        for fd in held:
            os.close(fd)
    return done


def _stale_partial(entry, name, held):
    """``(marker, path)`` for a folder of ours left by a dead process (its lock acquired and kept in
    ``held`` while recovering), else None."""
    if not entry.is_dir(follow_symlinks=False):
        return None
    match = _STAGING_RE.fullmatch(entry.name) or _OLD_RE.fullmatch(entry.name)
    if match is None:
        return None
    marker = _read_marker(entry.path)
    if marker is None or marker["target"] != match.group("target") or (name is not None and marker["target"] != name):
        return None
    if (marker["state"] in ("writing", "complete")) != (match.re is _STAGING_RE):
        return None  # a staging state on an "old" name, or the reverse: not a folder we would have written
    fd = _open_dir_locked(entry.path, blocking=False)
    if fd is None:
        return None  # its writer is alive
    held.append(fd)
    marker = _read_marker(entry.path)  # re-read under the lock: the writer may have moved on meanwhile
    if marker is None or not os.path.isdir(entry.path):
        return None
    return marker, Path(entry.path)


def _recover_target(target, partials, done):
    """Make ``target`` whole again from its stale ``partials``, then remove the rest (see
    `recover_replacements`)."""
    if not os.path.lexists(target):
        complete = [p for m, p in partials if m["state"] == "complete"]
        previous = [p for m, p in partials if m["state"] == "old"]
        for candidates, kind in ((complete, "published"), (previous, "restored")):
            if candidates:
                chosen = max(candidates, key=lambda p: p.stat().st_mtime_ns)
                _rename_published(chosen, target)
                done[kind].append(str(target))
                partials = [(m, p) for m, p in partials if p != chosen]
                break
    for _, path in partials:
        with contextlib.suppress(OSError):
            _remove_marked_dir(path)
            done["removed"].append(str(path))


def _drop_stale_target_marker(target):
    """Remove a marker that a killed writer left inside a live ``target`` (killed just after marking it "old",
    or just after publishing it): only our marker for that target, when no live writer holds the folder; and
    the temporary of a marker write killed half-way."""
    target = Path(target)
    if not target.is_symlink() and target.is_dir():
        _remove_stale_temp_files(target, _temp_file_entries(target / PARTIAL_MARKER), {"removed": []})
    if _read_marker(target) is None or _read_marker(target)["target"] != Path(target).name:
        return
    fd = _open_dir_locked(target, blocking=False)
    if fd is None:
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(Path(target) / PARTIAL_MARKER)
    finally:
        os.close(fd)


def _pid_alive(name) -> bool:
    """Whether the process whose id is in temporary file ``name`` (``...~w<pid>-...``) exists. A file is
    created before its writer locks it: a live pid protects that instant (a reused pid only delays cleanup)."""
    pid = int(name.rsplit("~w", 1)[1].split("-", 1)[0])
    if pid == os.getpid():
        return False  # this process: its own live writers hold the lock (threads included)
    return process_alive(pid)


def process_alive(pid) -> bool:
    """Whether a process with id ``pid`` exists on this machine (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove_stale_temp_files(parent, entries, done):
    """Remove `atomic_open` temporaries whose writer died: our name pattern, a regular file, unlocked."""
    for entry in entries:
        if not _TEMP_FILE_RE.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            if fcntl is not None and not _pid_alive(entry.name) and _lock_fd(fd, blocking=False):
                os.unlink(entry.path)
                done["removed"].append(entry.path)
        except OSError:
            pass
        finally:
            os.close(fd)


def replace_dir(target, write, is_ours=None, overwrite=True):
    """Build a folder with ``write(staging_path)`` and publish it atomically at ``target`` (`publish_dir`).

    Example::

        replace_dir("models/my_coco", lambda d: model.save(d), is_ours=is_saved_model)
    """
    target = Path(target)
    check_replaceable(target, is_ours, overwrite)  # refuse before doing the (possibly long) work
    with staging_dir(target) as staging:
        write(staging)
        return publish_dir(staging, target, is_ours=is_ours, overwrite=overwrite)


def check_replaceable(target, is_ours=None, overwrite=True):
    """Raise `UnsafePathError` unless ``target`` is absent, an empty folder, or (with ``overwrite``) a folder
    ``is_ours`` recognises: what `replace_dir` checks, to refuse before a long job rather than after it."""
    target = Path(target)
    recover_replacements(target.parent, target.name)  # a replacement a killed run left half-done
    if not os.path.lexists(target):
        return
    if not target.is_symlink() and target.is_dir() and not any(target.iterdir()):
        return  # an empty folder holds nothing to lose
    if target.is_symlink() or not target.is_dir():
        raise UnsafePathError(f"{target} exists and is not a folder written by this library; "
                              "choose another destination (nothing was changed)")
    if is_ours is None or not is_ours(target):
        why = _why_not_ours(is_ours, target)
        raise UnsafePathError(f"{target} exists and is not a folder written by this library"
                              f"{f' ({why})' if why else ''}: refusing to replace it (nothing was changed); "
                              "choose an empty or new destination, or move those entries out of it")
    if not overwrite:
        raise UnsafePathError(f"{target} already holds a saved model: pass overwrite=True (--overwrite) "
                              "to replace it")


def _why_not_ours(is_ours, target):
    """What ``is_ours.why_not_ours(target)`` says (e.g. the entries a saved model does not hold), or None."""
    explain = getattr(is_ours, "why_not_ours", None)
    if explain is None:
        return None
    try:
        return explain(target)
    except Exception:  # an explanation only: the refusal stands without it
        return None


def check_writable_dir(directory, min_free_bytes=1 << 20):
    """Raise OSError (naming ``directory``) unless files can be written into it: ``directory``, or the nearest
    folder above it that exists (where it would be created), is a folder in which a probe file can be created
    and removed, on a file system with ``min_free_bytes`` free. Creates nothing that stays: a cheap check
    before a long job whose results would be lost if they could not be written at its end."""
    directory = Path(directory)
    existing = directory
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        kind = describe_kind(os.stat(existing).st_mode) if existing.exists() else "a dangling symbolic link"
        raise _os_error(errno.ENOTDIR, f"cannot write into {directory}: {existing} is {kind}, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
        st = os.statvfs(existing)
    except OSError as e:
        raise _os_error(e.errno, f"cannot write into {directory}: {e.strerror or e}") from e
    if st.f_bavail * st.f_frsize < min_free_bytes:
        raise _os_error(errno.ENOSPC, f"cannot write into {directory}: no space left on the device "
                                      f"({st.f_bavail * st.f_frsize} bytes free)")
    return directory


def _os_error(code, message):
    """An OSError whose text is ``message`` alone (no "[Errno N]" prefix) and whose ``errno`` is ``code``."""
    error = OSError(message)
    error.errno = code
    return error


def check_overwritable(path, is_ours, what="a file"):
    """Refuse (`UnsafePathError`) to overwrite ``path`` unless it is absent or a regular file that
    ``is_ours(path)`` recognises as ``what`` written by this library (a previous run's output)."""
    path = Path(path)
    if not os.path.lexists(path):
        return path
    if path.is_symlink() or not path.is_file() or not is_ours(path):
        raise UnsafePathError(f"{path} exists and is not {what} written by this library: refusing to overwrite "
                              "it (nothing was changed); choose another output folder")
    return path


def json_file_matches(path, predicate, max_bytes=64 * 1024 * 1024) -> bool:
    """Whether ``path`` is a regular file of JSON (at most ``max_bytes``) for which ``predicate`` is true."""
    try:
        return bool(predicate(read_json(path, max_bytes)))
    except (OSError, ValueError):  # UnsafePathError and JSON errors are ValueErrors
        return False


#: How deeply a JSON file the library reads may nest (a saved model's config.json: 7 levels; map.json: 5).
#: Deeper, Python's parser (and every recursive walk after it) raises RecursionError, not a clear error.
MAX_JSON_DEPTH = 64
_JSON_STRING_RE = re.compile(rb'"[^"]*"')
_JSON_KEEP = bytes(range(256)).translate(None, b'[]{}"')  # every byte but brackets and quotes: deleted


def json_depth_exceeds(data: bytes, max_depth: int) -> bool:
    """Whether the JSON text ``data`` (UTF-8) nests containers more than ``max_depth`` deep, found without
    parsing (no recursion): escaped quotes dropped, then every byte but quotes and brackets, then strings, then
    innermost ``[]`` / ``{}`` pairs, one level a pass (at most ``max_depth`` passes, each linear in C).
    Unbalanced brackets count as too deep (`parse_json` then tells JSON errors apart)."""
    if b"\\" in data:  # an escaped quote is no string's end (other escapes hide nothing): pairs from the left
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    # quotes now alternate open / close: dropping adjacent pairs keeps every bracket left in a string inside one
    brackets = data.translate(None, _JSON_KEEP).replace(b'""', b"")
    if b'"' in brackets:
        brackets = _JSON_STRING_RE.sub(b"", brackets)
    for _ in range(max_depth):
        if not brackets:
            return False
        # one level: every innermost pair goes, none that this pass uncovers (a placeholder stands between)
        brackets = brackets.replace(b"[]", b"\0").replace(b"{}", b"\0").replace(b"\0", b"")
    return bool(brackets)


def read_json(path, max_bytes, max_depth=MAX_JSON_DEPTH):
    """The value of the JSON file ``path``: a regular file (`read_regular_file`) of at most ``max_bytes``, read
    by `parse_json`; `UnsafePathError` for what `read_regular_file` refuses. Every JSON file the library
    reads goes through here: no RecursionError, no unbounded read, the file named in every error."""
    path = os.fspath(path)
    return parse_json(read_regular_file(path, max_bytes), path, max_depth)


def parse_json(data: bytes, source, max_depth=MAX_JSON_DEPTH):
    """The value of the JSON text ``data``: UTF-8 (a BOM allowed), nested at most ``max_depth`` deep
    (`json_depth_exceeds`, checked before parsing); ValueError naming ``source`` otherwise."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{source} is not UTF-8 text ({e})") from e
    too_deep = json_depth_exceeds(data, max_depth)
    try:
        value = json.loads(text)  # also when too deep: says which of "too deep" and "not JSON" it is
    except RecursionError:
        too_deep = True
    except ValueError as e:  # JSONDecodeError
        raise ValueError(f"{source} is not valid JSON ({e})") from e
    if too_deep:
        raise ValueError(f"{source}: JSON nested more than {max_depth} levels deep")
    return value


@contextlib.contextmanager
def file_lock(path, timeout=-1):
    """An exclusive inter-process lock for ``path``, held on ``<path>.lock``.

    ``timeout`` seconds (-1: wait forever) before `TimeoutError`. On POSIX the lock file exists only while
    someone holds or waits for the lock: the holder deletes it on release, and every locker checks after
    locking that the file it locked is still the one at ``<path>.lock`` (else it retries), so deleting it
    never lets two processes hold the lock. A killed holder leaves the file, whose lock the kernel released:
    the next locker takes it and deletes it. A lock file is always empty: anything else at ``<path>.lock`` (a
    user's file, a FIFO, a folder) is left alone, `UnsafePathError`. (Elsewhere ``filelock``'s lock file is
    left in place.)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = str(path) + ".lock"
    if fcntl is None:
        lock = FileLock(lock_path, mode=default_file_mode())
        try:
            lock.acquire(timeout=timeout)
        except Timeout as e:
            raise TimeoutError(f"{path} is locked by another process ({lock_path}) for more than {timeout} s") from e
        try:
            yield
        finally:
            lock.release()
        return
    fd = _acquire_lock_file(lock_path, timeout)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)  # still ours: `_acquire_lock_file` checked it, and we hold it
        os.close(fd)


def _acquire_lock_file(lock_path, timeout):
    """An open descriptor holding ``flock`` on the file now at ``lock_path`` (created if needed)."""
    deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0), default_file_mode())
        try:
            _check_lock_file(fd, lock_path)
            while not _lock_fd(fd, blocking=deadline is None):
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"{lock_path[:-5]} is locked by another process ({lock_path}) for more "
                                       f"than {timeout} s")
                time.sleep(0.01 if deadline is not None else 0.05)
            try:
                if os.path.samestat(os.fstat(fd), os.stat(lock_path, follow_symlinks=False)):
                    return fd
            except FileNotFoundError:
                pass  # the previous holder deleted it on release: lock the new one
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _check_lock_file(fd, lock_path):
    """`UnsafePathError` unless the open ``fd`` at ``lock_path`` is an empty regular file, as every lock file of
    `file_lock` is (nothing is ever written into one): a user's ``notes.lock`` beside ``notes`` is neither
    locked nor deleted on release."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size:
        what = f"a file of {st.st_size} bytes" if stat.S_ISREG(st.st_mode) else describe_kind(st.st_mode)
        raise UnsafePathError(f"{lock_path} is {what}, not an (empty) lock file of this library: it is left as it "
                              f"is; move it away to use {lock_path[:-5]}")


def describe_kind(st_mode) -> str:
    """'a FIFO', 'a directory', ... for error messages."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(st_mode):
            return name
    return "not a regular file"


def path_problem(path) -> str | None:
    """Why ``path`` cannot be read as a file (missing, dangling or looping link, special file), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"{path}: a dangling symbolic link (its target {os.readlink(path)!r} does not exist)"
        return f"no such file: {path}"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{path}: a symbolic link loop"
        return f"{path}: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is {describe_kind(st.st_mode)}, not a regular file"
    return None


def read_regular_file(path, max_bytes=DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file, at most ``max_bytes`` (None: no cap); `UnsafePathError` otherwise.

    The file is opened without blocking (a FIFO would block ``open`` until a writer appears) and checked on
    its open descriptor, so a file swapped for a special file between the check and the read is refused too.
    """
    with open_regular_file(path, max_bytes) as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:  # the file grew while being read
        raise UnsafePathError(f"{os.fspath(path)}: more than {max_bytes} bytes (the file grew while being read)")
    return data


def open_regular_file(path, max_bytes=DEFAULT_MAX_BYTES):
    """A binary file object on a regular file of at most ``max_bytes`` (None: no cap), read lazily by the
    caller (e.g. PIL decoding one frame of a large GIF); `UnsafePathError` as in `read_regular_file`.

    Opened without blocking and checked on the open descriptor (a FIFO or device is refused, never read).
    """
    path = os.fspath(path)
    problem = path_problem(path)
    if problem:
        raise UnsafePathError(problem)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UnsafePathError(f"{path}: cannot open: {e.strerror}") from e
    f = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{path} is {describe_kind(st.st_mode)}, not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise UnsafePathError(f"{path}: {st.st_size} bytes exceeds the limit of {max_bytes} bytes "
                                  "(raise max_bytes / --max-file-bytes if the file is trusted)")
    except BaseException:
        f.close()
        raise
    return f


def fsync_tree(directory):
    """fsync every regular file under ``directory`` (links not followed), then every folder, deepest first,
    ``directory`` last: what a folder built in place needs before `publish_dir` renames it, so that a crash
    after the rename never leaves it complete-looking with empty or short files. Returns ``directory``."""
    directory = Path(directory)
    folders = []
    for root, _dirs, files in os.walk(directory, followlinks=False):
        folders.append(root)
        for name in files:
            path = os.path.join(root, name)
            if not stat.S_ISREG(os.lstat(path).st_mode):  # a link, a FIFO (which an open would wait on)
                continue
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for root in reversed(folders):
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return directory
