"""A persistent XLA compilation cache in the model store, so that a new process does not compile again.

Every decoding loop and CLIP encoder runs as ``tf.function(jit_compile=True)``; compiling one costs seconds
per (method, padded batch, max_length) on a CPU. TensorFlow can keep the compiled executables on disk
(``--tf_xla_persistent_cache_directory`` in ``TF_XLA_FLAGS``, read when TensorFlow initialises XLA): the next
process loads them instead of compiling (it still traces the function and lowers it to HLO, which the cache
cannot skip).

`enable` adds that flag, pointing at ``<model store>/xla_cache/<key>/`` (`utils.model_store.home_dir`: a fresh
store is a cold cache), before TensorFlow is imported. It is called by ``main.py`` and when
``models.image_captioning`` or ``models.siamese`` is imported (both import TensorFlow after it).

- Keys. TensorFlow names each entry by the function's signature and the fingerprint of its HLO program and
  checks the program when it loads one, so a changed model or architecture compiles anew. What the HLO does
  not show is the compiler and the machine: ``<key>`` hashes the TensorFlow, Keras and Python versions, the
  machine type and the CPU's feature flags (a store shared between machines never runs a program built for
  instructions the CPU lacks), and the library's own source files (`library_fingerprint`), so a changed
  library never loads a program of another version. It also holds the compiler's flags (`compiler_flags`:
  ``XLA_FLAGS`` and ``TF_XLA_FLAGS`` but the cache's own): TensorFlow's entry names and checks leave them
  out, so a process with ``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` loaded the AVX-512 programs an uncapped
  process had written (seen with TensorFlow 2.21). A new key starts an empty folder; old ones stay until
  cleared.
- Opt-out: ``IMAGE_CAPTIONING_XLA_CACHE=0``. A ``TF_XLA_FLAGS`` that already names a cache directory is the
  user's choice and is kept; their other flags are kept too (ours is appended).
- Nothing is created until TensorFlow writes its first entry (a refused command leaves the store as it was).
- A cache that cannot be written (the store read-only, not a folder, or with less than `MIN_FREE_BYTES`
  free) is a warning, not a failure: TensorFlow is told to only read it (``READ_ONLY_FLAG``), since a write
  that fails fails the compiling call (a full disk made even ``caption --no-save`` fail). A disk that fills
  up during the run is not foreseen.
- ``python main.py cache`` shows where it is and its size; ``cache --clear`` empties it (`clear`): only a
  folder whose every file is a cache entry is replaced (`utils.file_utils.replace_dir`), anything else is
  refused.

Example::

    from utils import compile_cache
    compile_cache.enable()                 # before `import tensorflow`
    import tensorflow as tf                # compiled programs now persist in compile_cache.cache_dir()
"""

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import socket
import sys
from pathlib import Path

from custom_layers.cpu_features import cpu_info
from utils.model_store import home_dir

logger = logging.getLogger(__name__)

CACHE_ENV = "IMAGE_CAPTIONING_XLA_CACHE"
FLAGS_ENV = "TF_XLA_FLAGS"
FLAG = "--tf_xla_persistent_cache_directory"
#: TensorFlow's switch to load cached programs without writing new ones (set when the store cannot be written)
READ_ONLY_FLAG = "--tf_xla_persistent_cache_read_only=true"
#: TensorFlow's flags of the persistent cache itself (where, read-only, ...): not part of the key
_CACHE_FLAGS_PREFIX = "--tf_xla_persistent_cache"
#: the free space the store needs for the cache to be written (an entry is a few MB; TensorFlow fails the
#: compiling call itself, ResourceExhaustedError, when it cannot write one)
MIN_FREE_BYTES = 64 << 20
#: the folder `enable` put in TF_XLA_FLAGS (inherited by child processes, which then use their own store's)
_OURS_ENV = "IMAGE_CAPTIONING_XLA_CACHE_DIR"
CACHE_DIRNAME = "xla_cache"
_ROOT = Path(__file__).resolve().parents[1]
#: the library's folders whose source goes into the key (what builds the compiled programs, and more)
_SOURCE_DIRS = ("custom_architectures", "custom_layers", "models", "utils")
_KEY_RE = re.compile(r"[0-9a-f]{16}")
#: files TensorFlow writes in a key folder: entries, and the temporary files it renames into them
_ENTRY_RE = re.compile(r"xla_compile_cache__.*")
#: TensorFlow's temporary file for an entry (tsl ``Env::CreateUniqueFileName``): host, thread, pid, microseconds
_TEMP_RE = re.compile(r"xla_compile_cache__[\w]+\.pb(?P<host>.+)-[0-9a-f]+-(?P<pid>\d+)-[0-9a-f]+\.tmp")
_OFF = ("0", "false", "no", "off")


def is_disabled() -> bool:
    return os.environ.get(CACHE_ENV, "").strip().lower() in _OFF


def _package_version(module, *names):
    """The version of the installed distribution (one of ``names``) that provides ``module``, read from its
    ``<name>-<version>.dist-info`` folder beside it (``importlib.metadata`` costs 0.3 s to import)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    site = Path(list(spec.submodule_search_locations)[0]).parent
    wanted = {n.replace("-", "_").lower() for n in names}
    try:
        for entry in sorted(os.listdir(site)):
            if entry.endswith(".dist-info") and "-" in entry:
                name, version = entry[:-len(".dist-info")].rsplit("-", 1)
                if name.replace("-", "_").lower() in wanted:
                    return version
    except OSError:
        pass
    return None


def _cpu_flags() -> str:
    """The CPU's flags, sorted, one string (`custom_layers.cpu_features.cpu_info`); its name where it has none."""
    _, flags = cpu_info()
    return " ".join(sorted(flags)) if flags else platform.processor()


def compiler_flags() -> list:
    """The flags that shape the programs XLA compiles and TensorFlow's cache does not key: ``XLA_FLAGS`` (the
    target ISA, fast math, ...) and ``TF_XLA_FLAGS`` without its persistent-cache flags (ours), each sorted."""
    tf_flags = [f for f in os.environ.get(FLAGS_ENV, "").split() if not f.startswith(_CACHE_FLAGS_PREFIX)]
    return sorted(os.environ.get("XLA_FLAGS", "").split()) + sorted(tf_flags)


def library_fingerprint() -> str:
    """SHA-256 of the library's Python sources (`_SOURCE_DIRS`): its version, as far as compiling goes."""
    digest = hashlib.sha256()
    for folder in _SOURCE_DIRS:
        for path in sorted((_ROOT / folder).rglob("*.py")):
            digest.update(path.relative_to(_ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key() -> str:
    """16 hex digits naming what may share compiled programs: compiler versions and flags, machine, library."""
    parts = {
        "tensorflow": _package_version("tensorflow", "tensorflow", "tensorflow-cpu", "tensorflow-intel",
                                       "tf-nightly"),
        "keras": _package_version("keras", "keras", "keras-nightly"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu": _cpu_flags(),
        "flags": compiler_flags(),
        "library": library_fingerprint(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cache_root(home=None) -> Path:
    """``<model store>/xla_cache``: every key's folder."""
    return Path(home if home is not None else home_dir()) / CACHE_DIRNAME


def cache_dir(home=None) -> Path:
    """``<model store>/xla_cache/<key>``: this library's, TensorFlow's and this machine's folder."""
    return cache_root(home) / cache_key()


def configured_dir():
    """The cache folder ``TF_XLA_FLAGS`` names now (ours or the user's), or None."""
    match = re.search(rf"{FLAG}=(\S+)", os.environ.get(FLAGS_ENV, ""))
    return Path(match.group(1)) if match else None


def enable(home=None):
    """Point TensorFlow's persistent XLA cache at `cache_dir` (in ``TF_XLA_FLAGS``); the folder, or None.

    Does nothing (None) when ``IMAGE_CAPTIONING_XLA_CACHE=0``, when TensorFlow is already imported (it may
    have read its flags: too late to change them reliably), or when ``TF_XLA_FLAGS`` already names a cache
    directory (returned: the user's, or ours from an earlier call). Creates nothing: TensorFlow makes the
    folder when it writes its first entry.
    """
    if is_disabled():
        return None
    existing = configured_dir()
    ours = os.environ.get(_OURS_ENV)
    if existing is not None and (str(existing) != ours or "tensorflow" in sys.modules):
        return existing  # the user's own cache, or ours already in effect in this process
    if "tensorflow" in sys.modules:
        logger.debug("TensorFlow is already imported: no persistent XLA cache for this process")
        return None
    directory = cache_dir(home)
    if existing is not None and str(existing) == str(directory):
        return directory  # set by an earlier call (checked and reported then)
    flags = os.environ.get(FLAGS_ENV, "")
    if existing is not None:  # set by a parent process of ours, for its store: replaced by this one's
        flags = flags.replace(f"{FLAG}={existing}", "").replace(READ_ONLY_FLAG, "")
    problem = unwritable(directory)
    if problem is not None:
        logger.warning("the compile cache cannot be written (%s): compiled programs are not saved by this "
                       "process (those already there are used)", problem)
    own = [f"{FLAG}={directory}", *([READ_ONLY_FLAG] if problem is not None else [])]
    os.environ[FLAGS_ENV] = " ".join([*flags.split(), *own])
    os.environ[_OURS_ENV] = str(directory)
    remove_stale_temporaries(directory)
    return directory


def unwritable(directory):
    """Why TensorFlow could not write cache entries into ``directory`` (`utils.file_utils.check_writable_dir`
    with `MIN_FREE_BYTES`: creates nothing that stays), or None."""
    from utils.file_utils import check_writable_dir

    try:
        check_writable_dir(directory, min_free_bytes=MIN_FREE_BYTES)
    except OSError as e:
        return str(e)
    return None


def remove_stale_temporaries(directory) -> list:
    """Delete the temporary files that TensorFlow's cache writers left in our key folder ``directory`` when they
    died (kill -9, or a full disk that failed the write): ``<entry>.pb<host>-<thread>-<pid>-<time>.tmp`` of this
    machine whose process no longer exists. A live writer's (its pid exists) and anything else stay. Returns
    the paths removed."""
    from utils.file_utils import process_alive

    directory, removed = Path(directory), []
    if directory.is_symlink() or not directory.is_dir() or not _KEY_RE.fullmatch(directory.name):
        return removed
    host = socket.gethostname()
    for entry in os.scandir(directory):
        match = _TEMP_RE.fullmatch(entry.name)
        if (match is None or match.group("host") != host or not entry.is_file(follow_symlinks=False)
                or process_alive(int(match.group("pid")))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed.append(entry.path)
    return removed


def _is_key_dir(path: Path) -> bool:
    return (path.is_dir() and not path.is_symlink() and bool(_KEY_RE.fullmatch(path.name))
            and all(_ENTRY_RE.fullmatch(p.name) and p.is_file() and not p.is_symlink() for p in path.iterdir()))


def is_cache_root(path) -> bool:
    """Whether ``path`` is a cache root this library made: a real folder holding only key folders of entries."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and all(_is_key_dir(p) for p in path.iterdir())


def describe(home=None) -> dict:
    """Where the cache is and what it holds: ``{"root", "current", "enabled", "keys": {key: {"entries",
    "bytes"}}}`` (``current``: this process's key folder)."""
    root = cache_root(home)
    keys = {}
    if root.is_dir() and not root.is_symlink():
        for folder in sorted(root.iterdir()):
            if folder.is_dir() and not folder.is_symlink():
                files = [p for p in folder.iterdir() if p.is_file() and not p.is_symlink()]
                keys[folder.name] = {"entries": sum(1 for p in files if p.suffix == ".pb"),
                                     "bytes": sum(p.stat().st_size for p in files)}
    return {"root": str(root), "current": str(cache_dir(home)), "enabled": not is_disabled(), "keys": keys}


def clear(home=None) -> Path:
    """Empty the cache root (every key); `utils.file_utils.UnsafePathError` if it holds anything that is
    not a cache entry (nothing is then changed). Returns the root."""
    from utils.file_utils import replace_dir

    root = cache_root(home)
    if os.path.lexists(root):
        replace_dir(root, lambda staging: None, is_ours=is_cache_root, overwrite=True)
    return root
