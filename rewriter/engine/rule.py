"""The Rule base class, check results, and the builder a rule's ``rewrite`` records into.

A rule is ``pattern`` (structure), ``check`` (conditions, each failure with a reason; what it
found may be handed on, ``ok(plan)``) and ``rewrite`` (builds the replacement with a
:class:`RewriteBuilder`, reading the plan as ``m.planned(Kind)``). Rules never edit the graph:
the builder only creates new nodes; the driver splices them in, or discards them if anything
goes wrong.
"""

from __future__ import annotations

import difflib
import functools
import math
import numbers
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rewriter.engine.graph import ModelGraph
from rewriter.engine.graph_import import new_node, new_variable
from rewriter.engine.pattern import ConstPat, MaybeOpPat, Match, OpPat, Pattern, PatternBuilder
from rewriter.errors import PluginError

__all__ = ["Rule", "CheckResult", "ok", "fail", "skip", "RewriteBuilder", "Replacement", "RULE_DIRECTIONS", "rule_problem",
           "pattern_warnings", "defined_in"]

_ID_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

Replacement = Union[gs.Tensor, Sequence[gs.Tensor]]

#: What a rule's ``direction`` may be.
RULE_DIRECTIONS = ("to-matmul", "to-conv", "cleanup")


@dataclass(frozen=True)
class CheckResult:
    """Outcome of ``Rule.check``: truthy when the rule may fire; otherwise carries the reason.

    A ``quiet`` refusal means "not a candidate at all" (e.g. a 3-D MatMul for a 2-D-only rule):
    it is not reported as a near miss, so the report lists only sites a user could act on.
    ``plan``: what a passing ``check`` found that ``rewrite`` needs (``ok(plan)``); the driver
    hands it on as the match's :attr:`~rewriter.engine.pattern.Match.plan`, so nothing is
    worked out twice.
    """

    passed: bool
    reason: str = ""
    node: str | None = None
    quiet: bool = False
    plan: object = field(default=None, compare=False, repr=False)

    def __bool__(self) -> bool:
        return self.passed


_OK = CheckResult(True)


def ok(plan: object = None) -> CheckResult:
    """The rule may fire; ``plan`` (optional) is what ``rewrite`` gets as ``m.plan``."""
    return _OK if plan is None else CheckResult(True, plan=plan)


def fail(reason: str, node: gs.Node | str | None = None) -> CheckResult:
    """Refuse with a reason; reported as a near miss."""
    name = node.name if isinstance(node, gs.Node) else node
    return CheckResult(False, reason, name)


def skip(reason: str, node: gs.Node | str | None = None) -> CheckResult:
    """Refuse quietly: the match is not a candidate of this rule (no near-miss line)."""
    name = node.name if isinstance(node, gs.Node) else node
    return CheckResult(False, reason, name, quiet=True)


class Rule:
    """Base class of every rewrite rule (built-in or plugin).

    Class attributes:
        id: stable kebab-case id used by the CLI, the report and node provenance.
        benefit: larger patterns first; the driver tries rules in descending benefit.
        opsets: inclusive range of default-domain opsets the rule handles.
        default: part of the default policy (what runs with no ``--rules``).
        direction: ``to-matmul``, ``to-conv`` or ``cleanup``; selects rules for ``--direction``.
        family: the rule family, e.g. ``pointwise``: the unit the acceptance step rolls back
            when a rewritten model measures slower, and the name the report and its notes
            show. Inherited like any class attribute, so a family's base class declares it
            once. A rule that declares none (empty) is a family of its own, named by its
            ``id``; :meth:`family_name` is the one place that applies this default.
    """

    id: ClassVar[str] = ""
    family: ClassVar[str] = ""
    description: ClassVar[str] = ""
    benefit: ClassVar[int] = 10
    opsets: ClassVar[tuple[int, int]] = (1, 10_000)
    default: ClassVar[bool] = True
    direction: ClassVar[str] = "to-matmul"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.id and not _ID_RE.match(cls.id):
            raise ValueError(f"rule id {cls.id!r} of {cls.__qualname__} is not kebab-case")
        # Only a class's own docstring describes it (not an intermediate base's).
        doc = cls.__dict__.get("__doc__")
        if "description" not in cls.__dict__ and doc:
            cls.description = doc.strip().splitlines()[0]

    def __init__(self) -> None:
        self._compiled: OpPat | None = None

    @classmethod
    def family_name(cls) -> str:
        """The rule's family: ``family`` when declared, else the rule's own ``id``."""
        return cls.family or cls.id

    @property
    def compiled_pattern(self) -> OpPat:
        """``pattern()``'s op pattern, built once per instance; a ``pattern()`` that raises or
        returns something else is the rule's fault (``PluginError`` naming the rule and its file)."""
        if self._compiled is None:
            try:
                self._compiled = _build_pattern(self)
            except _BadPattern as exc:
                raise PluginError(f"rule '{self.id}' ({defined_in(type(self))}): {exc}") from exc.__cause__
        return self._compiled

    @property
    def anchor_ops(self) -> tuple[str, ...]:
        return self.compiled_pattern.ops

    def pattern(self, p: PatternBuilder) -> OpPat:
        raise NotImplementedError

    def check(self, m: Match) -> CheckResult:
        return ok()

    def rewrite(self, b: "RewriteBuilder", m: Match) -> Replacement:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Rule {self.id}>"


class _BadPattern(Exception):
    """Why a rule's ``pattern()`` gave no op pattern."""


def _build_pattern(rule: Rule) -> OpPat:
    try:
        pat = rule.pattern(PatternBuilder())
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise _BadPattern(f"pattern() raised {type(exc).__name__}" + (f": {text}" if text else "")) from exc
    if not isinstance(pat, OpPat):
        raise _BadPattern(f"pattern() returned {type(pat).__name__}, not an op pattern (return p.op(...))")
    return pat


def defined_in(cls: type) -> str:
    """The file that defines ``cls`` (its module's name when it has none), for messages."""
    module = sys.modules.get(cls.__module__)
    return str(getattr(module, "__file__", None) or cls.__module__)


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _is_opset_range(v: object) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            and v[0] <= v[1])


# (attribute, test, what it must be): the contract the driver, the registry and the report rely on.
_ATTRIBUTES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("id", lambda v: isinstance(v, str) and bool(_ID_RE.match(v)), "a kebab-case string"),
    ("family", lambda v: isinstance(v, str), "a string"),
    ("description", lambda v: isinstance(v, str), "a string"),
    ("benefit", _is_number, "a finite number"),
    ("opsets", _is_opset_range, "a (lowest, highest) pair of ints"),
    ("default", lambda v: isinstance(v, bool), "True or False"),
    ("direction", lambda v: v in RULE_DIRECTIONS, f"one of {', '.join(RULE_DIRECTIONS)}"),
)


def rule_problem(cls: type[Rule]) -> str | None:
    """Why the rule class ``cls`` cannot run, or None: its declared attributes, its methods, and
    its ``pattern()``, built once on a fresh instance."""
    for name, valid, wanted in _ATTRIBUTES:
        value = getattr(cls, name, None)
        if not valid(value):
            return f"{name} must be {wanted}, got {value!r}"
    for name in ("pattern", "check", "rewrite"):
        if not callable(getattr(cls, name, None)):
            return f"{name} must be a method"
    try:
        _build_pattern(cls())
    except _BadPattern as exc:
        return str(exc)
    except Exception as exc:  # its __init__
        return f"{cls.__qualname__}() raised {type(exc).__name__}: {exc}".splitlines()[0]
    return None


def pattern_warnings(cls: type[Rule]) -> list[str]:
    """Why the pattern of the valid rule class ``cls`` can never match as written: an op that is
    no ONNX operator (a typo, ``Mull``: it would match only a custom-domain node of that name),
    or an op given fewer inputs than it needs or more required inputs than it takes. A rule
    with such a pattern loads (a custom-domain op is legitimate) and is warned about."""
    found: list[str] = []
    stack: list[Pattern] = [_build_pattern(cls())]
    while stack:
        pat = stack.pop()
        if isinstance(pat, OpPat):
            stack.extend(pat.inputs)
            n_given = len(pat.inputs)
            n_required = sum(1 for q in pat.inputs if not (isinstance(q, ConstPat) and q.optional))
            found += [w for op in pat.ops if (w := _op_warning(op, n_given, n_required))]
        elif isinstance(pat, MaybeOpPat):
            stack += [pat.inner, pat.other]
            found += [w for w in [_op_warning(pat.op, 2, 2)] if w]
    return list(dict.fromkeys(found))


@functools.cache
def _onnx_ops() -> frozenset[str]:
    """Every operator of the ONNX default and ``ai.onnx.ml`` domains, any opset."""
    return frozenset(s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain in ("", "ai.onnx", "ai.onnx.ml"))


def _op_warning(op: str, n_given: int, n_required: int) -> str | None:
    if op not in _onnx_ops():
        close = difflib.get_close_matches(op, sorted(_onnx_ops()), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"pattern op '{op}' is no ONNX operator{hint}: it matches only a node of that name in a custom domain"
    domain = "" if onnx.defs.has(op) else "ai.onnx.ml"
    schema = onnx.defs.get_schema(op, domain=domain)
    lo, hi = schema.min_input, schema.max_input
    if n_given and n_given < lo:
        return f"pattern gives '{op}' {n_given} input{'s' if n_given != 1 else ''}; it takes at least {lo}: it matches nothing"
    if n_required > hi:
        return f"pattern requires {n_required} inputs of '{op}'; it takes at most {hi}: it matches nothing"
    return None


class RewriteBuilder:
    """Creates the nodes and constants of one replacement; nothing is attached to the graph
    until the driver splices the result in (and :meth:`discard` undoes every connection)."""

    def __init__(self, model: ModelGraph, rule_id: str, anchor: gs.Node) -> None:
        self.model = model
        self.rule_id = rule_id
        self._prefix = f"{anchor.name}/{rule_id}"
        self.nodes: list[gs.Node] = []
        self.constants: list[gs.Constant] = []

    def _name(self, hint: str) -> str:
        return self.model.unique_name(f"{self._prefix}/{hint}")

    def const(self, value: np.ndarray, hint: str = "const") -> gs.Constant:
        c = gs.Constant(self._name(hint), np.ascontiguousarray(value))
        self.constants.append(c)
        return c

    def ints(self, values: Sequence[int], hint: str = "shape") -> gs.Constant:
        return self.const(np.asarray(list(values), dtype=np.int64), hint)

    def op(
        self,
        op_type: str,
        inputs: Sequence[gs.Tensor | None],
        attrs: Mapping[str, object] | None = None,
        *,
        outputs: int = 1,
        dtype: object = None,
        shape: Sequence[int | str | None] | None = None,
        domain: str | None = None,
    ) -> gs.Variable:
        """Add ``op_type(inputs)``; returns its (first) output. ``None`` inputs become empty."""
        ins = [t if t is not None else new_variable("") for t in inputs]
        outs = [new_variable(self._name(f"{op_type}_out"), dtype, list(shape) if shape is not None else None)]
        outs += [new_variable(self._name(f"{op_type}_out")) for _ in range(outputs - 1)]
        node = new_node(op_type, self._name(op_type), dict(attrs or {}), ins, outs, domain)
        self.nodes.append(node)
        return outs[0]

    # Conveniences used by most rules.
    def matmul(self, a: gs.Tensor, b: gs.Tensor, **kw: object) -> gs.Variable:
        return self.op("MatMul", [a, b], **kw)  # type: ignore[arg-type]

    def add(self, a: gs.Tensor, b: gs.Tensor | None, **kw: object) -> gs.Tensor:
        """``a + b``, or ``a`` itself when ``b`` is None (no bias)."""
        return a if b is None else self.op("Add", [a, b], **kw)  # type: ignore[arg-type]

    def transpose(self, x: gs.Tensor, perm: Sequence[int], **kw: object) -> gs.Variable:
        return self.op("Transpose", [x], {"perm": list(perm)}, **kw)  # type: ignore[arg-type]

    def reshape(self, x: gs.Tensor, shape: gs.Tensor | Sequence[int], **kw: object) -> gs.Variable:
        target = shape if isinstance(shape, gs.Tensor) else self.ints(shape)
        return self.op("Reshape", [x, target], **kw)  # type: ignore[arg-type]

    def gemm(self, a: gs.Tensor, b: gs.Tensor, c: gs.Tensor | None = None, *, trans_b: bool = False, **kw: object) -> gs.Variable:
        attrs = {"transB": 1} if trans_b else {}
        return self.op("Gemm", [a, b] + ([c] if c is not None else []), attrs, **kw)  # type: ignore[arg-type]

    def discard(self) -> None:
        """Disconnect everything this builder created (the graph is as before)."""
        for node in self.nodes:
            node.inputs.clear()
            node.outputs.clear()
        self.nodes.clear()
        self.constants.clear()
