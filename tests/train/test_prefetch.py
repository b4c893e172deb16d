"""train/prefetch.py: the batches of a plain loop, made ahead on a thread; errors and shutdown on the caller's side."""

import threading
import time
import traceback

import numpy as np
import pytest

from effarch.train.data import TrainStream
from effarch.train.prefetch import Prefetcher


def _stream():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(53, 7))  # 53 examples, batch 5: 10 steps per epoch, 3 examples dropped
    return TrainStream(x, x + 1, batch_size=5, seed=3)


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("start", [0, 7])  # 7: a resumed run; its epoch crosses at step 10
def test_yields_the_batches_of_the_plain_loop(depth, start):
    stream, plain = _stream(), _stream()
    rows = slice(1, 4)  # one process's rows of the global batch
    with Prefetcher(lambda s: stream.batch(s, rows), start=start, stop=23, depth=depth) as batches:
        for step in range(start, 23):
            got, want = batches.get(step), plain.batch(step, rows)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


def test_runs_ahead_on_its_own_thread():
    calls = []

    def produce(step):
        calls.append((step, threading.current_thread().name))
        return step

    with Prefetcher(produce, start=4, stop=100, depth=2) as batches:
        assert batches.get(4) == 4
        deadline = time.monotonic() + 10
        while len(calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # would the thread run further than its queue allows?
        # step 4 was taken; 5 and 6 fill the queue and 7 waits to be put: bounded by depth, not by stop
        assert [s for s, _ in calls] == [4, 5, 6, 7]
        assert {name for _, name in calls} == {"effarch-prefetch"}
    assert [s for s, _ in calls] == [4, 5, 6, 7]  # closing dropped 7 and produced nothing more


def test_depth_zero_produces_in_the_caller():
    names = []
    with Prefetcher(lambda s: names.append(threading.current_thread().name) or s, start=0, stop=3,
                    depth=0) as batches:
        assert not batches.running and names == []
        assert [batches.get(s) for s in range(3)] == [0, 1, 2]
    assert names == [threading.current_thread().name] * 3


def _bad_batch(step):
    if step == 3:
        raise FileNotFoundError("shard-00003.array_record")
    return step


def test_thread_exception_surfaces_with_its_traceback():
    with Prefetcher(_bad_batch, start=0, stop=10, depth=2) as batches:
        assert [batches.get(s) for s in range(3)] == [0, 1, 2]  # the batches before the failure arrive first
        with pytest.raises(FileNotFoundError, match="shard-00003") as info:
            batches.get(3)
        frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
        assert "_bad_batch" in frames and "get" in frames  # the thread's frames and the caller's
        assert "producing the batch of step 3" in " ".join(info.value.__notes__)
        deadline = time.monotonic() + 10
        while batches.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not batches.running  # the thread ended after the failure


def test_close_joins_a_thread_blocked_on_a_full_queue_or_mid_batch():
    slow_started = threading.Event()

    def slow(step):
        if step == 1:
            slow_started.set()
            time.sleep(0.3)
        return step

    for produce, wait in ((lambda s: s, lambda: time.sleep(0.1)), (slow, slow_started.wait)):
        batches = Prefetcher(produce, start=0, stop=10**9, depth=1)
        wait()
        t0 = time.monotonic()
        batches.close()
        assert not batches.running and time.monotonic() - t0 < 5
        assert not any(t.name == "effarch-prefetch" for t in threading.enumerate())
        with pytest.raises(RuntimeError, match="after close"):
            batches.get(0)


def test_rejects_out_of_order_steps_and_bad_arguments():
    with Prefetcher(lambda s: s, start=2, stop=5, depth=1) as batches:
        with pytest.raises(ValueError, match="asked for step 3, but the next step is 2"):
            batches.get(3)
        assert [batches.get(s) for s in (2, 3, 4)] == [2, 3, 4]
        with pytest.raises(ValueError, match="asked for step 5"):
            batches.get(5)  # past stop
    with pytest.raises(ValueError, match="depth must be >= 0"):
        Prefetcher(lambda s: s, start=0, stop=1, depth=-1)
    with pytest.raises(ValueError, match="start <= stop"):
        Prefetcher(lambda s: s, start=3, stop=2, depth=1)
