"""The `onnx-rewrite` command line: one file per command (parse flags -> one library call ->
render), every option declared once in :mod:`rewriter.cli.params`, errors mapped to exit codes
in :mod:`rewriter.cli.app`. It imports only the public API (``rewriter``, ``rewriter.options``,
``rewriter.errors``, ``rewriter.report``): an import-linter contract."""

from __future__ import annotations

import sys

from rewriter import Executor
from rewriter.cli import cmd_batch, cmd_bench, cmd_rewrite, cmd_rules, cmd_verify  # noqa: F401  (registers the commands)
from rewriter.cli.app import app, install_signal_handlers, run_app

__all__ = ["app", "main", "run_app"]


def main() -> None:
    """The ``onnx-rewrite`` command: one job in this process, which then ends
    (:meth:`rewriter.Executor.for_one_command`: forked checks, deferred freeing, no teardown)."""
    install_signal_handlers()
    executor = Executor.for_one_command()
    code = run_app(sys.argv[1:], executor=executor)
    executor.end_process(code)
