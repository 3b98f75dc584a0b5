"""A quiet TensorFlow start for the command line: no C++ log lines on a default run.

TensorFlow's C++ runtime writes to file descriptor 2 on its own: the oneDNN notice, ``cpu_feature_guard``,
"XLA service ... initialized", "Compiled cluster using XLA!", and on a machine with CUDA libraries but no GPU
``cudart_stub`` / ``cuInit`` lines. They say nothing to a user who asked for captions. Two mechanisms:

- ``TF_CPP_MIN_LOG_LEVEL`` (read when TensorFlow loads): `quiet_environment` sets it to 3 unless the user set
  it (``--verbose`` leaves it alone). Real TensorFlow failures still reach the user as Python exceptions.
- Lines that absl writes *before* TensorFlow initialises its logging (``WARNING: All log messages before
  absl::InitializeLog() is called ...``, ``cudart_stub.cc``) ignore that variable: `import_tensorflow`
  imports TensorFlow with fd 2 sent to a temporary file, then writes back every captured line that is not a
  C++ log line (a Python warning, say), so nothing else is lost.

Neither imports TensorFlow at module import (``main.py --help`` stays instant).

The library does the same (`import_tensorflow_for_library`, run by `models.image_captioning.clip_cap` and
`models.siamese.clip` before their TensorFlow imports): a script or notebook that imports the models sees no
start-up lines. A ``TF_CPP_MIN_LOG_LEVEL`` the user set is kept and applied to the lines absl writes before
TensorFlow reads it too (`filtered_stderr`'s ``level``); ``main.py -v`` sets it to 0: every line.

What the lines at run time mean (TensorFlow 2.21, read in XLA's source), hidden at level 3 because they are
harmless here:

- ``text_format.cc ... Error parsing text-format tensorflow.XlaSerializedCacheEntry: 2:1: Expected
  identifier``: TensorFlow reads a persistent XLA cache entry (`utils.compile_cache`) as a text protobuf
  first and, when that fails, as the binary one it wrote; the entry loads (no program is compiled anew:
  ``unitest/test_cold_start.py`` checks that a second process writes no entry).
- ``cpu_aot_loader.cc ... Target machine feature +prefer-no-scatter (+prefer-no-gather) is not supported on
  the host machine``: this XLA compares the compile-time LLVM features with the host's, and the ``prefer-*``
  tuning features are never among the host's, so it fires on the very machine that compiled the program
  (newer XLA skips ``prefer-`` / ``fast-`` features). It only logs: the program is loaded and run. A real
  mismatch (a cache written on an AVX-512 machine run on an AVX2-only one) would also only log, and could end
  in SIGILL: the cache folder's key includes the CPU's feature flags (`utils.compile_cache.cache_key`), so a
  program is never loaded on another kind of CPU.

``import_tensorflow(lean=True)`` (the ``caption`` command) also keeps out the optional libraries that Keras
imports when they are installed and that captioning never uses: pandas (DataFrames given to ``fit``),
matplotlib's pyplot (``keras.visualization``) and IPython (Keras' notebook file editor). They cost about
1 s of a 4-5 s TensorFlow import on two cores. Each is marked absent in ``sys.modules`` only while
TensorFlow and Keras import (Keras catches the ImportError and leaves that integration off, for this
process), then unmarked: the libraries themselves stay importable afterwards. A library already imported
is never touched.

Example::

    from utils.tf_startup import import_tensorflow, quiet_environment
    quiet_environment(verbose=False)      # before anything imports TensorFlow
    import_tensorflow(quiet=True)         # TensorFlow loaded; its start-up lines filtered out
"""

import contextlib
import os
import re
import sys
import tempfile

LOG_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
_QUIET_LEVEL = "3"
_VERBOSE_LEVEL = "0"
#: a C++ log line's severity letter, as TF_CPP_MIN_LOG_LEVEL counts: a line shows when its rank >= the level
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
#: a C++ log line of absl / TensorFlow ("I0000 00:00:1795968758.151061   24179 cudart_stub.cc:31] ..."), the
#: absl pre-initialisation banner, and the continuation line of cpu_feature_guard's notice
_LOG_LINE = re.compile(
    r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w.\-/]+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.)")


def quiet_environment(verbose=False):
    """Set ``TF_CPP_MIN_LOG_LEVEL`` unless the user set it: 3 (no C++ log lines), or 0 (every line) when
    ``verbose``; True when set here.

    Only effective before TensorFlow is imported (it reads the variable when it loads). ``verbose`` sets 0
    explicitly, so that the library (`import_tensorflow_for_library`) does not quiet a ``-v`` run.
    """
    if LOG_LEVEL_ENV in os.environ:
        return False
    os.environ[LOG_LEVEL_ENV] = _VERBOSE_LEVEL if verbose else _QUIET_LEVEL
    return True


def log_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as TensorFlow reads it: 0 (everything) to 3 (no INFO, WARNING or ERROR line)."""
    try:
        return max(0, min(3, int(os.environ.get(LOG_LEVEL_ENV, "0"))))
    except ValueError:
        return 0


def is_log_line(line: str) -> bool:
    """Whether ``line`` is one of TensorFlow's / absl's C++ log lines (or the notice's continuation)."""
    return bool(_LOG_LINE.match(line))


def is_hidden_at(line: str, level: int) -> bool:
    """Whether TensorFlow at ``TF_CPP_MIN_LOG_LEVEL=level`` would hide this C++ log line (absl's pre-start
    banner and the notice's continuation ignore the variable: counted as a WARNING and an INFO line)."""
    if not is_log_line(line):
        return False
    severity = "W" if line.startswith("WARNING: ") else "I" if line.startswith("To enable ") else line[0]
    return _SEVERITY[severity] < level


@contextlib.contextmanager
def filtered_stderr(level=3):
    """Send fd 2 (C and Python writes alike) to a temporary file for the block, then write back to the real
    stderr every line except the C++ log lines hidden at ``level`` (`is_hidden_at`; 3: all of them). A file,
    not a pipe: it cannot fill up and block the writer."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not is_hidden_at(line, level)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


#: what Keras imports only if installed, and captioning never uses (see the module's docstring)
KERAS_OPTIONAL_IMPORTS = ("pandas", "matplotlib", "IPython")


@contextlib.contextmanager
def modules_absent(names):
    """Within the block, ``import name`` raises ImportError for each of ``names`` not yet imported (Python's
    documented ``sys.modules[name] = None``); afterwards they are importable again. Yields the names marked."""
    marked = [name for name in names if name not in sys.modules]
    for name in marked:
        sys.modules[name] = None
    try:
        yield marked
    finally:
        for name in marked:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]


def keep_triton_out():
    """Mark triton absent (``sys.modules["triton"] = None``) unless it is already imported; True when marked.

    triton (torch's GPU kernel compiler, installed with CUDA builds of torch) and TensorFlow both carry LLVM:
    loading triton's extension after TensorFlow crashes the process with SIGSEGV (TF 2.21 with torch 2.14.1,
    measured). torch imports triton when it is installed: through torchvision (OpenAI's ``clip`` package)
    and transformers' PyTorch models, both of which a user of this library imports to compare with the
    originals. Marked absent, triton raises ImportError, which torch treats as "triton not available" (only
    ``torch.compile`` on a GPU needs it), instead of a crash. Loaded first, before TensorFlow, triton works
    and is left alone. `models` calls this at import, before any of its modules imports TensorFlow.
    """
    if "triton" in sys.modules:
        return False
    sys.modules["triton"] = None
    return True


def import_tensorflow(quiet=True, lean=False):
    """Import TensorFlow and Keras (TensorFlow returned), with their start-up log lines filtered out when
    ``quiet`` (those ``TF_CPP_MIN_LOG_LEVEL`` hides; unset: all), and, when ``lean``, without Keras' optional
    pandas / matplotlib / IPython integrations (`KERAS_OPTIONAL_IMPORTS`)."""
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    level = log_level() if LOG_LEVEL_ENV in os.environ else 3
    with modules_absent(KERAS_OPTIONAL_IMPORTS if lean else ()), \
            (filtered_stderr(level) if quiet else contextlib.nullcontext()):
        import keras  # noqa: F401 (TensorFlow imports only part of Keras; the rest's optional imports too)
        import tensorflow as tf
    return tf


def import_tensorflow_for_library():
    """What the library's TensorFlow modules run before they import it: ``TF_CPP_MIN_LOG_LEVEL=3`` unless the
    user (or ``main.py``) set a level, then TensorFlow imported with the start-up lines that level hides
    filtered out (absl's pre-start banner, oneDNN, cudart_stub, cpu_feature_guard). A no-op once TensorFlow
    is imported."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    quiet_environment()
    return import_tensorflow(quiet=True)
