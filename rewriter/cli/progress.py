"""A rich progress bar driven by the library's text callbacks ("cpu 2/4: ...", "measuring ...: 7/60").

The library reports progress as short messages so it stays free of any UI; a message holding
``N/M`` advances a real bar, any other message shows as an indeterminate step.
"""

from __future__ import annotations

import contextlib
import re
from types import TracebackType
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from rewriter import Executor

__all__ = ["StepProgress"]

_COUNT = re.compile(r"(\d+)/(\d+)")


class StepProgress:
    """``with StepProgress(console) as say: library_call(progress=say)``."""

    def __init__(self, console: Console, first: str = "starting", *, executor: Executor | None = None) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            # Piped or redirected stderr gets no bar: a log is no place for redraws.
            disable=not console.is_terminal,
        )
        self._first = first
        self._executor = executor
        self._task: TaskID | None = None
        self._unregister: Callable[[], None] | None = None

    def __enter__(self) -> Callable[[str], None]:
        self._progress.__enter__()
        self._task = self._progress.add_task(self._first, total=None)
        # The bar's refresh thread stops while the executor forks a child (no fork beside a thread).
        if self._executor is not None:
            self._unregister = self._executor.pause_during_forks(self._paused)
        return self.update

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._unregister is not None:
            self._unregister()
        self._progress.__exit__(et, ev, tb)

    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        # rich's stop() tells its refresh thread to end without waiting for it; joined here (a
        # private attribute: if rich renames it, the thread may outlive stop() and no fork happens).
        refresher = getattr(self._progress.live, "_refresh_thread", None)
        self._progress.stop()
        if refresher is not None:
            refresher.join()
        try:
            yield
        finally:
            self._progress.start()

    def update(self, message: str) -> None:
        assert self._task is not None
        found = _COUNT.search(message)
        if found:
            done, total = int(found.group(1)), int(found.group(2))
            self._progress.update(self._task, description=message, completed=done, total=max(total, 1))
        else:
            # rich reads total=None in update() as "unchanged": a new indeterminate task instead.
            self._progress.remove_task(self._task)
            self._task = self._progress.add_task(message, total=None)
