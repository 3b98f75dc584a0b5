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

Example::

    policy = CompilePolicy("auto")
    policy.compiles(("decoder", 4))      # False: first call of this key, run uncompiled
    policy.compiles(("decoder", 4))      # True: it recurs, compile it
"""

import threading


class CompilePolicy:
    """Decides, per call key, whether a stage runs compiled (see the module docstring)."""

    def __init__(self, jit_compile="auto"):
        if jit_compile != "auto" and not isinstance(jit_compile, bool):
            raise ValueError(f"jit_compile must be True, False or 'auto', got {jit_compile!r}")
        self.jit_compile = jit_compile
        self._seen = set()
        self._lock = threading.Lock()

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
