"""The last gate before a rewritten model is written: it passes onnx.checker and loads in
onnxruntime. A rule may never turn a loadable model into an unloadable one.

Only what the rules changed is opened in onnxruntime: the region of nodes they created, cut out
as small models whose boundary types strict ONNX shape inference checked against the rest of
the graph (:func:`rewriter.prove.region.cut_region`); when the region cannot be cut cleanly, the
whole model, as before. The loads run on a thread of their own (onnxruntime releases the GIL
while it builds a session) while the caller stages the file: :func:`start_gate` checks and
starts them, :meth:`PendingGate.wait` gives the verdict before the file is renamed into place.
The checks hold the GIL (the region cut and its strict shape inference, onnx.checker); where the
caller's :class:`~rewriter.engine.executor.Executor` allows it (the command line's), the cut runs
on a second core while the caller writes the file, and the checker runs when the caller waits
for the verdict.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import onnx

from rewriter.engine.executor import Executor
from rewriter.errors import VerificationError
from rewriter.ort import ModelSource, SessionError, first_line, make_session, model_source
from rewriter.prove.region import cut_region

__all__ = ["check_writable", "start_gate", "PendingGate"]

_CHECKER_LIMIT = 2**31 - 1  # onnx.checker takes an in-memory model only below protobuf's 2 GB


def _checker_error(model: onnx.ModelProto) -> str | None:
    if model.ByteSize() >= _CHECKER_LIMIT:
        return None
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        return first_line(exc)
    return None


def _gate_sources(model: onnx.ModelProto, base_dir: Path | None, region: list[onnx.ModelProto] | None) -> list[ModelSource]:
    """What the load gate opens: the rewritten region as models of their own, or the whole model
    (``region`` None). Serialized now, so ``model`` may change afterwards."""
    return [model_source(m, "rewritten", base_dir) for m in (region if region is not None else [model])]


def _checker_verdict(model: onnx.ModelProto, original: onnx.ModelProto) -> str | None:
    """Why ``model`` fails onnx.checker, unless ``original`` fails it too (some exporters write
    models the checker refuses and onnxruntime runs); None when it passes."""
    why = _checker_error(model)
    return why if why is not None and _checker_error(original) is None else None


class PendingGate:
    """onnxruntime loads of ``sources``, one after the other on a thread of their own;
    :meth:`wait` raises the first failure."""

    def __init__(self, sources: list[ModelSource] | Callable[[], list[ModelSource]],
                 check: Callable[[], None] | None = None, what: str = "rewritten") -> None:
        self._what = what
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._check = check  # run by wait() first, while the loads' thread waits or loads
        if sources:
            self._thread = threading.Thread(target=self._load, args=(sources,), name="onnx-rewrite-load-gate")
            self._thread.start()

    def _load(self, sources: list[ModelSource] | Callable[[], list[ModelSource]]) -> None:
        if callable(sources):  # known once a child process's checks are in (it waits without the GIL)
            try:
                sources = sources()
            except BaseException as exc:  # noqa: BLE001 - handed to wait()
                self._error = exc
                return
        for source in sources:
            try:
                # Loading is the question, not speed: no graph optimizations (linear in the graph's size).
                make_session(source, "cpu", optimize=False)
            except BaseException as exc:  # noqa: BLE001 - handed to wait(): an unexpected error must not pass the gate
                self._error = exc
                return

    def wait(self) -> None:
        """Block until the loads ended; VerificationError (exit 1) when one failed."""
        try:
            if self._check is not None:
                self._check()
        finally:
            self.close()
        if isinstance(self._error, SessionError):
            raise VerificationError(f"not written: the {self._what} model does not load in onnxruntime: {self._error.detail}") from self._error
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for the load thread: an interrupted save must not exit under a running load."""
        if self._thread is not None:
            self._thread.join()


def start_gate(model: onnx.ModelProto, original: onnx.ModelProto, base_dir: Path | None, *, loads: bool = False,
               what: str = "rewritten", executor: Executor | None = None) -> PendingGate:
    """Raise VerificationError (exit 1) when ``model`` fails onnx.checker -- unless ``original``
    fails it too: some exporters write models the checker refuses and onnxruntime runs -- and
    start loading its rewritten region (or the whole model) in onnxruntime on CPU: the graph
    resolves, every node has a kernel; graph optimizations are not run. ``loads``: it already
    ran in onnxruntime (verification); nothing is loaded. ``what`` names the model in messages.
    When ``executor`` has a child process cut the region, the checker's verdict, too, comes from
    :meth:`PendingGate.wait`, and ``model`` must not change before it. Otherwise what is loaded
    was serialized before this returns: ``model`` may change afterwards."""
    prepared = None if loads or executor is None else executor.background(cut_region, model)
    if prepared is not None and prepared.forked:
        # The loads' thread waits for the child's region cut, then loads; the caller writes the
        # file meanwhile, and runs the checker when it waits for the verdict.
        def check() -> None:
            why = _checker_verdict(model, original)
            if why is not None:
                raise VerificationError(f"not written: the {what} model fails onnx.checker: {why}")

        return PendingGate(lambda: _gate_sources(model, base_dir, prepared.result()), check, what)
    gate = PendingGate([] if loads else _gate_sources(model, base_dir, cut_region(model)), what=what)
    try:  # the checker runs while onnxruntime loads
        why = _checker_verdict(model, original)
        if why is not None:
            raise VerificationError(f"not written: the {what} model fails onnx.checker: {why}")
    except BaseException:
        gate.close()
        raise
    return gate


def check_writable(model: onnx.ModelProto, original: onnx.ModelProto, base_dir: Path | None, *, loads: bool = False) -> None:
    """:func:`start_gate` and its verdict, in one call."""
    start_gate(model, original, base_dir, loads=loads).wait()
