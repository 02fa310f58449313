"""``rewriter.RewritePass``: the pipeline of :func:`rewriter.optimize` as an ``onnx_ir`` pass.

torch's exporter (``ONNXProgram.model``), onnxscript's optimizer and Olive's surgeons run passes
on ``onnx_ir`` models; this one fits among them::

    import onnx_ir as ir
    import rewriter

    program = torch.onnx.export(module, (x,), dynamo=True)
    ir.passes.PassManager([rewriter.RewritePass()])(program.model)   # in place
    program.save("model.onnx")

It is an in-place pass: the model is serialized, rewritten, proven (and measured, with
:data:`rewriter.MEASURED`) exactly as :func:`rewriter.optimize` does it, and when anything
was rewritten the model's graph and IR version are replaced by the result's (its functions,
producer fields and metadata stay). ``modified`` says whether anything was; the pass keeps the
run's :class:`rewriter.Result` (``.result``: its report, evidence and near misses).
Needs ``onnx-ir`` (``pip install 'onnx-rewrite[ir]'``).
"""

from __future__ import annotations

from typing import Sequence

from rewriter.api import KEEP, Result, Keep, changed, optimize
from rewriter.options import PROVEN, BenchOptions, Options, TuneOptions, VerifyOptions

try:
    import onnx_ir as ir
except ImportError as exc:  # an optional extra: say which
    raise ImportError("rewriter.RewritePass needs onnx-ir: pip install 'onnx-rewrite[ir]'") from exc

__all__ = ["RewritePass"]


class RewritePass(ir.passes.InPlacePass):
    """Rewrite an ``onnx_ir.Model`` in place with the pipeline of :func:`rewriter.optimize`.

    ``options`` (default :data:`rewriter.PROVEN`: rewrite and verify) and the keywords are
    :func:`rewriter.optimize`'s. Raises what ``optimize`` raises (``rewriter.RewriterError``:
    a bad model, a plugin error, no equivalent model); a model left as it was is not modified."""

    def __init__(
        self,
        options: Options | None = None,
        *,
        rules: Sequence[str] | None | Keep = KEEP,
        exclude: Sequence[str] | Keep = KEEP,
        direction: str | None | Keep = KEEP,
        plugins: Sequence[str] | Keep = KEEP,
        strict_plugins: bool | Keep = KEEP,
        verify: VerifyOptions | bool | None | Keep = KEEP,
        bench: BenchOptions | bool | None | Keep = KEEP,
        tune: TuneOptions | bool | None | Keep = KEEP,
        keep_slower: bool | Keep = KEEP,
        upgrade_opset: int | None | Keep = KEEP,
    ) -> None:
        super().__init__()
        self.options = (options or PROVEN).but(**changed(
            rules=rules, exclude=exclude, direction=direction, plugins=plugins, strict_plugins=strict_plugins, verify=verify,
            bench=bench, tune=tune, keep_slower=keep_slower, upgrade_opset=upgrade_opset))
        #: The last run's result (its ``report``), None before the first.
        self.result: Result | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = optimize(ir.serde.serialize_model(model), self.options)
        self.result = result
        if not result.changed:
            return ir.passes.PassResult(model, modified=False)
        rewritten = ir.serde.deserialize_model(result.written_model)
        model.graph = rewritten.graph
        model.ir_version = rewritten.ir_version
        return ir.passes.PassResult(model, modified=True)
