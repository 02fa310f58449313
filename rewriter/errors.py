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
    "FailOnError",
    "RuleWarning",
    "EXIT_OK",
    "EXIT_VERIFY",
    "EXIT_INPUT",
    "EXIT_PLUGIN",
    "EXIT_FAIL_ON",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
]

EXIT_OK = 0
EXIT_VERIFY = 1
EXIT_INPUT = 2
EXIT_PLUGIN = 3
EXIT_FAIL_ON = 4  # the run succeeded (the output is written) but an event named in --fail-on happened
EXIT_INTERNAL = 70  # a bug
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM)


class RewriterError(Exception):
    """Base class: every error onnx-rewrite raises on purpose. Message is one line.
    ``in_report``: the JSON the command printed already says it (``--json`` then prints no
    second, error object)."""

    exit_code: int = EXIT_INPUT
    in_report: bool = False


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


class FailOnError(RewriterError):
    """The run succeeded, but an event the caller named (``--fail-on``, ``Result.check``)
    happened: a site rolled back, a family rejected, the output not verified, nothing
    rewritten, a near miss (exit 4). ``events``: those that happened, in the order named."""

    exit_code = EXIT_FAIL_ON

    def __init__(self, message: str, events: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.events = events


class RuleWarning(UserWarning):
    """A rule that loads but can never match as written (a pattern op that is no ONNX operator,
    an op given more inputs than it takes): warned at load, the rule stays available."""


class NonConvergenceError(RewriterError):
    """The driver hit its iteration cap; the message names the rules still firing (exit 1)."""

    exit_code = EXIT_VERIFY


def shown_path(path: str | os.PathLike[str]) -> str:
    """A path (or any name from outside) as a message shows it: in single quotes, and on one
    line whatever it holds: a newline or another control character is escaped as Python writes
    it (``'a\\nb.onnx'``), so an error stays the one line it must be."""
    text = os.fspath(path)
    return f"'{text}'" if text.isprintable() else repr(text)
