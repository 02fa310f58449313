"""One exception hierarchy; the CLI maps each class to an exit code in one place."""

from __future__ import annotations

import os

__all__ = [
    "shown_path",
    "RewriterError",
    "InputError",
    "PluginError",
    "VerificationError",
    "NonConvergenceError",
    "NotWrittenError",
    "EXIT_OK",
    "EXIT_VERIFY",
    "EXIT_INPUT",
    "EXIT_PLUGIN",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
]

EXIT_OK = 0
EXIT_VERIFY = 1
EXIT_INPUT = 2
EXIT_PLUGIN = 3
EXIT_INTERNAL = 70  # a bug
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM)


class RewriterError(Exception):
    """Base class: every error onnx-rewrite raises on purpose. Message is one line."""

    exit_code: int = EXIT_INPUT


class InputError(RewriterError):
    """Bad model file, bad path, bad option value (exit 2)."""

    exit_code = EXIT_INPUT


class PluginError(RewriterError):
    """A rule plugin failed to load, or two rules share an id (exit 3)."""

    exit_code = EXIT_PLUGIN


class VerificationError(RewriterError):
    """No equivalent model could be produced, or two models differ (exit 1)."""

    exit_code = EXIT_VERIFY


class NotWrittenError(RewriterError):
    """The run's results could not all be delivered (its JSON report could not be printed), so
    none was written (exit 1)."""

    exit_code = EXIT_VERIFY


class NonConvergenceError(RewriterError):
    """The driver hit its iteration cap; the message names the rules still firing (exit 1)."""

    exit_code = EXIT_VERIFY


def shown_path(path: str | os.PathLike[str]) -> str:
    """A path (or any name from outside) as a message shows it: in single quotes, and on one
    line whatever it holds: a newline or another control character is escaped as Python writes
    it (``'a\\nb.onnx'``), so an error stays the one line it must be."""
    text = os.fspath(path)
    return f"'{text}'" if text.isprintable() else repr(text)
