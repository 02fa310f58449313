"""Test a rule the way the tool proves it: every site checked at its own boundary.

For rule authors (plugins) and for the built-in families' own tests::

    from rewriter.testing import check_rule

    def test_my_rule():
        check = check_rule(MyRule, "model.onnx", sites=2)      # raises AssertionError if anything is off
        assert check.dtype == "float64"

:func:`check_rule` applies one rule (alone) to a model and verifies the result on onnxruntime the
way the pipeline does (:mod:`rewriter.prove.evidence`): at several values of every dynamic dim
(searched for when the defaults do not run, plus any ``shapes`` given), every rewritten site
compared where it meets the rest of the model, not only the graph outputs -- so an ArgMax head or
an untaken branch cannot hide a wrong rewrite. Where onnxruntime runs both models in float64, both
are converted and compared there, at float64's tolerance (a weight off by 1e-6 fails); otherwise
(onnxruntime has no float64 Conv on CPU, say) in their own dtype, and :attr:`RuleCheck.dtype` says
which. A second run of the rule on its own output must change nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from rewriter.engine.driver import AppliedSite, NearMiss
from rewriter.engine.model_io import load_model
from rewriter.engine.registry import discover
from rewriter.engine.rewrite import rewrite
from rewriter.engine.rule import Rule
from rewriter.engine.tensors import has_external_data
from rewriter.ort import SessionError, make_session, max_ir_version, model_source
from rewriter.prove.result import VerificationResult
from rewriter.prove.verify import VerifyOptions, verify_models

__all__ = ["RuleCheck", "check_rule", "as_float64"]

_F32, _F64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE


@dataclass(frozen=True)
class RuleCheck:
    """What :func:`check_rule` found: the model as checked (``original``, possibly in float64),
    the rule's output, its sites and near misses, the verification (every site's evidence in
    ``verification.sites``), and the dtype the comparison ran in (``note`` says why not
    float64 when it did not)."""

    original: onnx.ModelProto
    rewritten: onnx.ModelProto
    sites: tuple[AppliedSite, ...]
    near_misses: tuple[NearMiss, ...]
    verification: VerificationResult
    dtype: str
    note: str = ""


RuleLike = type[Rule] | Rule | str


def check_rule(
    rule: RuleLike | Sequence[RuleLike],
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    sites: int | None = None,
    shapes: Sequence[Mapping[str, Sequence[int]]] = (),
    float64: bool = True,
    options: VerifyOptions | None = None,
) -> RuleCheck:
    """Apply ``rule`` alone (or a list of rules together: a chain several rules rewrite) to
    ``model`` and prove every site rewritten (see the module docstring). ``sites``: how many
    must be rewritten (default: at least one); ``shapes``: whole input shapes to run besides the
    searched ones; ``float64``: compare in float64 where onnxruntime can. Raises AssertionError
    naming what failed."""
    rules = [_instance(r) for r in _listed(rule)]
    name = ", ".join(r.id for r in rules)
    loaded = load_model(model, ir_ceiling=max_ir_version())
    done = rewrite(loaded, rules)
    applied = done.result.applied
    if sites is None:
        assert applied, f"{name} rewrote nothing; near misses: {_misses(done.result.near_misses)}"
    else:
        assert len(applied) == sites, f"{name} rewrote {len(applied)} site(s), expected {sites}; near misses: {_misses(done.result.near_misses)}"
    again = rewrite(load_model(done.model, ir_ceiling=max_ir_version()), rules)
    assert not again.result.applied, f"a second run of {name} rewrote again: {[s.anchor for s in again.result.applied]}"
    original, rewritten, dtype, note = loaded.model, done.model, _dtype_of(loaded.model), ""
    if float64 and _has_float32(original) and not has_external_data(original):
        wide = as_float64(original), as_float64(rewritten)
        why = _unrunnable(*wide)
        if why is None:
            original, rewritten, dtype = wide[0], wide[1], "float64"
        else:
            note = f"checked in {dtype}: {why}"
    opts = replace(options or VerifyOptions(providers=("cpu",)), extra_shapes=tuple({k: tuple(v) for k, v in s.items()} for s in shapes))
    result = verify_models(original, rewritten, opts, base_dir=loaded.base_dir, sites=applied)
    bad = [e for e in result.sites.values() if not e.verified]
    assert not bad, "; ".join(f"site {e.anchor!r} ({e.rule}) {e.status}: {e.reason}" for e in bad)
    failed = [f"{n}: {p.reason}" for n, p in result.providers.items() if p.status == "failed"]
    assert result.passed, "not equivalent: " + ("; ".join(failed) or f"{result.nothing_ran}")
    return RuleCheck(original, rewritten, applied, done.result.near_misses, result, dtype, note)


def _listed(rule: RuleLike | Sequence[RuleLike]) -> list[RuleLike]:
    if isinstance(rule, (list, tuple)):
        return list(rule)
    return [rule]  # type: ignore[list-item]


def _instance(rule: type[Rule] | Rule | str) -> Rule:
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str):
        found = discover().rules.get(rule)
        assert found is not None, f"no rule {rule!r}"
        return found.rule()
    return rule()


def _misses(misses: Sequence[NearMiss]) -> str:
    return "; ".join(f"{m.rule} at {m.node}: {m.reason}" for m in misses) or "none"


def _dtype_of(model: onnx.ModelProto) -> str:
    """The float type the model computes in: its float inputs' (else its outputs')."""
    for values in (model.graph.input, model.graph.output):
        elems = {vi.type.tensor_type.elem_type for vi in values if vi.type.HasField("tensor_type")}
        floats = {e for e in elems if e and np.dtype(onnx.helper.tensor_dtype_to_np_dtype(e)).kind == "f"}
        if len(floats) == 1:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(floats.pop())).name
    return "mixed"


def _has_float32(model: onnx.ModelProto) -> bool:
    return any(vi.type.tensor_type.elem_type == _F32 for vi in [*model.graph.input, *model.graph.output]) or \
        any(t.data_type == _F32 for t in model.graph.initializer)


def _unrunnable(*models: onnx.ModelProto) -> str | None:
    """Why onnxruntime cannot open one of ``models`` on CPU, or None."""
    for m in models:
        try:
            make_session(model_source(m, "float64 copy"), "cpu")
        except SessionError as exc:
            return f"onnxruntime cannot run it in float64 ({exc.detail})"
    return None


def as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing in float64 where it computed in float32: float initializers,
    constants, inputs, outputs, value infos and every ``to``/``dtype`` attribute naming float32,
    in the main graph and every body. Values are converted exactly (float32 -> float64)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _widen_graph(copy.graph)
    return copy


def _widen_graph(g: onnx.GraphProto) -> None:
    for t in g.initializer:
        _widen_tensor(t)
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type == _F32:
            vi.type.tensor_type.elem_type = _F64
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                _widen_tensor(a.t)
            elif a.type == onnx.AttributeProto.GRAPH:
                _widen_graph(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _widen_graph(sub)
            elif a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype") and a.i == _F32:
                a.i = _F64


def _widen_tensor(t: onnx.TensorProto) -> None:
    if t.data_type != _F32 or t.data_location == onnx.TensorProto.EXTERNAL:
        return
    value = onnx.numpy_helper.to_array(t).astype(np.float64)
    t.CopyFrom(onnx.numpy_helper.from_array(value, t.name))
