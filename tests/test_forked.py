"""rewriter.engine.forked: pure computations in a forked child, only where allowed and safe, the
caller computing them itself whenever the child cannot; and its two uses -- the input's shape
inference while it is validated, the write gate's region cut while the report and file are made."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import onnx
import psutil
import pytest
from onnx import helper

import rewriter
from helpers import make_model, pointwise_chain, vi
from rewriter.engine import forked
from rewriter.engine.forked import Background
from rewriter.engine.graph import typed_graph
from rewriter.engine.model_io import load_model
from rewriter.engine.registry import Registry
from rewriter.engine.rule import Rule
from rewriter.errors import InputError, VerificationError

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="forks only on Linux: would check the computation runs in a child")

CALLS: list[int] = []


def _record(x: int) -> int:
    CALLS.append(os.getpid())
    return x * 2


def _fails_in_a_child(parent: int) -> int:
    if os.getpid() != parent:
        raise RuntimeError("only in the child")
    return 7


def _dies_in_a_child(parent: int) -> int:
    if os.getpid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
    return 8


@pytest.fixture
def allowed(monkeypatch):
    monkeypatch.setattr(forked, "_allowed", True)
    monkeypatch.setattr(forked, "_forbidden", False)


def _children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if p.status() != psutil.STATUS_ZOMBIE]


def test_not_allowed_it_runs_in_the_caller_when_asked(monkeypatch):
    monkeypatch.setattr(forked, "_allowed", False)
    CALLS.clear()
    job = Background(_record, 21)
    assert not job.forked and CALLS == []
    assert job.result() == 42 and job.result() == 42 and CALLS == [os.getpid()]


@linux_only
def test_allowed_it_runs_in_a_child_and_the_child_is_reaped(allowed):
    CALLS.clear()
    job = Background(_record, 21)
    assert job.forked
    pid = job._pid
    assert job.result() == 42
    assert CALLS == [], "computed in the child: its effects stay there"
    assert not job.forked
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, 0)


@linux_only
@pytest.mark.parametrize("fn", [_fails_in_a_child, _dies_in_a_child])
def test_a_failing_child_leaves_the_caller_to_compute_it(allowed, fn):
    job = Background(fn, os.getpid())
    assert job.forked
    assert job.result() in (7, 8)


@linux_only
def test_no_fork_beside_another_thread_after_a_session_or_when_not_wanted(allowed, monkeypatch):
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert not Background(_record, 1).forked
    finally:
        stop.set()
        other.join()
    assert not Background(_record, 1, fork=False).forked
    from rewriter.ort import make_session, model_source

    make_session(model_source(pointwise_chain(2), "m"), "cpu")
    assert forked._forbidden, "opening an onnxruntime session forbids forks"
    assert not Background(_record, 1).forked


def _none_recorded() -> None:
    CALLS.append(os.getpid())
    return None


@linux_only
def test_a_child_s_none_is_its_result(allowed):
    """A computation whose answer is None (the gate's "load the whole model") is not done twice."""
    CALLS.clear()
    job = Background(_none_recorded)
    assert job.forked
    assert job.result() is None and CALLS == []


@linux_only
def test_the_checks_and_types_come_from_the_child_as_the_caller_would_compute_them(allowed, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(pointwise_chain(6), str(path))
    loaded = load_model(path)
    assert loaded._pending and loaded._pending[0].forked
    assert loaded.typed().SerializeToString() == typed_graph(onnx.load(str(path))).SerializeToString()
    assert loaded.typed() is loaded.typed(), "once per loaded model"
    assert loaded.model is loaded.unchecked_model
    assert not _children()


@linux_only
def test_a_model_that_fails_its_checks_is_refused_when_used(allowed, tmp_path):
    """The child's verdict: the model is not handed out (InputError, the checks' own message), a
    rewrite stops before the rules, and no child is left."""
    from rewriter.engine.registry import discover
    from rewriter.engine.rewrite import rewrite

    nodes = [helper.make_node("Relu", ["b"], ["a"], name="r0"), helper.make_node("Relu", ["a"], ["b"], name="r1")]
    path = tmp_path / "cycle.onnx"
    onnx.save(make_model(nodes, [vi("x", [2])], [vi("b", [2])]), str(path))
    loaded = load_model(path)
    assert loaded._pending and loaded._pending[0].forked
    with pytest.raises(InputError, match="cycle through node"):
        rewrite(loaded, discover().select())
    with pytest.raises(InputError, match="cycle through node"):
        loaded.model
    forked.allow(False)
    try:
        with pytest.raises(InputError, match="cycle through node"):
            load_model(path)  # the same message, at once, without a child
    finally:
        forked.allow(True)
    assert not _children()


class _BogusAttribute(Rule):
    """Relu(x) -> Relu(x) with an attribute Relu does not have: onnx.checker refuses it."""

    id = "test-forked-bogus-attribute"

    def pattern(self, p):
        return p.op("Relu", p.var("x"), name="relu")

    def check(self, m):
        from rewriter.engine.rule import fail, ok

        return ok() if "bogus" not in m["relu"].attrs else fail("done", m["relu"])

    def rewrite(self, b, m):
        return b.op("Relu", [m["x"]], {"bogus": 1})


def _relus(n: int = 12) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x" if i == 0 else f"r{i-1}"], [f"r{i}"], name=f"relu{i}") for i in range(n)]
    nodes += [helper.make_node("Neg", [f"r{n-1}" if i == 0 else f"n{i-1}"], [f"n{i}"], name=f"neg{i}") for i in range(3 * n)]
    return make_model(nodes, [vi("x", ["b", 4])], [vi(f"n{3 * n - 1}", ["b", 4])])


@pytest.mark.parametrize("fork", [False, pytest.param(True, marks=linux_only)])
def test_the_gate_refuses_the_same_models_with_or_without_a_child(fork, monkeypatch, tmp_path: Path):
    monkeypatch.setattr(forked, "_allowed", fork)
    monkeypatch.setattr(forked, "_forbidden", False)
    reg = Registry()
    reg.add(_BogusAttribute, "test")
    result = rewriter.optimize(_relus(), registry=reg, verify=False)
    assert result.modified and (result._gate is not None and result._gate.forked) == fork
    with pytest.raises(VerificationError, match=r"^not written: the rewritten model fails onnx.checker: .*bogus"):
        result.save(tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(forked, "_forbidden", False)  # the save above opened a session (a new command would not have)
    good = rewriter.optimize(pointwise_chain(8), verify=False, rules=["transposed-conv1x1-to-matmul"])
    assert (good._gate is not None and good._gate.forked) == fork
    good.save(tmp_path / "good.onnx")
    out = onnx.load(str(tmp_path / "good.onnx"))
    assert [n.op_type for n in out.graph.node].count("MatMul") == 8
    assert not _children()


@linux_only
def test_a_progress_bar_s_refresh_thread_pauses_for_the_fork(allowed):
    """On a terminal the command's progress bar refreshes from a thread of its own: it is stopped
    while the child is forked and runs again after, so an interactive run forks too."""
    import io

    from rich.console import Console

    from rewriter.cli.progress import StepProgress

    console = Console(file=io.StringIO(), force_terminal=True)
    with StepProgress(console, "rewriting") as say:
        assert threading.active_count() == 2, "the bar's refresh thread runs"
        job = Background(_record, 5)
        assert job.forked
        assert threading.active_count() == 2, "and runs again after the fork"
        say("still here")
        assert job.result() == 10
    assert forked._pauses == [], "the pause is unregistered with the bar"
