"""onnx-rewrite: Conv <-> MatMul/Gemm rewrites through exporter scaffolding, proven on onnxruntime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewriter.version import __version__

if TYPE_CHECKING:
    from rewriter.api import KEEP, Result, RuleInfo, RuleList, bench, list_rules, optimize, verify
    from rewriter.engine.executor import Executor
    from rewriter.engine.pattern import Match, PatternBuilder
    from rewriter.engine.save import Transaction, atomic_write_text, check_output_path
    from rewriter.engine.rule import CheckResult, RewriteBuilder, Rule, fail, ok, skip
    from rewriter.errors import FailOnError, InputError, PluginError, RewriterError, RuleWarning, VerificationError
    from rewriter.ir_pass import RewritePass
    from rewriter.options import MEASURED, PROVEN, BenchOptions, Options, TuneOptions, VerifyOptions

__all__ = [
    "__version__",
    "optimize",
    "verify",
    "bench",
    "list_rules",
    "Result",
    "Executor",
    "Transaction",
    "check_output_path",
    "atomic_write_text",
    "RuleList",
    "RuleInfo",
    "KEEP",
    "RewritePass",
    "Options",
    "VerifyOptions",
    "BenchOptions",
    "TuneOptions",
    "PROVEN",
    "MEASURED",
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
    "FailOnError",
    "RuleWarning",
]

_LAZY = {
    "optimize": "rewriter.api",
    "verify": "rewriter.api",
    "bench": "rewriter.api",
    "list_rules": "rewriter.api",
    "Result": "rewriter.api",
    "Executor": "rewriter.engine.executor",
    "Transaction": "rewriter.engine.save",
    "check_output_path": "rewriter.engine.save",
    "atomic_write_text": "rewriter.engine.save",
    "RuleList": "rewriter.api",
    "RuleInfo": "rewriter.api",
    "KEEP": "rewriter.api",
    "RewritePass": "rewriter.ir_pass",
    "Options": "rewriter.options",
    "VerifyOptions": "rewriter.options",
    "BenchOptions": "rewriter.options",
    "TuneOptions": "rewriter.options",
    "PROVEN": "rewriter.options",
    "MEASURED": "rewriter.options",
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
    "FailOnError": "rewriter.errors",
    "RuleWarning": "rewriter.errors",
}


def __getattr__(name: str) -> Any:
    # Lazy so `import rewriter` (and `onnx-rewrite --version`) stays fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rewriter' has no attribute {name!r}")
