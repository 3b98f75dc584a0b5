"""When a function runs compiled: the policy behind ``jit_compile=True / False / "auto"``.

Compiling a stage (an XLA program, or a traced graph) costs seconds the first time a shape is seen, and
pays off only when the shape recurs: a process that captions one image never sees a shape twice, and on
2 CPU cores the decoder's XLA compilation (5-8 s) was most of the wait for a first caption while the
uncompiled forms take well under a second for one batch.

- ``True``: compiled from the first call (XLA), every batch padded to its power-of-two bucket.
- ``False``: never XLA (graph mode, or the traced-block decoder of `generation_utils`).
- ``"auto"``: the first call of each key (stage, bucket, and for the decoder the method and its options)
  runs uncompiled and unpadded; the second call of the same key compiles and later calls reuse the
  program. A long run compiles at its second batch; a caller that knows a run is long asks for
  compilation at once (``force=True``, as `ClipCap.predict` does for runs of more than two batches).

Tiering (`tier`, the decoder's and the mapper's form of "auto"): compiling a decoding loop takes 3-4 times
as long as running it uncompiled (12.8-17 s against 4.5 s for 16 images on 2 cores), so a second call that
compiles in the foreground is the slowest of all. Under `tier` no call waits for a compiler: when a key
recurs, its call still runs uncompiled, and once it has returned the program is built by ``build`` in a
background thread (`BackgroundBuild`, at the lowest CPU priority so that it takes the cores only when the
calls leave them idle); every call runs uncompiled until the program is ready, then compiled. A build that
fails raises its error at the key's next call (as a foreground compilation would have), and the key is
built again at the call after. ``force=True`` (a long run) still compiles in the foreground at once.

Example::

    policy = CompilePolicy("auto")
    policy.compiles(("decoder", 4))      # False: first call of this key, run uncompiled
    policy.compiles(("decoder", 4))      # True: it recurs, compile it

    with policy.tier(("decoder", 4), build) as compiled:   # tiered: False, False (build starts after it), ...
        run(compiled)                                      # ... True once `build` has finished
"""

import contextlib
import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)

#: the niceness of a background build's thread (Linux: per thread); the lowest priority
BUILD_NICENESS = 19


class CompilePolicy:
    """Decides, per call key, whether a stage runs compiled (see the module docstring)."""

    def __init__(self, jit_compile="auto"):
        if jit_compile != "auto" and not isinstance(jit_compile, bool):
            raise ValueError(f"jit_compile must be True, False or 'auto', got {jit_compile!r}")
        self.jit_compile = jit_compile
        self._seen = set()
        self._lock = threading.Lock()
        self._builds = {}  # key -> BackgroundBuild (tiered keys whose program is built or being built)

    def compiles(self, key, force=None) -> bool:
        """Whether this call of ``key`` runs compiled; ``force`` (True / False) overrides "auto". Records the
        call, so the answer for a key under "auto" is False once, then True."""
        with self._lock:
            seen = key in self._seen
            self._seen.add(key)
        if self.jit_compile != "auto":
            return self.jit_compile
        return bool(force) if force is not None else seen

    def would_compile(self, key, force=None) -> bool:
        """`compiles` without recording the call (for status lines said before the call)."""
        if self.jit_compile != "auto":
            return self.jit_compile
        with self._lock:
            return bool(force) if force is not None else key in self._seen

    @contextlib.contextmanager
    def tier(self, key, build, force=None):
        """Tiered "auto" (module docstring): yields whether this call of ``key`` runs compiled. Under "auto",
        False until ``build()`` (which compiles the key's program; called once, in a background thread started
        when a recurring call of the key returns) has finished, True after; ``force`` and True / False as in
        `compiles` (``force=True`` compiles in the foreground). Raises, once, the error of a failed build."""
        if self.jit_compile != "auto" or force is not None:
            yield self.compiles(key, force=force)
            return
        with self._lock:
            seen = key in self._seen
            self._seen.add(key)
            current = self._builds.get(key)
            if current is not None and current.failed:
                del self._builds[key]  # raised below; the next call builds again
        if current is not None:
            current.raise_failure()
            if current.done:
                yield True
                return
        yield False
        if seen and current is None:  # a recurring key: build it now that its uncompiled call has returned
            with self._lock:
                if key not in self._builds:
                    self._builds[key] = BackgroundBuild(key, build)

    def ready(self, key) -> bool:
        """Whether a tiered key's program is built (the next call of it runs compiled)."""
        with self._lock:
            current = self._builds.get(key)
        return current is not None and current.done and not current.failed

    def wait(self, timeout=None) -> bool:
        """Wait for the background builds started so far; True when all have finished (tests, benchmarks)."""
        with self._lock:
            builds = list(self._builds.values())
        return all(b.join(timeout) for b in builds)


class BackgroundBuild:
    """``build()`` run once in a daemon thread at the lowest CPU priority (`BUILD_NICENESS`); `done` once it has
    returned or raised, `failed` / `raise_failure` for the error it raised."""

    def __init__(self, key, build):
        self.key = key
        self._build = build
        self._error = None
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"compile {key}", daemon=True)
        self._thread.start()

    def _run(self):
        _lower_priority()
        try:
            self._build()
        except BaseException as error:  # kept for the key's next call, which raises it
            self._error = error
            logger.warning("compiling %s in the background failed: %s: %s", self.key, type(error).__name__, error)
        finally:
            self._build = None
            self._finished.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def failed(self) -> bool:
        return self._finished.is_set() and self._error is not None

    def raise_failure(self):
        if self.failed:
            raise RuntimeError(f"compiling {self.key} in the background failed (the next call builds it "
                               f"again): {type(self._error).__name__}: {self._error}") from self._error

    def join(self, timeout=None) -> bool:
        return self._finished.wait(timeout)


def _lower_priority():
    """The calling thread to `BUILD_NICENESS` (Linux sets niceness per thread; the threads it starts inherit
    it). Elsewhere the build runs at normal priority: said at debug level, it is a scheduling hint only."""
    if not sys.platform.startswith("linux"):  # elsewhere a thread id is not a process id setpriority takes
        logger.debug("background build at normal priority (%s)", sys.platform)
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BUILD_NICENESS)
    except (AttributeError, OSError) as error:  # no setpriority (Windows), or refused
        logger.debug("background build at normal priority: %s", error)
