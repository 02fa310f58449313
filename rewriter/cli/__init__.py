"""The `onnx-rewrite` command line: one file per command (parse flags -> one library call ->
render), every option declared once in :mod:`rewriter.cli.params`, errors mapped to exit codes
in :mod:`rewriter.cli.app`."""

from __future__ import annotations

import sys

from rewriter.cli import cmd_batch, cmd_bench, cmd_rewrite, cmd_rules, cmd_verify  # noqa: F401  (registers the commands)
from rewriter.cli.app import app, install_signal_handlers, run_app

__all__ = ["app", "main", "run_app"]


def main() -> None:
    install_signal_handlers()
    sys.exit(run_app(sys.argv[1:]))
