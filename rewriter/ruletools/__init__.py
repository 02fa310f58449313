"""The public toolkit a rule author imports (built-in rules too).

A rule module needs nothing from ``rewriter.engine``: everything a rule uses is here, and the
built-in families in ``rewriter.rules`` import only from ``rewriter`` and ``rewriter.ruletools``
(never each other), exactly like a plugin.

This package re-exports the core API:

- rules and results: :class:`Rule`, :class:`CheckResult`, :func:`ok`, :func:`fail`, :func:`skip`,
  :class:`RewriteBuilder` (and ``Replacement``, what ``rewrite`` returns);
- patterns and matches: :class:`PatternBuilder`, :class:`Match` (``m.claim(*nodes)`` adds nodes a
  ``check`` found beyond the pattern to the match), and the pattern node classes :class:`Pattern`,
  :class:`OpPat`, :class:`VarPat`, :class:`ConstPat`, :class:`MaybeOpPat`;
- the graph: :class:`ModelGraph` (``m.model``: constants, opset, unique names) and
  :func:`producer`, :func:`consumers`, :func:`static_shape`;
- symbolic shapes and layouts: ``Dim``, :class:`Layout`, ``LAYOUT_OPS``,
  :func:`apply_layout_node`, :func:`dims_equal`, :func:`format_dim`, :func:`format_dims`,
  :func:`symbolic_shape`.

Two bigger helper sets stay in their submodules and are imported from there (they are not
re-exported here, so their names cannot collide with each other or with the core):

- :mod:`rewriter.ruletools.layout`: channels-last chains through elementwise ops and pointwise
  convs (``walk_back``, ``Chain``, ``rebuild``, ``conv_matmul``, ``tf_conv_unit``, ...), Conv
  condition helpers (``pointwise_reason``, ``dtype_reason``) and small graph utilities;
- :mod:`rewriter.ruletools.span`: :class:`~rewriter.ruletools.span.ConvSpanRule`, the base of
  the rules whose Conv kernel spans its input (the fullspan and method1 families; with
  ``partial``, some axes spanned and the others 1: the partialspan family), and ``span_axes``.
"""

from __future__ import annotations

from rewriter.engine.graph import WALK_LIMIT, ModelGraph, consumers, producer, static_shape
from rewriter.engine.pattern import ConstPat, Match, MaybeOpPat, OpPat, Pattern, PatternBuilder, VarPat
from rewriter.engine.rule import CheckResult, Replacement, RewriteBuilder, Rule, fail, ok, skip
from rewriter.engine.shapes import (
    LAYOUT_OPS,
    Dim,
    Layout,
    apply_layout_node,
    dims_equal,
    format_dim,
    format_dims,
    symbolic_shape,
)

__all__ = [
    # rules and results
    "Rule",
    "CheckResult",
    "ok",
    "fail",
    "skip",
    "RewriteBuilder",
    "Replacement",
    # patterns and matches
    "PatternBuilder",
    "Match",
    "Pattern",
    "OpPat",
    "VarPat",
    "ConstPat",
    "MaybeOpPat",
    # the graph
    "ModelGraph",
    "producer",
    "consumers",
    "static_shape",
    "WALK_LIMIT",
    # symbolic shapes and layouts
    "Dim",
    "Layout",
    "LAYOUT_OPS",
    "apply_layout_node",
    "dims_equal",
    "format_dim",
    "format_dims",
    "symbolic_shape",
]
