"""Test-only rules for the engine tests (not installed, not built-in)."""

from __future__ import annotations

import numpy as np

from rewriter.engine.rule import Rule, fail, ok


class DoubleReluToRelu(Rule):
    """Relu(Relu(x)) -> Relu(x)"""

    id = "test-double-relu"
    benefit = 5

    def pattern(self, p):
        return p.op("Relu", p.op("Relu", p.var("x"), name="inner"), name="outer")

    def rewrite(self, b, m):
        return b.op("Relu", [m["x"]])


class AddZeroToIdentity(Rule):
    """Add(x, 0) -> x  (either operand order; refuses a non-constant or non-zero operand)"""

    id = "test-add-zero"
    benefit = 3

    def pattern(self, p):
        return p.op("Add", p.var("x"), p.const("zero"), commutative=True, name="add")

    def check(self, m):
        if m["x"].shape is not None and m["zero"].shape is not None and len(m["zero"].shape) > len(m["x"].shape):
            return fail("zero operand broadcasts x up", m["add"])
        if np.any(m.value("zero") != 0):
            return fail("operand is not all zeros", m["add"])
        return ok()

    def rewrite(self, b, m):
        return m["x"]


class MatMulBiasToGemmTest(Rule):
    """Add(MatMul(x, W), b) -> Gemm  (test-only: optional bias via maybe)"""

    id = "test-matmul-gemm"
    benefit = 10

    def pattern(self, p):
        return p.op("Add", p.op("MatMul", p.var("x"), p.const("w"), name="mm"), p.const("b"), commutative=True, name="add")

    def check(self, m):
        if m["x"].shape is None or len(m["x"].shape) != 2:
            return fail("input is not 2-D", m["mm"])
        return ok()

    def rewrite(self, b, m):
        return b.gemm(m["x"], b.const(m.value("w"), "w"), b.const(m.value("b"), "b"))


class WrongTransposedWeight(Rule):
    """MatMul(x, W) -> Gemm(x, W') with W' a wrong weight (test-only: proves rollback; 2-D x)"""

    id = "test-wrong-weight"
    benefit = 1

    def pattern(self, p):
        return p.op("MatMul", p.var("x"), p.const("w"), name="mm")

    def rewrite(self, b, m):
        w = m.value("w")
        # Gemm, not MatMul: the rule must not match its own output (it would never converge).
        return b.gemm(m["x"], b.const(w[::-1].copy() + 1.0, "wrong"))


class NoKernel(Rule):
    """MatMul(x, W) -> NoSuchOp(x, W) in a domain onnxruntime has no kernel for (test-only: the
    rewritten model does not load, so no single site can be compared; bisection finds it)"""

    id = "test-no-kernel"
    benefit = 1

    def pattern(self, p):
        return p.op("MatMul", p.var("x"), p.const("w"), name="mm")

    def rewrite(self, b, m):
        return b.op("NoSuchOp", [m["x"], m["w"]], domain="test.nokernel")


class AlwaysFires(Rule):
    """Relu(x) -> Relu(x) (a new node every time: never converges)"""

    id = "test-never-converges"

    def pattern(self, p):
        return p.op("Relu", p.var("x"))

    def rewrite(self, b, m):
        return b.op("Relu", [m["x"]])


class Raises(Rule):
    """Neg(x) -> boom (rewrite raises: the graph must stay unchanged)"""

    id = "test-raises"

    def pattern(self, p):
        return p.op("Neg", p.var("x"))

    def rewrite(self, b, m):
        b.op("Abs", [m["x"]])
        raise ValueError("boom")


RULES = [DoubleReluToRelu, AddZeroToIdentity, MatMulBiasToGemmTest, WrongTransposedWeight]
