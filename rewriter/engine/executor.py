"""How the library uses the process it runs in: one object, :class:`Executor`, made by whoever
owns the process and handed to the library, decides every process-level trick.

Three tricks, each kept because ``benchmarks/executor_tricks.py`` shows it saves at least 5% at 50,000 nodes
(docs/scale.md has the table and the command):

- **The cyclic collector paused around a rewrite.** Building, rewriting and exporting a graph
  allocates hundreds of thousands of objects and no garbage; each collection they trigger walks
  all of them again. Always on: it changes nothing but time.
- **A second core for pure work** (``fork``). A computation that holds the interpreter lock --
  the input's shape inference while its graph is imported, the write gate's region cut while
  the file is written -- runs in a forked child, its result read back through a pipe. Only on
  Linux, and only while the process runs no thread it did not run when the executor was made
  (no onnxruntime thread pool, no progress-bar refresher, no loader thread: a fork copies none
  of them and could copy a lock one of them holds). A thread of the owner's that can stop for
  a moment registers a pause (:meth:`Executor.pause_during_forks`). Whenever a child is not
  allowed or fails in any way the caller computes the result itself: results never depend on
  where they were computed.
- **Deferred freeing for a process about to end** (``one_command``). Every onnx-graphsurgeon
  node and tensor is a reference cycle: a rewrite's graph is taken apart to be freed. A process
  that ends with ``os._exit`` (:meth:`Executor.end_process`) need not free the last one at all:
  each graph is held until the next rewrite starts, frozen out of the collector's walks, and
  the objects made by imports are frozen when the executor is made.

``Executor()`` -- what the library uses when handed none -- pauses the collector and nothing
else. The command line makes ``Executor.for_one_command()``; a Python program that runs one job
and ends may make the same and get the command line's cost profile.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import pickle
import signal
import sys
import threading
from typing import Any, Callable, ContextManager, Generic, Iterator, NoReturn, TypeVar

__all__ = ["Executor", "Pending"]

T = TypeVar("T")


def _thread_count() -> int | None:
    """Every thread of this process, native ones included (onnxruntime's pools, OpenBLAS's);
    None where the system does not say (no fork then)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


class Pending(Generic[T]):
    """``fn(*args)``: computed by a forked child, or by :meth:`result` when no child runs it."""

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        self._fn, self._args = fn, args
        self._pid: int | None = None
        self._fd = -1
        self._value: list[T] = []

    @property
    def forked(self) -> bool:
        """Whether a child is computing it (until :meth:`result`)."""
        return self._pid is not None

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


class Executor:
    """The process-level choices of one job (see the module's text): ``fork`` lets pure work run
    in a forked child, ``one_command`` says the process ends with :meth:`end_process` (deferred
    freeing, imports frozen out of the collector)."""

    def __init__(self, *, fork: bool = False, one_command: bool = False) -> None:
        self.fork = fork and sys.platform == "linux" and hasattr(os, "fork")
        self.one_command = one_command
        self._threads = _thread_count() if self.fork else None  # the threads a fork may leave behind
        self._pauses: list[Callable[[], ContextManager[Any]]] = []
        self._retired: list[Callable[[], None]] = []
        if one_command:
            # What the imports made lives until the process ends: no collection need walk it again.
            gc.freeze()

    @classmethod
    def for_one_command(cls) -> "Executor":
        """What a process that runs one job and then :meth:`end_process` uses (the command line)."""
        return cls(fork=True, one_command=True)

    def __repr__(self) -> str:
        return f"Executor(fork={self.fork}, one_command={self.one_command})"

    # -- a second core ------------------------------------------------------------------------

    def background(self, fn: Callable[..., T], *args: Any) -> Pending[T]:
        """``fn(*args)``, started in a forked child where this executor allows it and the process
        can fork safely now, else computed when its result is asked for. ``fn`` must be pure
        (its effects in the child are lost) and its result picklable."""
        job = Pending(fn, args)
        if self.fork:
            with contextlib.ExitStack() as paused:
                for pause in list(self._pauses):
                    paused.enter_context(pause())
                now = _thread_count()
                if now is not None and self._threads is not None and now <= self._threads:
                    job._fork()
        return job

    def pause_during_forks(self, pause: Callable[[], ContextManager[Any]]) -> Callable[[], None]:
        """Enter ``pause()`` around every fork from now on (it stops a thread of the caller's and
        restarts it on exit); returns the function that unregisters it."""
        self._pauses.append(pause)
        return lambda: self._pauses.remove(pause)

    # -- the collector and freeing ------------------------------------------------------------

    @contextlib.contextmanager
    def collector_paused(self) -> Iterator[None]:
        """The cyclic collector off for the block (its previous state restored after). Only where
        what the block leaves behind is freed by reference counting or by :meth:`retire`."""
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            if was_enabled:
                gc.enable()

    def retire(self, free: Callable[[], None]) -> None:
        """``free()`` takes a graph apart: called now, or -- in a process about to end -- held until
        the next :meth:`free_retired` (the graph stays alive, frozen out of the collector's walks)."""
        if not self.one_command:
            free()
            return
        self.free_retired()
        self._retired.append(free)
        gc.freeze()  # the held graph is not garbage: no collection need walk it

    def free_retired(self) -> None:
        """Free the graph :meth:`retire` holds, if any (before a new one is built: one at a time)."""
        while self._retired:
            self._retired.pop()()

    # -- the end ------------------------------------------------------------------------------

    def end_process(self, code: int) -> NoReturn:
        """End the process with ``code``. For a one-command executor without the interpreter's
        teardown (every file is written and closed by now; freeing a large model's objects one by
        one took 0.25 s at 50,000 nodes): exit handlers still run and the streams are flushed. A
        thread still running (none should be), or any other executor: the normal exit."""
        if not self.one_command or threading.active_count() > 1:
            sys.exit(code)
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken pipe: nothing more to say there
                pass
        os._exit(code)
