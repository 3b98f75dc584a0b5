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
- **Locks** (`file_lock`): an inter-process lock (``filelock``, ``flock`` on POSIX) on ``<path>.lock``, so
  concurrent runs can read-merge-write a shared file without losing each other's results.
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
from pathlib import Path

from filelock import FileLock, Timeout

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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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


@contextlib.contextmanager
def staging_dir(target):
    """A new empty folder beside ``target`` (same file system, so it can be renamed onto it), removed on
    error; yields its Path. Use with `publish_dir`, or through `replace_dir`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(staging, default_dir_mode())
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish_dir(staging, target, is_ours=None, overwrite=True):
    """Rename the complete folder ``staging`` to ``target``.

    An existing ``target`` is replaced only when it is empty, or when ``overwrite`` and ``is_ours(target)`` (a folder this
    library wrote, e.g. a saved model); it is first renamed aside, then the old copy (ours) removed. Raises
    `UnsafePathError` for anything else: an existing file, a symlink, a folder that is not ours, or one that
    is ours without ``overwrite``.
    """
    staging, target = Path(staging), Path(target)
    if os.path.lexists(target):
        check_replaceable(target, is_ours, overwrite)
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.rmdir(old)  # a fresh unique name to rename the previous folder to
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)  # put the previous one back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, target)
    return target


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
    if not os.path.lexists(target):
        return
    if not target.is_symlink() and target.is_dir() and not any(target.iterdir()):
        return  # an empty folder holds nothing to lose
    if target.is_symlink() or not target.is_dir():
        raise UnsafePathError(f"{target} exists and is not a folder written by this library; "
                              "choose another destination (nothing was changed)")
    if is_ours is None or not is_ours(target):
        raise UnsafePathError(f"{target} exists and is not a folder written by this library: refusing to "
                              "replace it (nothing was changed); choose an empty or new destination")
    if not overwrite:
        raise UnsafePathError(f"{target} already holds a saved model: pass overwrite=True (--overwrite) "
                              "to replace it")


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
    """An exclusive inter-process lock for ``path`` (held on ``<path>.lock``, which is left in place).

    ``timeout`` seconds (-1: wait forever) before `TimeoutError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock", mode=default_file_mode())
    try:
        lock.acquire(timeout=timeout)
    except Timeout as e:
        raise TimeoutError(f"{path} is locked by another process ({path}.lock) for more than {timeout} s") from e
    try:
        yield
    finally:
        lock.release()


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
