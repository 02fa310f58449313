"""The last gate before a rewritten model is written: it passes onnx.checker and loads in
onnxruntime. A rule may never turn a loadable model into an unloadable one."""

from __future__ import annotations

from pathlib import Path

import onnx

from rewriter.errors import VerificationError
from rewriter.ort import SessionError, first_line, make_session, model_source

__all__ = ["check_writable"]

_CHECKER_LIMIT = 2**31 - 1  # onnx.checker takes an in-memory model only below protobuf's 2 GB


def _checker_error(model: onnx.ModelProto) -> str | None:
    if model.ByteSize() >= _CHECKER_LIMIT:
        return None
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        return first_line(exc)
    return None


def check_writable(model: onnx.ModelProto, original: onnx.ModelProto, base_dir: Path | None, *, loads: bool = False) -> None:
    """Raise VerificationError (exit 1) when ``model`` fails onnx.checker -- unless ``original``
    fails it too: some exporters write models the checker refuses and onnxruntime runs -- or does
    not load in onnxruntime on CPU (the graph resolves, every node has a kernel; graph
    optimizations are not run). ``loads``: it already ran in onnxruntime (verification)."""
    why = _checker_error(model)
    if why is not None and _checker_error(original) is None:
        raise VerificationError(f"not written: the rewritten model fails onnx.checker: {why}")
    if loads:
        return
    try:
        # Loading is the question, not speed: no graph optimizations (linear in the graph's size).
        make_session(model_source(model, "rewritten", base_dir), "cpu", optimize=False)
    except SessionError as exc:
        raise VerificationError(f"not written: the rewritten model does not load in onnxruntime: {exc.detail}") from exc
