"""A small producer-consumer pipeline: stages in threads, bounded queues, input order kept.

Each input becomes an `Item` carrying a sequence number. Stages run concurrently in their own threads
(``workers`` threads per stage) and are connected by bounded queues, so a slow stage applies back-pressure
instead of buffering the whole input. A stage function that raises for one item turns into that item's
``error`` (the item skips the remaining stages) while every other item goes on. Batching stages collect up
to ``batch_size`` items (or what is left when the input ends) and call their function once per batch; when
a batch fails, its items are retried one at a time so that one bad item cannot fail its neighbours.

The caller's thread consumes the results in input order (a small reorder buffer over sequence numbers). When
a stage fails fatally, every result already complete is still handed over (by increasing index, with gaps
for the items that were lost) before the exception is raised, so a caller that saves results as they come
loses none of them. On an exception anywhere (a stage's non-per-item failure, the caller's own loop body, ``KeyboardInterrupt``)
every thread is told to stop, the queues are drained, the threads are joined with a timeout, and the
exception is re-raised: no thread is left behind.

Example::

    pipe = Pipeline([
        Stage(read_file, name="read", workers=2),
        Stage(lambda batch: model(np.stack(batch)), name="model", batch_size=16),
    ], desc="predict")
    for result in pipe.run(paths):
        print(result.index, result.value if result.error is None else result.error)
"""

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

_POLL_S = 0.05  # how often blocked threads look at the stop event


class _End:
    """The sentinel that closes a queue (one per downstream worker, passed along stage by stage)."""

    def __repr__(self):
        return "<end of input>"


END = _End()


class PipelineAborted(RuntimeError):
    """Raised in the caller when a stage failed in a way that must stop the whole pipeline."""


@dataclass
class Item:
    """One input travelling through the pipeline.

    ``index`` is its position in the input, ``input`` the original object, ``value`` the output of the
    last stage that ran on it, ``error`` the exception that stopped it (None when every stage succeeded),
    ``timings`` seconds spent per stage (for a batching stage, the batch's time divided by its size) and
    ``stage`` the name of the stage that raised ``error``.
    """

    index: int
    input: Any
    value: Any = None
    error: BaseException | None = None
    stage: str | None = None
    timings: dict = field(default_factory=dict)

    @property
    def ok(self):
        return self.error is None


@dataclass
class Stage:
    """A step of a `Pipeline`.

    ``fn(value) -> value`` for a plain stage, ``fn(list_of_values) -> list_of_values`` (same length, same
    order) for a batching stage (``batch_size`` set). ``workers`` > 1 runs the function in several threads
    (useful when it releases the GIL: file reads, image decoding); batching stages use one thread.
    ``errors="item"`` (default) turns an ``Exception`` into the item's error; ``errors="raise"`` aborts the
    whole pipeline instead (for failures that would affect every item, e.g. a full disk). ``with_inputs``:
    ``fn`` also gets the items' inputs, ``fn(values, inputs)`` (a batching stage's value of an item must not
    depend on which items share its batch: the batch is made of whatever arrived first).
    """

    fn: Callable
    name: str | None = None
    batch_size: int | None = None
    workers: int = 1
    errors: str = "item"
    with_inputs: bool = False

    def __post_init__(self):
        self.name = self.name or getattr(self.fn, "__name__", "stage")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"stage {self.name!r}: batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 1:
            raise ValueError(f"stage {self.name!r}: workers must be >= 1, got {self.workers}")
        if self.batch_size is not None and self.workers != 1:
            raise ValueError(f"stage {self.name!r}: a batching stage runs in exactly one worker")
        if self.errors not in ("item", "raise"):
            raise ValueError(f"stage {self.name!r}: errors must be 'item' or 'raise', got {self.errors!r}")


class Pipeline:
    """Stages in threads connected by bounded queues; `run` yields one `Item` per input, in input order.

    Args:
        stages: the `Stage` list, applied in order.
        queue_size: capacity of each queue between two stages (back-pressure).
        progress: show a tqdm bar (items per second) while results come out.
        desc / unit: the bar's label and unit (``unit="image"`` shows images/s).
        bar_from_first_result: show the bar only once the first results are out, counting them as done
            before its clock starts: its rate and ETA measure the steady state, not a start-up (model
            compilation) spent before the first result.
        join_timeout: seconds to wait for each thread at shutdown; a thread still running a long stage
            call after that is reported in the log (threads are daemons: they never keep the process alive).
    """

    def __init__(self, stages: list[Stage], queue_size: int = 32, progress: bool = True,
                 desc: str | None = None, unit: str = "item", join_timeout: float = 10.0,
                 bar_from_first_result: bool = False):
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = [s if isinstance(s, Stage) else Stage(s) for s in stages]
        self.queue_size = max(1, int(queue_size))
        self.progress = progress
        self.desc = desc
        self.unit = unit
        self.join_timeout = join_timeout
        self.bar_from_first_result = bar_from_first_result
        self._burst = max(s.batch_size or 1 for s in self.stages)  # results that come out together
        self._running = False

    # ---------------------------------------------------------------------------------------------- run
    def run(self, inputs: Iterable, total: int | None = None):
        """Yield an `Item` per input, in input order. ``inputs`` may be a lazy iterable.

        Closing the generator early (``break``, an exception in the loop body, ``KeyboardInterrupt``)
        stops and joins every thread before the exception propagates.
        """
        if self._running:
            raise RuntimeError("this pipeline is already running; create another Pipeline")
        if total is None and hasattr(inputs, "__len__"):
            total = len(inputs)
        self._running = True
        stop = threading.Event()
        fatal: list[BaseException] = []
        queues = [queue.Queue(self.queue_size) for _ in range(len(self.stages) + 1)]
        threads = [threading.Thread(target=self._feed, args=(inputs, queues[0], stop, fatal,
                                                             self.stages[0].workers),
                                    name="pipeline-feed", daemon=True)]
        for i, stage in enumerate(self.stages):
            n_down = self.stages[i + 1].workers if i + 1 < len(self.stages) else 1
            state = {"alive": stage.workers, "lock": threading.Lock()}
            for w in range(stage.workers):
                threads.append(threading.Thread(
                    target=self._work, args=(stage, queues[i], queues[i + 1], stop, fatal, state, n_down),
                    name=f"pipeline-{stage.name}-{w}", daemon=True))

        def make_bar(initial=0):
            return tqdm(total=total, desc=self.desc, unit=self.unit, disable=not self.progress, dynamic_ncols=True,
                        initial=initial)

        bar = None if self.bar_from_first_result else make_bar()
        pending: dict[int, Item] = {}
        next_index = 0
        n_errors = skip = 0
        try:
            for t in threads:
                t.start()
            out = queues[-1]
            ended = False
            while not fatal and not ended:
                try:
                    item = out.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if item is END:
                    break
                pending[item.index] = item
                if bar is None and next_index in pending:
                    # the first results (a batch comes out item by item): done before the bar's clock starts.
                    # At most the rest of one batch is waited for: results are handed over (and a caller may
                    # act on them, e.g. save them) as they come, never held while the stages run on
                    for _ in range(self._burst - 1):
                        try:
                            extra = out.get(timeout=_POLL_S)
                        except queue.Empty:
                            break
                        if extra is END:
                            ended = True
                            break
                        pending[extra.index] = extra
                    skip = next(i for i in range(next_index, next_index + len(pending) + 1) if i not in pending)
                    skip -= next_index
                    bar = make_bar(initial=skip)
                while next_index in pending:
                    ready = pending.pop(next_index)
                    next_index += 1
                    n_errors += not ready.ok
                    if skip:
                        skip -= 1
                    else:
                        bar.update(1)
                    if n_errors:
                        bar.set_postfix(errors=n_errors, refresh=False)
                    yield ready
            if fatal:
                # a stage failed: stop the others, hand over every result already complete, raise
                stop.set()
                while True:
                    try:
                        item = out.get_nowait()
                    except queue.Empty:
                        break
                    if item is not END:
                        pending[item.index] = item
                bar = make_bar() if bar is None else bar
                for index in sorted(pending):  # increasing order, with gaps where items were lost
                    bar.update(1)
                    yield pending.pop(index)
                raise fatal[0]
            if pending:  # cannot happen unless a stage lost items: say so rather than drop them
                raise PipelineAborted(f"pipeline ended with {len(pending)} results out of order "
                                      f"(missing index {next_index})")
        finally:
            stop.set()
            self._shutdown(threads, queues)
            if bar is not None:
                bar.close()
            self._running = False

    # ------------------------------------------------------------------------------------------ threads
    @staticmethod
    def _put(q, obj, stop):
        """Put unless asked to stop; returns False when the pipeline is stopping."""
        while not stop.is_set():
            try:
                q.put(obj, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    @staticmethod
    def _get(q, stop):
        """Get unless asked to stop; returns None when the pipeline is stopping."""
        while not stop.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return None

    def _feed(self, inputs, q, stop, fatal, n_down):
        try:
            for index, obj in enumerate(inputs):
                if not self._put(q, Item(index=index, input=obj, value=obj), stop):
                    return
        except BaseException as e:  # the input iterable itself failed (e.g. a generator raised)
            fatal.append(e)
            stop.set()
            return
        for _ in range(n_down):
            if not self._put(q, END, stop):
                return

    def _work(self, stage, q_in, q_out, stop, fatal, state, n_down):
        try:
            if stage.batch_size is None:
                self._work_items(stage, q_in, q_out, stop)
            else:
                self._work_batches(stage, q_in, q_out, stop)
        except BaseException as e:  # errors="raise", KeyboardInterrupt/SystemExit in a stage, or a bug
            fatal.append(e)
            stop.set()
            return
        with state["lock"]:  # the last worker of a stage closes the next queue
            state["alive"] -= 1
            last = state["alive"] == 0
        if last:
            for _ in range(n_down):
                if not self._put(q_out, END, stop):
                    return

    def _work_items(self, stage, q_in, q_out, stop):
        while True:
            item = self._get(q_in, stop)
            if item is None or item is END:
                return
            if item.ok:
                self._apply(stage, [item], batched=False)
            if not self._put(q_out, item, stop):
                return

    def _work_batches(self, stage, q_in, q_out, stop):
        ended = False
        while not ended:
            batch = []
            while len(batch) < stage.batch_size:
                item = self._get(q_in, stop)
                if item is None:
                    return
                if item is END:
                    ended = True
                    break
                if item.ok:
                    batch.append(item)
                elif not self._put(q_out, item, stop):  # failed earlier: pass it on, not part of a batch
                    return
            if batch:
                self._apply(stage, batch, batched=True)
                for item in batch:
                    if not self._put(q_out, item, stop):
                        return

    @staticmethod
    def _apply(stage, items, batched):
        """Run the stage on ``items`` in place: set values, or per-item errors (``errors="item"``)."""
        start = time.perf_counter()
        try:
            if batched:
                args = [[it.value for it in items]] + ([[it.input for it in items]] if stage.with_inputs else [])
                values = list(stage.fn(*args))
                if len(values) != len(items):
                    raise ValueError(f"batching stage {stage.name!r} returned {len(values)} values for "
                                     f"{len(items)} inputs")
            else:
                values = [stage.fn(items[0].value, *([items[0].input] if stage.with_inputs else []))]
        except Exception as e:
            if stage.errors == "raise":
                raise
            if len(items) > 1:  # find out which item fails: retry one at a time
                logger.warning("stage %r failed on a batch of %d (%s: %s); retrying one at a time",
                               stage.name, len(items), type(e).__name__, e)
                for it in items:
                    Pipeline._apply(stage, [it], batched=True)
                return
            for it in items:
                it.error, it.stage = e, stage.name
                it.timings[stage.name] = time.perf_counter() - start
            return
        elapsed = (time.perf_counter() - start) / len(items)
        for it, value in zip(items, values):
            it.value = value
            it.timings[stage.name] = elapsed

    def _shutdown(self, threads, queues):
        for q in queues:  # unblock producers waiting on a full queue
            _drain(q)
        deadline = time.monotonic() + self.join_timeout
        for t in threads:
            if t.ident is None:  # never started
                continue
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            logger.warning("pipeline threads still running a stage call after %.0f s (daemon threads, they "
                           "stop after that call): %s", self.join_timeout, ", ".join(alive))
        for q in queues:
            _drain(q)


def _drain(q):
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return
