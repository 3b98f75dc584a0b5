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
#: a C++ log line of absl / TensorFlow ("I0000 00:00:1795968758.151061   24179 cudart_stub.cc:31] ..."), the
#: absl pre-initialisation banner, and the continuation line of cpu_feature_guard's notice
_LOG_LINE = re.compile(
    r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w.\-/]+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.)")


def quiet_environment(verbose=False):
    """Set ``TF_CPP_MIN_LOG_LEVEL=3`` unless ``verbose`` or the user set it; True when set here.

    Only effective before TensorFlow is imported (it reads the variable when it loads).
    """
    if verbose or LOG_LEVEL_ENV in os.environ:
        return False
    os.environ[LOG_LEVEL_ENV] = _QUIET_LEVEL
    return True


def is_log_line(line: str) -> bool:
    """Whether ``line`` is one of TensorFlow's / absl's C++ log lines (or the notice's continuation)."""
    return bool(_LOG_LINE.match(line))


@contextlib.contextmanager
def filtered_stderr():
    """Send fd 2 (C and Python writes alike) to a temporary file for the block, then write back to the real
    stderr every line that `is_log_line` does not recognise. A file, not a pipe: it cannot fill up and
    block the writer."""
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
                    if not is_log_line(line)]
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
    ``quiet``, and, when ``lean``, without Keras' optional pandas / matplotlib / IPython integrations
    (`KERAS_OPTIONAL_IMPORTS`)."""
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    with modules_absent(KERAS_OPTIONAL_IMPORTS if lean else ()), \
            (filtered_stderr() if quiet else contextlib.nullcontext()):
        import keras  # noqa: F401 (TensorFlow imports only part of Keras; the rest's optional imports too)
        import tensorflow as tf
    return tf
