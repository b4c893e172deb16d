"""Compile-job stand-ins for tests/tpu/test_harness.py: plain functions (standard library only, so a harness child
that runs them starts in a fraction of a second) that pass, raise, abort like a failed libtpu CHECK, or hang."""

import os
import sys
import time


def passes(value: int) -> None:
    assert value == 1, f"value {value}"


def raises() -> None:
    raise ValueError("unsupported block shape (8, 100)\nsecond line")


def aborts() -> None:
    # A failed libtpu CHECK: a fatal log line on stderr, then SIGABRT (no Python exception).
    print("F0000 fusion.cc:1] Check failed: rank == best_window_bounds_in_chunks.size()", file=sys.stderr, flush=True)
    os.abort()


def hangs() -> None:
    time.sleep(600)
