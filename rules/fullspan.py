"""Full-span Conv as a dense layer: a Conv whose kernel covers the whole (static) input.

    Conv(X[B, C, *S], W[N, C, *S], b) (valid, group 1)          ->  Reshape(Gemm(Flatten(X), W', b), (B, N, 1, ...))
    Conv(X, W, b) -> [Add(c)] -> Flatten | Reshape(B, N) | Squeeze ->  Gemm(Flatten(X), W', b + c)
    Unsqueeze -> Transpose -> Conv(kernel [1, L]) -> Squeeze -> [Add] -> Reshape | Transpose | Unsqueeze
        (tf2onnx Keras Conv1D(N, kernel_size=L) on X[B, L, K])       ->  Gemm(Flatten(X), W', b) [-> Reshape]

W' is the weight permuted into the flatten order of the *original* tensor X: C-major for
torch's (B, C, L), L-major for Keras's (B, L, K) behind tf2onnx's layout scaffolding, which
vanishes. The proof is :class:`rewriter.shapes.Layout`: X is followed through every layout
op to the Conv (and from the Conv to the root) as a (rows, features) matrix, so the rule
knows which feature of X each kernel tap reads, instead of assuming the exporter's idiom.

Conditions (each refusal is a near miss with its reason): constant weight and bias, group 1,
float dtype, no padding (``auto_pad`` VALID or NOTSET with zero pads), dilation 1 on every
axis whose kernel is > 1, and a *statically known* spatial size equal to the kernel (a
dynamic spatial axis is refused even when the kernel equals its export-time size). Strides
do not matter: a kernel that spans the input has exactly one output position.

A kernel of size 1 on a spatial size of 1 is both pointwise and full span; this family
leaves it to the pointwise rules (``spatial size 1`` near miss). Method 1 (rules/method1.py)
is the same proof with every axis of X but the last as rows.

The shared base :class:`ConvSpanRule` lives in rewriter/ruletools/span.py (method 1 uses it too). The
bigger chain rules carry a higher benefit, and the driver applies the highest-benefit match
of a sweep first, so a Conv -> Flatten chain becomes one Gemm, not a Gemm plus a Reshape.
"""

from __future__ import annotations

from rewriter.ruletools.span import ConvSpanRule

__all__ = [
    "FullSpanConvToGemm",
    "FullSpanConvFlattenToGemm",
    "Tf2onnxFullSpanConv1dToGemm",
    "Tf2onnxFullSpanConv1dBiasToGemm",
    "Tf2onnxFullSpanConv1dSqueezeToGemm",
    "RULES",
]


class _FullSpan(ConvSpanRule):
    family = "fullspan"


class FullSpanConvToGemm(_FullSpan):
    """Conv(kernel = spatial size) -> Reshape(Gemm(Flatten(X), W', b), conv output shape)"""

    id = "fullspan-conv-to-gemm"
    benefit = 15


class FullSpanConvFlattenToGemm(_FullSpan):
    """Conv(kernel = spatial size) -> [Add] -> Flatten/Reshape(B, N)/Squeeze -> Gemm(Flatten(X), W', b)"""

    id = "fullspan-conv-flatten-to-gemm"
    benefit = 20
    post = ("L",)


class Tf2onnxFullSpanConv1dToGemm(_FullSpan):
    """Unsqueeze -> Transpose -> Conv(k=[1, L]) -> Squeeze -> [Add] -> layout op -> Gemm(Flatten(X), W', b)"""

    id = "fullspan-tf2onnx-conv1d-to-gemm"
    benefit = 25
    pre = ("L", "L")
    post = ("L", "L")


class Tf2onnxFullSpanConv1dBiasToGemm(_FullSpan):
    """Unsqueeze -> Transpose -> Conv(k=[1, L]) -> Squeeze -> Add(bias) -> Reshape(Gemm(Flatten(X), W', b))"""

    id = "fullspan-tf2onnx-conv1d-bias-to-gemm"
    benefit = 24
    pre = ("L", "L")
    post = ("L", "+")


class Tf2onnxFullSpanConv1dSqueezeToGemm(_FullSpan):
    """Unsqueeze -> Transpose -> Conv(k=[1, L]) -> Squeeze -> Reshape(Gemm(Flatten(X), W', b))"""

    id = "fullspan-tf2onnx-conv1d-squeeze-to-gemm"
    benefit = 23
    pre = ("L", "L")
    post = ("L",)


RULES = [
    FullSpanConvToGemm,
    FullSpanConvFlattenToGemm,
    Tf2onnxFullSpanConv1dToGemm,
    Tf2onnxFullSpanConv1dBiasToGemm,
    Tf2onnxFullSpanConv1dSqueezeToGemm,
]
