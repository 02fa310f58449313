"""The `onnx-rewrite` command line: one file per command, errors mapped to exit codes here."""

from __future__ import annotations

import sys

from rewriter.cli.app import app, run_app

__all__ = ["app", "main"]


def main() -> None:
    sys.exit(run_app(sys.argv[1:]))
