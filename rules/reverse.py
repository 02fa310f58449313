"""MatMul/Gemm with a constant weight -> pointwise Conv (direction ``to-conv``, opt-in).

    Add(MatMul(X, W), b) on (B, L, K)    -> Transpose(0,2,1) -> Conv(W[N, K, 1], b) -> Transpose(0,2,1)
    Add(MatMul(X, W), b) on (M, K)       -> Unsqueeze(X, 2) -> Conv(W[N, K, 1], b) -> Squeeze(2)
    MatMul(X, W)                         -> the same without bias
    Gemm(A, B, C, transB, alpha, beta)   -> Unsqueeze(A, 2) -> Conv(alpha·B'ᵀ[N, K, 1], beta·C) -> Squeeze(2)

The pointwise family maps each result back (``transposed-conv1x1-to-matmul``,
``unsqueezed-conv1x1-to-matmul`` + ``matmul-add-to-gemm``), so a round trip gives the
original op counts. A bias that varies along anything but the last axis is refused.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from rewriter.ruletools import CheckResult, Match, OpPat, PatternBuilder, RewriteBuilder, Rule, fail, ok, skip
from rewriter.ruletools.layout import applies, channel_vector, dtype_reason, rank_of, squeeze, unsqueeze

__all__ = ["MatMulAddToConv1x1", "MatMulToConv1x1", "GemmToConv1x1", "RULES"]

_T1 = [0, 2, 1]


class _Reverse(Rule):
    family = "reverse"
    direction = "to-conv"
    default = False

    def input_check(self, m: Match, x: gs.Tensor, node: gs.Node) -> CheckResult:
        rank = rank_of(x)
        if rank is None:
            return fail("input rank unknown", node)
        if rank not in (2, 3):
            return fail(f"input rank {rank}: only 2-D and 3-D inputs are handled", node)
        reason = dtype_reason(x, m["w"])
        return fail(reason, node) if reason else ok()

    def weight_check(self, m: Match, node: gs.Node) -> CheckResult:
        shape = m["w"].shape
        if shape is None or len(shape) != 2:
            return fail(f"weight shape {shape} is not 2-D", node)
        return ok()

    def site_check(self, m: Match, node: gs.Node) -> CheckResult:
        """Weight, then input: the checks every reverse rule starts with."""
        res = self.weight_check(m, node)
        return self.input_check(m, m["x"], node) if res else res

    def conv(self, b: RewriteBuilder, m: Match, x: gs.Tensor, w_nk: np.ndarray, bias: np.ndarray | None, out: gs.Tensor) -> gs.Tensor:
        """Conv(k=1) applied along the last axis of x (2-D or 3-D), shaped like ``out``."""
        n = w_nk.shape[0]
        dtype = out.dtype
        rank = rank_of(x)
        if rank == 3:
            xs = x.shape
            cf = b.transpose(x, _T1, dtype=dtype, shape=[xs[0], xs[2], xs[1]])
        else:
            cf = unsqueeze(b, m.model, x, [2], dtype=dtype, shape=list(x.shape) + [1])
        inputs = [cf, b.const(np.ascontiguousarray(w_nk[:, :, None]), "weight")]
        if bias is not None:
            inputs.append(b.const(np.ascontiguousarray(bias.astype(w_nk.dtype, copy=False)), "bias"))
        attrs = {"kernel_shape": [1], "strides": [1], "pads": [0, 0], "dilations": [1], "group": 1}
        shape = [cf.shape[0], n, cf.shape[2]] if cf.shape is not None else None
        y = b.op("Conv", inputs, attrs, dtype=dtype, shape=shape)
        if rank == 3:
            return b.transpose(y, _T1, dtype=dtype, shape=out.shape)
        return squeeze(b, m.model, y, [2], dtype=dtype, shape=out.shape)


class MatMulAddToConv1x1(_Reverse):
    """Add(MatMul(X, W), b) with constant W on 2-D/3-D X  ->  Conv(k=1) behind Transpose or Unsqueeze/Squeeze"""

    id = "matmul-add-to-conv1x1"
    benefit = 10

    def pattern(self, p: PatternBuilder) -> OpPat:
        mm = p.op("MatMul", p.var("x"), p.const("w"), name="mm")
        return p.op("Add", mm, p.const("b"), name="add", commutative=True)

    def check(self, m: Match) -> CheckResult:
        res = self.site_check(m, m["mm"])
        if not res:
            return res
        rank, n = rank_of(m["x"]), int(m["w"].shape[1])
        assert rank is not None  # site_check refused an unknown rank
        if channel_vector(m.value("b"), n, rank, rank - 1) is None:
            return fail(f"bias of shape {list(np.asarray(m.value('b')).shape)} is not a per-output-channel vector", m["add"])
        return ok()

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        w = np.asarray(m.value("w"))
        rank = rank_of(m["x"])
        assert rank is not None  # check() refused an unknown rank
        bias = channel_vector(m.value("b"), w.shape[1], rank, rank - 1)
        return self.conv(b, m, m["x"], w.T, bias, m["add"].outputs[0])


_WITH_BIAS = MatMulAddToConv1x1()


class MatMulToConv1x1(_Reverse):
    """MatMul(X, W) with constant W on 2-D/3-D X  ->  Conv(k=1) behind Transpose or Unsqueeze/Squeeze"""

    id = "matmul-to-conv1x1"
    benefit = 9

    def pattern(self, p: PatternBuilder) -> OpPat:
        return p.op("MatMul", p.var("x"), p.const("w"), name="mm")

    def check(self, m: Match) -> CheckResult:
        res = self.site_check(m, m["mm"])
        if not res:
            return res
        out = m["mm"].outputs[0]
        if len(out.outputs) == 1 and not any(out is o for o in m.graph.outputs) and applies(_WITH_BIAS, out.outputs[0], m):
            return skip(f"a bias Add follows: left to {_WITH_BIAS.id}", m["mm"])
        return ok()

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        w = np.asarray(m.value("w"))
        return self.conv(b, m, m["x"], w.T, None, m["mm"].outputs[0])


class GemmToConv1x1(_Reverse):
    """Gemm(A, B, C) with constant B (and C) on 2-D A  ->  Unsqueeze -> Conv(k=1) -> Squeeze"""

    id = "gemm-to-conv1x1"
    benefit = 9

    def pattern(self, p: PatternBuilder) -> OpPat:
        return p.op("Gemm", p.var("x"), p.const("w"), p.opt_const("c"), name="gemm")

    def check(self, m: Match) -> CheckResult:
        gemm = m["gemm"]
        if int(gemm.attrs.get("transA", 0)) != 0:
            return fail("transA=1 is not handled", gemm)
        res = self.site_check(m, gemm)
        if not res:
            return res
        if "c" in m:
            n = int(m["w"].shape[0 if int(gemm.attrs.get("transB", 0)) else 1])
            if channel_vector(m.value("c"), n, 2, 1) is None:
                return fail(f"C of shape {list(np.asarray(m.value('c')).shape)} is not a per-output-column bias", gemm)
        return ok()

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        gemm = m["gemm"]
        w = np.asarray(m.value("w"))
        w_nk = w if int(gemm.attrs.get("transB", 0)) else w.T
        alpha, beta = float(gemm.attrs.get("alpha", 1.0)), float(gemm.attrs.get("beta", 1.0))
        if alpha != 1.0:
            w_nk = (w_nk * alpha).astype(w.dtype)
        bias = None
        if "c" in m:
            bias = channel_vector(m.value("c"), w_nk.shape[0], 2, 1)
            assert bias is not None  # check() refused a C that is not a per-column vector
            if beta != 1.0:
                bias = (bias * beta).astype(w.dtype)
        return self.conv(b, m, m["x"], w_nk, bias, gemm.outputs[0])


RULES = [MatMulAddToConv1x1, MatMulToConv1x1, GemmToConv1x1]
