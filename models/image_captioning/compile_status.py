"""Status lines for the seconds a user would otherwise wait in silence: compiling an XLA program.

The CLIP encoder and the decoding loop are compiled once per shape (padded batch; for the decoder also the
method and its arguments) and per model; the first call of each takes seconds (or a fraction of that when
the persistent compile cache, `utils.compile_cache`, holds the program). `CompileStatus` reports each first
call of a shape, before and after::

    compiling the decoder for batch 4 (greedy, max_length=20) ...
    the decoder for batch 4 ready in 5.3 s (compiled; cached for next time)

whether the program was compiled or loaded is told by the cache folder gaining entries or not. Later calls
of the same shape say nothing. Status lines go to ``status`` (``main.py caption`` prints them on stderr).

Example::

    status = CompileStatus(model, lambda line: print(line, file=sys.stderr))
    with status.first_call("decoder", batch=4, details="greedy"):
        model.generate(embeddings)
"""

import contextlib
import threading
import time
import weakref

from utils import compile_cache

_SEEN = weakref.WeakKeyDictionary()  # model -> the shapes already called in this process
_LOCK = threading.Lock()


def _entries(folder):
    try:
        return sum(1 for p in folder.iterdir() if p.suffix == ".pb")
    except OSError:
        return 0


class CompileStatus:
    """Reports the first call of each (program, batch, details) of ``model`` through ``status(line)``;
    silent when ``status`` is None."""

    def __init__(self, model, status=None):
        self.model, self.status = model, status

    def _first(self, key):
        with _LOCK:
            seen = _SEEN.setdefault(self.model, set())
            if key in seen:
                return False
            seen.add(key)
            return True

    @contextlib.contextmanager
    def first_call(self, program, batch, details=""):
        """Around a call of ``program`` ("the CLIP encoder", "the decoder") on a padded ``batch``."""
        if self.status is None or not self._first((program, batch, details)):
            yield
            return
        folder = compile_cache.configured_dir()
        before = _entries(folder) if folder is not None else None
        what = f"{program} for batch {batch}{f' ({details})' if details else ''}"
        self.status(f"compiling {what} ...")
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        if folder is None:
            how = "compiled; no compile cache"
        elif _entries(folder) > before:
            how = "compiled; cached for next time"
        else:
            how = "from the compile cache"
        self.status(f"{what} ready in {elapsed:.1f} s ({how})")
