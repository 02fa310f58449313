"""The consoles the commands print on.

On a terminal rich fits the output to the window. Piped or redirected (a log, ``| cat``, a test),
there is no window: lines are printed whole, so a node name or a path is never folded across
two lines, and tables take the width their cells need."""

from __future__ import annotations

import errno

from rich.console import Console

__all__ = ["stdout_console", "stderr_console"]

#: Wide enough that no table of ours or line is folded; rich pads nothing to this width.
_UNBOUNDED = 100_000


class _Console(Console):
    """rich ends the process (``SystemExit(1)``) when the reader of stdout is gone; here the
    command decides what that means (a BrokenPipeError it handles: see ``cmd_rewrite``)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True  # nothing more is printed there
        raise BrokenPipeError(errno.EPIPE, "stdout was closed")


def stdout_console() -> Console:
    probe = _Console()
    return probe if probe.is_terminal else _Console(width=_UNBOUNDED, soft_wrap=True)


def stderr_console() -> Console:
    probe = Console(stderr=True)
    return probe if probe.is_terminal else Console(stderr=True, width=_UNBOUNDED, soft_wrap=True)
