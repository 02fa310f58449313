"""A pure computation on a second core: started in a forked child process, its result read
back when the caller needs it.

Python threads cannot run Python code side by side, nor onnx's C++ checks (shape inference,
the checker hold the interpreter lock), so work that a caller could do beside its own -- the
input's shape inference while the input is validated -- goes to a child process. The child is
a fork: it starts with the caller's memory as it is (copy-on-write, nothing serialized to
start it), computes, sends its result back pickled through a pipe and ends with ``os._exit``
(no exit handlers, no flushed buffers of the caller's).

Only where that is safe and asked for: :func:`allow` (the command line turns it on), on Linux,
while the process runs one Python thread and has not opened an onnxruntime session (whose
thread pools a fork does not copy; :func:`forbid` marks that). A thread of the caller's own
that can stop for a moment -- a progress bar's refresher -- registers a pause
(:func:`pause_during_forks`): it is stopped while the fork happens and restarted after. Anywhere
else -- and whenever the child fails in any way -- the computation runs in the caller when its
result is asked for, so the result never depends on where it ran.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
from typing import Any, Callable, ContextManager, Generic, TypeVar

__all__ = ["Background", "allow", "forbid", "pause_during_forks"]

T = TypeVar("T")

_allowed = False
_forbidden = False
_pauses: list[Callable[[], ContextManager[Any]]] = []


def allow(on: bool = True) -> None:
    """Let :class:`Background` fork from now on (``on=False``: not any more)."""
    global _allowed
    _allowed = on


def forbid() -> None:
    """No fork from now on in this process (onnxruntime's threads are running)."""
    global _forbidden
    _forbidden = True


def pause_during_forks(pause: Callable[[], ContextManager[Any]]) -> Callable[[], None]:
    """Enter ``pause()`` around every fork from now on (it stops a thread of the caller's and
    restarts it on exit); returns the function that unregisters it."""
    _pauses.append(pause)
    return lambda: _pauses.remove(pause)


def _may_fork() -> bool:
    return _allowed and not _forbidden and sys.platform == "linux" and hasattr(os, "fork")


class Background(Generic[T]):
    """``fn(*args)``, computed in a forked child when ``fork`` and forking is allowed and safe,
    else by :meth:`result`. ``fn`` must be pure (its effects in the child are lost) and its
    result picklable."""

    def __init__(self, fn: Callable[..., T], *args: Any, fork: bool = True) -> None:
        self._fn, self._args = fn, args
        self._pid: int | None = None
        self._fd = -1
        self._value: list[T] = []
        if fork and _may_fork():
            self._start()

    @property
    def forked(self) -> bool:
        """Whether a child is computing it (until :meth:`result`)."""
        return self._pid is not None

    def _start(self) -> None:
        with contextlib.ExitStack() as paused:
            for pause in list(_pauses):
                paused.enter_context(pause())
            if threading.active_count() == 1:  # no other thread may hold a lock the child needs
                self._fork()

    def _fork(self) -> None:
        read, write = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(read)
            os.close(write)
            return
        if pid == 0:  # the child: compute, send, end without the caller's exit handlers
            code = 1
            try:
                os.close(read)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                data = pickle.dumps(self._fn(*self._args), protocol=pickle.HIGHEST_PROTOCOL)
                with os.fdopen(write, "wb") as out:
                    out.write(data)
                code = 0
            except BaseException:  # noqa: BLE001 - any failure: the caller computes it itself
                pass
            finally:
                os._exit(code)
        os.close(write)
        self._pid, self._fd = pid, read

    def result(self) -> T:
        """The result: the child's when it sent one, else computed here (an exception of ``fn``
        is raised here, never in the child's name)."""
        if not self._value:
            sent = self._collect()  # a 1-tuple: None is a result like any other
            self._value.append(sent[0] if sent is not None else self._fn(*self._args))
        return self._value[0]

    def _collect(self) -> tuple[T] | None:
        if self._pid is None:
            return None
        chunks = []
        with os.fdopen(self._fd, "rb") as pipe:
            while chunk := pipe.read(1 << 20):
                chunks.append(chunk)
        _, status = os.waitpid(self._pid, 0)
        self._pid = None
        if os.waitstatus_to_exitcode(status) != 0 or not chunks:
            return None
        try:
            return (pickle.loads(b"".join(chunks)),)
        except Exception:  # noqa: BLE001 - a result that does not load: compute it here
            return None
