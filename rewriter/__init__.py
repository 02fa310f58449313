"""onnx-rewrite: Conv <-> MatMul/Gemm rewrites through exporter scaffolding, proven on onnxruntime."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("onnx-rewrite")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

if TYPE_CHECKING:
    from rewriter.api import Result, optimize
    from rewriter.errors import InputError, PluginError, RewriterError, VerificationError
    from rewriter.engine.pattern import Match, PatternBuilder
    from rewriter.engine.rule import CheckResult, RewriteBuilder, Rule, fail, ok, skip

__all__ = [
    "__version__",
    "optimize",
    "Result",
    "Rule",
    "ok",
    "fail",
    "skip",
    "CheckResult",
    "RewriteBuilder",
    "Match",
    "PatternBuilder",
    "RewriterError",
    "InputError",
    "PluginError",
    "VerificationError",
]

_LAZY = {
    "optimize": "rewriter.api",
    "Result": "rewriter.api",
    "Rule": "rewriter.engine.rule",
    "ok": "rewriter.engine.rule",
    "fail": "rewriter.engine.rule",
    "skip": "rewriter.engine.rule",
    "CheckResult": "rewriter.engine.rule",
    "RewriteBuilder": "rewriter.engine.rule",
    "Match": "rewriter.engine.pattern",
    "PatternBuilder": "rewriter.engine.pattern",
    "RewriterError": "rewriter.errors",
    "InputError": "rewriter.errors",
    "PluginError": "rewriter.errors",
    "VerificationError": "rewriter.errors",
}


def __getattr__(name: str) -> Any:
    # Lazy so `import rewriter` (and `onnx-rewrite --version`) stays fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rewriter' has no attribute {name!r}")
