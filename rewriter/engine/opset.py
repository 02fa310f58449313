"""Opset upgrade: a model converted to a newer default-domain opset by onnx's version converter.

For users whose model is older than the form a rule builds (``model opset 9 < 10 needed for
...`` near misses): ``--upgrade-opset N`` / ``Options.upgrade_opset``. The conversion is a
rewrite like any other: the caller (``api.optimize``) verifies the converted model against the
original before rewriting it.
"""

from __future__ import annotations

import onnx
from onnx import version_converter

from rewriter.errors import InputError

__all__ = ["default_opset", "upgrade_opset"]


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version, 0 when it imports none."""
    return next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``model`` converted to default-domain opset ``target`` (``model`` itself when it is already
    there or newer). Raises :class:`InputError` when onnx cannot convert it."""
    current = default_opset(model)
    if target <= current:
        return model
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises plain RuntimeErrors naming the op it cannot adapt
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot upgrade the model from opset {current} to {target}: {text}") from exc
    return converted
