"""utils.pipeline on plain functions: order, per-item errors, batching, shutdown, no leaked threads."""

import random
import threading
import time

import pytest

from utils.pipeline import Pipeline, PipelineAborted, Stage


def _pipeline_threads():
    return [t for t in threading.enumerate() if t.name.startswith("pipeline-")]


@pytest.fixture(autouse=True)
def no_leaked_threads():
    assert not _pipeline_threads()
    yield
    deadline = time.monotonic() + 2
    while _pipeline_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _pipeline_threads(), f"leaked threads: {_pipeline_threads()}"


def _jitter(x):
    time.sleep(random.random() * 0.002)
    return x


def test_order_kept_with_parallel_workers_and_batches():
    random.seed(0)
    batches = []

    def square_batch(xs):
        batches.append(len(xs))
        return [x * x for x in xs]

    pipe = Pipeline([Stage(_jitter, name="jitter", workers=3), Stage(lambda x: x + 1, name="inc", workers=2),
                     Stage(square_batch, name="square", batch_size=8)], queue_size=4, progress=False)
    results = list(pipe.run(range(100)))
    assert [r.index for r in results] == list(range(100))
    assert [r.value for r in results] == [(i + 1) ** 2 for i in range(100)]
    assert all(r.ok for r in results)
    assert set(results[0].timings) == {"jitter", "inc", "square"}
    # batches are full except the last one, which holds what is left when the input ends
    assert sum(batches) == 100 and all(b == 8 for b in batches[:-1]) and batches[-1] == 100 % 8


def test_lazy_input_and_single_item():
    pipe = Pipeline([Stage(str)], progress=False)
    assert [r.value for r in pipe.run(x for x in [7])] == ["7"]
    assert list(Pipeline([Stage(str)], progress=False).run([])) == []


def test_errors_are_per_item_and_skip_later_stages():
    seen_by_batch = []

    def parse(x):
        if x % 5 == 0:
            raise ValueError(f"bad {x}")
        return x

    def batch(xs):
        seen_by_batch.extend(xs)
        return [-x for x in xs]

    results = list(Pipeline([Stage(parse, workers=2), Stage(batch, batch_size=4)], progress=False).run(range(23)))
    assert [r.index for r in results] == list(range(23))
    for r in results:
        if r.input % 5 == 0:
            assert isinstance(r.error, ValueError) and str(r.error) == f"bad {r.input}"
            assert r.stage == "parse"
        else:
            assert r.ok and r.value == -r.input
    assert sorted(seen_by_batch) == [x for x in range(23) if x % 5]  # failed items never reach the batch


def test_failing_batch_retried_one_at_a_time():
    calls = []

    def batch(xs):
        calls.append(list(xs))
        if 13 in xs:
            raise RuntimeError("13 is unlucky")
        return [x * 10 for x in xs]

    results = list(Pipeline([Stage(batch, batch_size=4)], progress=False).run(range(16)))
    assert [r.value for r in results if r.ok] == [x * 10 for x in range(16) if x != 13]
    assert [r.input for r in results if not r.ok] == [13]
    assert "unlucky" in str(results[13].error) and results[13].stage == "batch"
    assert [12, 13, 14, 15] in calls and [13] in calls and [12] in calls


def test_batch_returning_wrong_length_is_an_error():
    results = list(Pipeline([Stage(lambda xs: xs[:1], name="short", batch_size=3)], progress=False).run([1]))
    assert results[0].ok
    results = list(Pipeline([Stage(lambda xs: [], name="empty", batch_size=3)], progress=False).run([1, 2]))
    assert all("returned 0 values" in str(r.error) for r in results)


def test_errors_raise_aborts_and_joins():
    def disk_full(x):
        if x == 3:
            raise OSError("no space left on device")
        return x

    got = []
    with pytest.raises(OSError, match="no space"):
        for r in Pipeline([Stage(_jitter, workers=2), Stage(disk_full, errors="raise")],
                          queue_size=2, progress=False).run(range(1000)):
            got.append(r.index)
    # what completed before the failure is still handed over, by increasing index; item 3 never is
    assert 3 not in got and got == sorted(got) and got[:3] == [0, 1, 2][: len(got[:3])]


def test_keyboard_interrupt_in_a_stage_stops_everything():
    def interrupt(x):
        if x == 10:
            raise KeyboardInterrupt
        return x

    with pytest.raises(KeyboardInterrupt):
        list(Pipeline([Stage(_jitter, workers=2), Stage(interrupt)], queue_size=2, progress=False).run(range(10**6)))


def test_keyboard_interrupt_in_the_consumer_stops_everything():
    produced = []

    def slow(x):
        produced.append(x)
        return x

    with pytest.raises(KeyboardInterrupt):
        for r in Pipeline([Stage(slow, workers=2), Stage(lambda xs: xs, batch_size=3)], queue_size=2,
                          progress=False).run(range(10**6)):
            if r.index == 5:
                raise KeyboardInterrupt
    # bounded queues: the producers stopped soon after, they did not run through the input
    assert len(produced) < 100


def test_break_closes_the_generator_and_joins():
    gen = Pipeline([Stage(_jitter)], queue_size=2, progress=False).run(iter(range(10**6)))
    assert next(gen).index == 0
    gen.close()


def test_failing_input_iterable_is_reraised():
    def inputs():
        yield 1
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError, match="gone"):
        list(Pipeline([Stage(_jitter)], progress=False).run(inputs()))


def test_lost_item_detected():
    # sanity: the reorder buffer reports missing indices instead of silently dropping later results
    pipe = Pipeline([Stage(lambda x: x)], progress=False)
    original = pipe._work_items

    def drop_first(stage, q_in, q_out, stop):
        first = pipe._get(q_in, stop)
        assert first.index == 0
        original(stage, q_in, q_out, stop)

    pipe._work_items = drop_first
    with pytest.raises(PipelineAborted, match="missing index 0"):
        list(pipe.run(range(3)))


def test_invalid_stage_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        Stage(str, batch_size=0)
    with pytest.raises(ValueError, match="exactly one worker"):
        Stage(str, batch_size=2, workers=2)
    with pytest.raises(ValueError, match="errors"):
        Stage(str, errors="ignore")


def test_progress_bar_counts_items(capsys):
    list(Pipeline([Stage(str)], progress=True, desc="demo", unit="image").run(range(5)))
    err = capsys.readouterr().err
    assert "demo" in err and "5/5" in err and "image/s" in err


def test_bar_from_first_result_counts_the_first_batch_before_its_clock(capsys):
    """With bar_from_first_result the bar appears with the first batch already counted (its start-up, e.g. a
    compilation, is not in the rate); every result still comes out, in order."""
    def double(batch):
        time.sleep(0.5)  # later batches come well after the first one
        return [x * 2 for x in batch]

    pipe = Pipeline([Stage(double, name="double", batch_size=4)], progress=True, desc="doubling",
                    bar_from_first_result=True)
    assert [item.value for item in pipe.run(range(10))] == [2 * x for x in range(10)]
    err = capsys.readouterr().err.replace(" ", "")
    assert err.startswith("\rdoubling:40%") and "4/10[00:00<?,?item/s]" in err  # no rate from the start-up
    assert "10/10" in err


def test_bar_from_first_result_does_not_hold_results_while_the_stages_run():
    """The first results are handed over once their batch is out, not held while later items keep coming:
    a caller that saves each result as it comes (prediction's map.json, which concurrent runs read) must get
    the first one while the stages are bounded by the queues. The old code waited until no result came for
    50 ms, so a stage producing one every 20 ms had finished everything before the first was yielded."""
    produced = []

    def slow(x):
        time.sleep(0.02)
        produced.append(x)
        return x

    pipe = Pipeline([Stage(slow, name="slow")], queue_size=2, progress=False, bar_from_first_result=True)
    seen_at_first = None
    for _item in pipe.run(range(20)):
        if seen_at_first is None:
            seen_at_first = len(produced)
    # item 0, at most queue_size more in the output queue and one in the worker's hands
    assert seen_at_first is not None and seen_at_first <= 4, seen_at_first
