"""Batches produced ahead of the training step on a background thread, so the step never waits for the host.

The training data is addressed by step (train/data/__init__.py: batch s is a pure function of s), so a prefetcher is
just "call `produce(s)` for the next steps early": started at a resume step it yields exactly the batches the
uninterrupted run saw from that step on, and a batch made ahead but never used (the run stopped) costs nothing.

`produce` is the whole host side of one batch: read / build the numpy rows, then hand them to the devices
(`jax.device_put` with the batch sharding, or `jax.make_array_from_process_local_data` across processes; neither
runs a collective, so calling them on this thread cannot reorder anything between processes). The transfer is
asynchronous, so with `depth` batches queued the copy of batch s+1 overlaps step s.

- `depth` bounds the queue: at most `depth` produced batches wait (plus the one being produced).
  `depth=0` turns the thread off: `get(s)` calls `produce(s)` in the caller, the behaviour of a plain loop.
- An exception on the thread (a missing file, a bad record) is re-raised by the `get` of the step it was producing,
  with its own traceback and a note naming the step; the batches before it are delivered first.
- `close()` (also on leaving a `with` block: the end of the run, SIGTERM, an error) stops the thread after the batch
  it is producing and joins it. It is a daemon thread, so even a `produce` stuck in I/O cannot keep the process alive.
- `produce` is called from one thread only (this one, or the caller's when `depth=0`): a stream with a cache (the
  epoch permutation of TrainStream) needs no lock.
"""

import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger("effarch")

T = TypeVar("T")

_POLL_S = 0.05  # how often a blocked put / get looks at the stop flag and the thread's liveness


class Prefetcher(Generic[T]):
    """`produce(step)` for steps `start, start + 1, ..., stop - 1`, up to `depth` of them made ahead on a thread."""

    def __init__(self, produce: Callable[[int], T], *, start: int, stop: int, depth: int,
                 name: str = "effarch-prefetch", join_timeout_s: float = 60.0):
        if depth < 0:
            raise ValueError(f"depth must be >= 0 (0: no thread), got {depth}")
        if start < 0 or stop < start:
            raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
        self._produce = produce
        self._next, self._stop_step = start, stop
        self._join_timeout_s = join_timeout_s
        self._closing = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = None
        if depth > 0 and start < stop:
            self._thread = threading.Thread(target=self._run, args=(start,), name=name, daemon=True)
            self._thread.start()

    # --- producer thread ----------------------------------------------------------------------------------------
    def _run(self, start: int) -> None:
        step = start
        try:
            while step < self._stop_step and not self._closing.is_set():
                if not self._put((step, self._produce(step), None)):
                    return
                step += 1
        except BaseException as e:  # noqa: BLE001 - every failure is the consumer's to see, with its traceback
            self._put((step, None, e))

    def _put(self, item) -> bool:
        """Blocks while the queue is full; False when closed meanwhile (the item is dropped)."""
        while not self._closing.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    # --- consumer -----------------------------------------------------------------------------------------------
    def get(self, step: int) -> T:
        """The batch of `step`, which must be the next one (steps are consumed in order, each once)."""
        if step != self._next or step >= self._stop_step:
            raise ValueError(f"prefetcher: asked for step {step}, but the next step is {self._next} "
                             f"(steps run in order from start to stop={self._stop_step})")
        if self._closing.is_set():
            raise RuntimeError("prefetcher: get() after close()")
        self._next += 1
        if self._thread is None:
            return self._produce(step)
        while True:
            try:
                got, item, error = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"prefetcher: the thread ended without producing step {step}") from None
        if error is not None:
            error.add_note(f"(raised on the prefetch thread while producing the batch of step {got})")
            raise error
        if got != step:  # the thread runs steps in order, so this is a bug here, not bad input
            raise RuntimeError(f"prefetcher: produced step {got} where step {step} was due")
        return item

    def close(self) -> None:
        """Stops and joins the thread; queued batches are dropped (and with them their device buffers)."""
        self._closing.set()
        if self._thread is None:
            return
        self._thread.join(self._join_timeout_s)
        if self._thread.is_alive():
            log.warning("prefetch thread %s still producing a batch after %.0f s; it is a daemon thread and will "
                        "not keep the process alive", self._thread.name, self._join_timeout_s)
        while not self._queue.empty():
            self._queue.get_nowait()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
