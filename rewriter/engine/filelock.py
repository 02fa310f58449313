"""An exclusive lock between processes on a lock file (``fcntl.flock``).

Used where several onnx-rewrite processes share a resource: the tuning cache file
(read-merge-write) and, in batch mode, the machine while it measures. Where ``fcntl`` is not
available (Windows) the lock is a no-op: the callers stay correct for one process at a time.
The lock file is left in place (removing it would race with a process about to lock it); the
kernel releases the lock when the holder exits, however it exits.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["exclusive_lock", "LOCKING_AVAILABLE"]

LOCKING_AVAILABLE = fcntl is not None


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str], on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Blocks while another process holds it; ``on_wait`` is called once, before blocking, when
    the lock is not free at once. Locks on separately opened files conflict even within one
    process, so two threads must not both take the same lock through this function."""
    if fcntl is None:
        yield
        return
    fd = os.open(Path(path), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
