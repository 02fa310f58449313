"""Method 1: frames folded into the batch, a full-span Conv per frame, frames unfolded again.

    Reshape(X[B, F, L] -> (B*F, 1, L)) -> Conv(W[N, 1, L], b) -> Reshape(-> (B, F, N))   ->  MatMul(X, W'ᵀ) + b
    Reshape(X -> (B*F, L, 1)) -> Transpose -> Conv(k=L) -> [Transpose] -> Reshape(-> (B, F, N))
    Reshape(X -> (B*F, L, 1)) -> Unsqueeze -> Reshape|Transpose -> Conv(k=[1, L]) -> Squeeze -> [Add(c)]
        -> [Transpose] -> Reshape(-> (B, F, N))          (tf2onnx, Keras method 1)    ->  MatMul(X, W'ᵀ) + (b + c)
    any of these with X[B, L] (2-D)                                                     ->  Gemm(X, W', b, transB=1)

Nothing about the reshapes is assumed. :class:`rewriter.shapes.Layout` follows X, seen as a
(rows = every axis but the last, features = the frame of length L) matrix, through the inner
chain: the Conv input must be (rows, C, *S) with C*prod(S) = L and kernel = S, i.e. each
Conv batch item is exactly one frame of X (which tap reads which sample gives W'). From the
Conv output (rows, N, 1, ...) the outer chain must end in exactly X's leading dims followed
by N, proven dim by dim: reshape targets are evaluated symbolically (constants, or computed
at run time by Shape -> Gather -> Unsqueeze -> Concat, Shape(start, end), Slice, Cast, ...),
with 0 (copy, unless allowzero) and one -1 or unknown entry resolved by the element count;
static shapes from shape inference count as proof too. Anything else is a near miss:
"inner Reshape does not flatten X's leading dims ..." or "outer Reshape target not
provably (B, F, N)" (e.g. a (B*F, N) target or swapped dims).

Conv conditions are those of rewriter/ruletools/span.py (group 1, float dtype, no padding, dilation
1, constant weight/bias, static frame length). L = 1 is handled here too (a dense layer on
an axis of size 1); a pointwise rule anchored at the Conv may reach it first.
"""

from __future__ import annotations

from rewriter.ruletools.span import ConvSpanRule

__all__ = [
    "ReshapeConvReshapeToMatMul",
    "ReshapeConvLayoutReshapeToMatMul",
    "ReshapeTransposeConvReshapeToMatMul",
    "ReshapeTransposeConvTransposeReshapeToMatMul",
    "Tf2onnxMethod1ToMatMul",
    "Tf2onnxMethod1TransposedToMatMul",
    "RULES",
]


class _Method1(ConvSpanRule):
    family = "method1"
    rows_from_last = True


class ReshapeConvReshapeToMatMul(_Method1):
    """Reshape(X -> (B*F, 1, L)) -> Conv(k=L) -> Reshape(-> (B, F, N))  ->  MatMul(X, Wᵀ) + b"""

    id = "method1-conv-to-matmul"
    benefit = 30
    pre = ("R",)
    post = ("R",)


class ReshapeConvLayoutReshapeToMatMul(_Method1):
    """Reshape -> Conv(k=L) -> [Add] -> Squeeze/Transpose/Reshape -> Reshape(-> (B, F, N))  ->  MatMul(X, Wᵀ) + b"""

    id = "method1-conv-layout-to-matmul"
    benefit = 31
    pre = ("R",)
    post = ("L", "R")


class ReshapeTransposeConvReshapeToMatMul(_Method1):
    """Reshape(X -> (B*F, L, 1)) -> Transpose -> Conv(k=L) -> Reshape(-> (B, F, N))  ->  MatMul(X, Wᵀ) + b"""

    id = "method1-transposed-conv-to-matmul"
    benefit = 33
    pre = ("R", "L")
    post = ("R",)


class ReshapeTransposeConvTransposeReshapeToMatMul(_Method1):
    """Reshape -> Transpose -> Conv(k=L) -> [Add] -> Transpose -> Reshape(-> (B, F, N))  ->  MatMul(X, Wᵀ) + b"""

    id = "method1-transposed-conv-transposed-to-matmul"
    benefit = 34
    pre = ("R", "L")
    post = ("L", "R")


class Tf2onnxMethod1ToMatMul(_Method1):
    """Reshape -> Unsqueeze -> Reshape -> Conv(k=[1, L]) -> Squeeze -> [Add] -> Reshape  ->  MatMul(X, Wᵀ) + b"""

    id = "method1-tf2onnx-to-matmul"
    benefit = 40
    pre = ("R", "L", "L")
    post = ("L", "R")


class Tf2onnxMethod1TransposedToMatMul(_Method1):
    """Reshape -> Unsqueeze -> Transpose -> Conv(k=[1, L]) -> Squeeze -> [Add] -> Transpose -> Reshape  ->  MatMul + b"""

    id = "method1-tf2onnx-transposed-to-matmul"
    benefit = 41
    pre = ("R", "L", "L")
    post = ("L", "L", "R")


RULES = [
    ReshapeConvReshapeToMatMul,
    ReshapeConvLayoutReshapeToMatMul,
    ReshapeTransposeConvReshapeToMatMul,
    ReshapeTransposeConvTransposeReshapeToMatMul,
    Tf2onnxMethod1ToMatMul,
    Tf2onnxMethod1TransposedToMatMul,
]
