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
calls leave them idle); every call runs uncompiled until the program is ready, then compiled. The build
starts in idle time: once no call of the policy has run for `IDLE_SECONDS` (1 s: a notebook's pause
between cells, a server's quiet moment; the next call then usually runs compiled), or, for calls that follow
each other without such a pause, with the key's `BUILD_BESIDE_CALL`-th call (the 4th), so that calls 1-3 of
a new shape never share the cores with its compilation (why, below). Its work on
other threads is lowered too (`CompileWorkers`): XLA compiles LLVM code on a TensorFlow worker pool
(``tf_Compute`` threads that serve no steady-state call), so the TensorFlow-named threads that served none of
the key's last uncompiled call and work while the build runs are set to the same niceness for the build's
duration, then restored; threads that served that call (TensorFlow's intra- and inter-op pools) and Python's
own threads are never touched (a call too small to show those pools, as the mapper's few eager ops, asks
``lower_workers=False``: its build lowers only its own thread). Where a lowered niceness could not be restored (an unprivileged process
without ``RLIMIT_NICE``: raising a priority back needs it) only the build's own thread is lowered, said once.
A build runs its program only on padding rows, which the stage skips (the decoder's prefill is a ``tf.cond``
on any valid row), so no computation of the build runs on the pools that serve the calls. A build that
fails raises its error at the key's next call (as a foreground compilation would have), and the key is
built again at the call after. ``force=True`` (a long run) still compiles in the foreground at once.

What a build still costs the calls beside it (measured on 2 cores, GPT-2 124M, 16 images, greedy): the
build's Python (tracing the loop) holds the GIL, which an uncompiled call needs between its graph calls (a
thread spinning in Python made such a call 7.7x slower), so the decoder traces its loop with one block
function (`PrefixDecoder.block_function`: ~0.5 s of Python instead of 1.6-1.9 s). Its XLA compilation (~2.5
s) releases the GIL, yet any other work on the same 2 cores, whatever its priority, slows a call: a
``while True`` loop in another process under SCHED_IDLE made it 1.2x slower. The calls that run beside a
build (one or two) are therefore ~1.3x the uncompiled time, where a foreground compilation made one of them
3-4x: hence a build waits for idle time, and runs beside calls only from a key's 4th call on. (Builds of other
policies, say CLIP's beside the decoder's calls, are not held back: each policy sees its own calls.)

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
import time

logger = logging.getLogger(__name__)

#: the niceness of a background build's thread (Linux: per thread); the lowest priority
BUILD_NICENESS = 19
#: seconds without a call of the policy in flight after which a waiting build starts (`CompilePolicy.idle_s`)
IDLE_SECONDS = 1.0
#: the call of a key from which its build may run beside calls: calls 1-3 never share the cores with it
BUILD_BESIDE_CALL = 4


class CompilePolicy:
    """Decides, per call key, whether a stage runs compiled (see the module docstring)."""

    def __init__(self, jit_compile="auto", idle_s=IDLE_SECONDS):
        """``idle_s``: the pause in this policy's calls that starts a waiting build (`_build_may_start`)."""
        if jit_compile != "auto" and not isinstance(jit_compile, bool):
            raise ValueError(f"jit_compile must be True, False or 'auto', got {jit_compile!r}")
        self.jit_compile = jit_compile
        self.idle_s = float(idle_s)
        self._seen = set()
        self._lock = threading.Lock()
        self._activity = threading.Condition(self._lock)  # notified when a tiered call starts or ends
        self._calls = {}  # key -> tiered calls started
        self._in_flight = 0  # tiered calls running now (all keys)
        self._idle_since = time.monotonic()
        self._builds = {}  # key -> BackgroundBuild (tiered keys whose program is built or being built)
        self._said = set()  # notes logged once per policy (`BackgroundBuild`'s ``say``)

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
    def tier(self, key, build, force=None, lower_workers=True):
        """Tiered "auto" (module docstring): yields whether this call of ``key`` runs compiled. Under "auto",
        False until ``build()`` (which compiles the key's program; called once, in a background thread made
        when a recurring call of the key returns, started in idle time: `_build_may_start`) has finished, True
        after; ``force`` and True / False as in `compiles` (``force=True`` compiles in the foreground). Raises,
        once, the error of a failed build. ``lower_workers``: lower the build's compile workers
        (`CompileWorkers`), told from the threads that served this call; False where this call is too small to
        show them (only the build's thread is lowered)."""
        with self._activity:
            self._calls[key] = self._calls.get(key, 0) + 1
            self._in_flight += 1
            self._activity.notify_all()
        try:
            with self._tier(key, build, force, lower_workers) as compiled:
                yield compiled
        finally:
            with self._activity:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle_since = time.monotonic()
                self._activity.notify_all()

    @contextlib.contextmanager
    def _tier(self, key, build, force, lower_workers):
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
        starts_build = seen and current is None  # a recurring key: built once this uncompiled call has returned
        before = thread_times() if starts_build and lower_workers else None
        yield False
        if starts_build:
            foreground = busy_threads(before, thread_times()) if before is not None else None  # served this call
            with self._lock:
                if key not in self._builds:
                    self._builds[key] = BackgroundBuild(key, build, foreground=foreground, say=self._say_once,
                                                        start_when=lambda: self._build_may_start(key))

    def _build_may_start(self, key, poll=0.1):
        """Blocks a key's build until it may take the cores: when no call of this policy has run for
        `idle_s` seconds (a notebook's pause between cells, a server's quiet moment), or when the key's
        `BUILD_BESIDE_CALL`-th call starts (calls that follow each other with no pause: the build then runs beside
        them, costing those it overlaps ~1.3x on 2 cores). Returns False, so that nothing is built, once the
        main thread has ended (the interpreter is exiting: a build would only delay the exit)."""
        with self._activity:
            while True:
                if self._calls.get(key, 0) >= BUILD_BESIDE_CALL:
                    return True
                if not self._in_flight and time.monotonic() - self._idle_since >= self.idle_s:
                    return True
                if not threading.main_thread().is_alive():
                    return False
                wait = poll if self._in_flight else min(poll, self.idle_s - (time.monotonic() - self._idle_since))
                self._activity.wait(max(wait, 0.0))

    def _say_once(self, note):
        with self._lock:
            said = note in self._said
            self._said.add(note)
        if not said:
            logger.info(note)

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
    """``build()`` run once in a thread at the lowest CPU priority (`BUILD_NICENESS`), with the compile
    workers it keeps busy lowered as long as it runs (`CompileWorkers`; ``foreground``: the native ids of the
    threads that served the key's last uncompiled call, never lowered; None lowers no other thread); `done` once
    it has returned or raised, `failed` / `raise_failure` for the error it raised. ``say``: where a note that
    the workers stay at their priority goes (logged once per policy). ``start_when``: called first on the
    build's thread, blocks until the build may start (`CompilePolicy._build_may_start`); False skips it."""

    def __init__(self, key, build, foreground=None, say=logger.info, start_when=None):
        self.key = key
        self._build = build
        self._start_when = start_when
        self._foreground = foreground
        self._say = say
        self._error = None
        self._finished = threading.Event()
        # not a daemon: a process that ends while a build runs waits for it (the rest of its compilation, at the
        # lowest priority) rather than abort, as a daemon thread inside XLA's C++ code does at interpreter exit
        self._thread = threading.Thread(target=self._run, name=f"compile {key}", daemon=False)
        self._thread.start()

    def _run(self):
        if self._start_when is not None and not self._start_when():
            self._error = RuntimeError("not built: the process was exiting")
            self._build = None
            self._finished.set()
            return
        restorable = _lower_priority()
        workers = None
        if self._foreground is not None:
            if restorable:
                workers = CompileWorkers(exclude=self._foreground | {threading.get_native_id()})
            else:
                self._say("compile workers of background builds stay at normal priority: this process may not "
                          "raise a thread's priority back (RLIMIT_NICE), so only the build's own thread is lowered")
        try:
            with workers if workers is not None else contextlib.nullcontext():
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


def _lower_priority() -> bool:
    """The calling thread to `BUILD_NICENESS` (Linux sets niceness per thread; the threads it starts inherit
    it). Returns whether this process may raise a thread's priority back (tried on this thread, whose own
    priority is the one it started with: `CompileWorkers` lowers other threads only then). Elsewhere the build
    runs at normal priority: said at debug level, it is a scheduling hint only."""
    if not sys.platform.startswith("linux"):  # elsewhere a thread id is not a process id setpriority takes
        logger.debug("background build at normal priority (%s)", sys.platform)
        return False
    tid = threading.get_native_id()
    try:
        previous = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, BUILD_NICENESS)
    except (AttributeError, OSError) as error:  # no setpriority (Windows), or refused
        logger.debug("background build at normal priority: %s", error)
        return False
    if previous >= BUILD_NICENESS:
        return True  # nothing to raise back: a lowered worker's priority is this one
    try:
        os.setpriority(os.PRIO_PROCESS, tid, previous)  # the restore `CompileWorkers` would need
    except OSError:
        return False
    os.setpriority(os.PRIO_PROCESS, tid, BUILD_NICENESS)
    return True


# --------------------------------------------------------------------------------------- compile workers

#: how often `CompileWorkers` looks for busy threads (seconds): a worker runs at most this long unlowered
WATCH_INTERVAL = 0.05
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_times() -> dict:
    """This process's threads, ``{native id: (name, CPU ticks, start time)}`` from ``/proc/self/task`` (Linux;
    {} elsewhere). Only this process is read."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return {}
    out = {}
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                stat = f.read(4096).decode("ascii", "replace")
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()  # field 3 (state) on: the name may hold spaces
        try:
            out[int(tid)] = (name, int(fields[11]) + int(fields[12]), int(fields[19]))  # utime + stime, starttime
        except (IndexError, ValueError):
            continue
    return out


def busy_threads(before, after) -> set:
    """Native ids of the threads that used CPU between two `thread_times` snapshots (new threads included)."""
    return {tid for tid, (_, ticks, start) in after.items()
            if ticks > (before[tid][1] if tid in before and before[tid][2] == start else 0)}


class CompileWorkers:
    """While entered: every TensorFlow-named thread (``tf_*``: XLA compiles LLVM code on such a pool) of this
    process that uses CPU and is not in ``exclude`` is lowered to `BUILD_NICENESS`; on exit each is restored
    to the niceness it had (if it still runs). A daemon thread looks every `WATCH_INTERVAL` seconds. ``lowered``
    keeps ``{native id: niceness before}`` of the threads it lowered.

    Python's threads and the pools that served the foreground (``exclude``) are never touched, nor any other
    process; a thread that refuses (it ended, or the system refused) is left as it is."""

    def __init__(self, exclude):
        self.exclude = set(exclude)
        self.lowered = {}
        self._starts = {}  # native id -> start time (a reused id is not the thread that was lowered)
        self._stop = threading.Event()
        self._watcher = None

    def __enter__(self):
        self._last = thread_times()
        self._watcher = threading.Thread(target=self._watch, name="compile workers", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._watcher.join()
        self._restore()
        return False

    def _watch(self):
        self.exclude.add(threading.get_native_id())
        while not self._stop.wait(WATCH_INTERVAL):
            self._lower_busy()
        self._lower_busy()

    def _lower_busy(self):
        now = thread_times()
        for tid in busy_threads(self._last, now):
            name, _, start = now[tid]
            if tid in self.exclude or tid in self.lowered or not name.startswith("tf_"):
                continue
            try:
                previous = os.getpriority(os.PRIO_PROCESS, tid)
                if previous < BUILD_NICENESS:
                    os.setpriority(os.PRIO_PROCESS, tid, BUILD_NICENESS)
                    self.lowered[tid], self._starts[tid] = previous, start
            except OSError:  # ended meanwhile, or refused: left as it is
                continue
        self._last = now

    def _restore(self):
        now = thread_times()
        for tid, previous in self.lowered.items():
            if tid not in now or now[tid][2] != self._starts[tid]:
                continue  # ended: nothing to restore
            try:
                os.setpriority(os.PRIO_PROCESS, tid, previous)
            except OSError as error:
                logger.warning("could not restore the priority of compile worker %d (%s): %s", tid, now[tid][0], error)
