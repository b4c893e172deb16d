"""One training run per run directory: an exclusive lock held for the run's whole life.

Two trainings writing one run directory mix their checkpoints, interleave their metrics and leave a config.yaml that
describes neither, so the second one must not start. `RunLock` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on
`RUN_DIR/run.lock` and keeps the file open until the run ends. The kernel releases a flock when its file is closed,
so the lock goes away on every exit path, a SIGKILL included: a lock file left behind never blocks anyone (it is
never deleted, which would let two processes lock two different files of the same name). The file holds the pid of
the holder, so the refused start can say who holds it.

Readers (`effarch eval`, `generate`, fine-tuning from a run) take no lock: they read committed checkpoints only
(train/checkpoint.py), which a running training never changes.
"""

import errno
import fcntl
import os
from pathlib import Path

from effarch.train.config import ConfigError

LOCK_NAME = "run.lock"


class RunDirInUse(ConfigError):
    """Another process holds the run directory's lock."""


class RunLock:
    """`with RunLock(run_dir):` holds run_dir's exclusive lock (the directory must exist); RunDirInUse if held."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's pid stays readable
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise RunDirInUse(f"train.run_dir: {self.path.parent} is in use by another training run ({who} holds "
                              f"{self.path}); wait for it to finish, stop it, or choose another run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an unlocked file names nobody
        except OSError:
            pass
        os.close(self._fd)  # closing the file releases the flock
        self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
