"""The `onnx-rewrite` command line: one file per command (parse flags -> one library call ->
render), every option declared once in :mod:`rewriter.cli.params`, errors mapped to exit codes
in :mod:`rewriter.cli.app`."""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading

from rewriter.cli import cmd_batch, cmd_bench, cmd_rewrite, cmd_rules, cmd_verify  # noqa: F401  (registers the commands)
from rewriter.cli.app import app, install_signal_handlers, run_app
from rewriter.engine import forked
from rewriter.engine.collector import defer_freeing

__all__ = ["app", "main", "run_app", "setup_process"]


def main() -> None:
    install_signal_handlers()
    setup_process()
    code = run_app(sys.argv[1:])
    _exit_now(code)


def setup_process() -> None:
    """What a process that runs one command and ends with ``os._exit`` sets up (``main``, and
    benchmarks/steptimes.py so that it times what the command does)."""
    # What the imports made lives until the process ends: the collector need not walk it again
    # (each full collection did, about 0.05 s apiece).
    gc.freeze()
    # A rewrite's graph is freed only when another is built.
    defer_freeing()
    # Checks that hold the GIL may run in a forked child beside this process's own work.
    forked.allow()


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown: every file is written and closed by
    now, and freeing a large model's objects one by one at exit took 0.25 s of a 50,000-node
    run. Exit handlers still run (temporary folders, logging) and the streams are flushed; a
    thread still running (none should be) gets the normal exit instead."""
    if threading.active_count() > 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say there
            pass
    os._exit(code)
