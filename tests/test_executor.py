"""rewriter.Executor: the one object that decides how the library uses its process -- pure work in
a forked child (only where allowed and safe; the caller computes it whenever the child cannot),
the collector paused around a rewrite, deferred freeing in a process about to end -- and its
uses: the input's shape inference while its nodes are imported, the write gate's region cut
while the file is written. The command line hands one to the library; Python may hand the same."""

from __future__ import annotations

import gc
import io
import os
import signal
import sys
import threading
import weakref
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
import psutil
import pytest
from onnx import helper

import rewriter
from helpers import make_model, pointwise_chain, vi
from rewriter import Executor
from rewriter.engine.graph import typed_graph
from rewriter.engine.model_io import load_model
from rewriter.engine.registry import Registry, discover
from rewriter.engine.rewrite import rewrite
from rewriter.engine.rule import Rule, fail, ok
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


def _none_recorded() -> None:
    CALLS.append(os.getpid())
    return None


def _children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def forking() -> Executor:
    return Executor(fork=True)


# --- a second core -----------------------------------------------------------------------------


def test_by_default_it_runs_in_the_caller_when_asked():
    CALLS.clear()
    job = Executor().background(_record, 21)
    assert not job.forked and CALLS == []
    assert job.result() == 42 and job.result() == 42 and CALLS == [os.getpid()]


@linux_only
def test_allowed_it_runs_in_a_child_and_the_child_is_reaped(forking):
    CALLS.clear()
    job = forking.background(_record, 21)
    assert job.forked
    pid = job._pid
    assert job.result() == 42
    assert CALLS == [], "computed in the child: its effects stay there"
    assert not job.forked
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, 0)


@linux_only
@pytest.mark.parametrize("fn", [_fails_in_a_child, _dies_in_a_child])
def test_a_failing_child_leaves_the_caller_to_compute_it(forking, fn):
    job = forking.background(fn, os.getpid())
    assert job.forked
    assert job.result() in (7, 8)


@linux_only
def test_a_child_s_none_is_its_result(forking):
    """A computation whose answer is None (the gate's "load the whole model") is not done twice."""
    CALLS.clear()
    job = forking.background(_none_recorded)
    assert job.forked
    assert job.result() is None and CALLS == []


@linux_only
def test_no_fork_beside_a_thread_started_since_the_executor_was_made(forking):
    """A fork copies one thread: none may run that could hold a lock the child needs. A Python
    thread, or an onnxruntime session's thread pool, started after the executor was made stops
    forks while it runs; forks resume once it is gone."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert not forking.background(_record, 1).forked
    finally:
        stop.set()
        other.join()
    assert forking.background(_record, 1).result() == 2
    from rewriter.ort import make_session, model_source

    session = make_session(model_source(pointwise_chain(2), "m"), "cpu", threads=2)  # one pool thread beside this one
    assert not forking.background(_record, 1).forked, "no fork beside onnxruntime's pool"
    del session
    gc.collect()
    job = forking.background(_record, 1)
    assert job.forked, "the pool is gone: forks again"
    assert job.result() == 2


def test_an_executor_that_does_not_fork_never_forks():
    assert not Executor(fork=False).background(_record, 1).forked
    assert repr(Executor()) == "Executor(fork=False, one_command=False)"


@linux_only
def test_a_progress_bar_s_refresh_thread_pauses_for_the_fork(forking):
    """On a terminal the command's progress bar refreshes from a thread of its own: it is stopped
    while the child is forked and runs again after, so an interactive run forks too."""
    from rich.console import Console

    from rewriter.cli.progress import StepProgress

    console = Console(file=io.StringIO(), force_terminal=True)
    with StepProgress(console, "rewriting", executor=forking) as say:
        assert threading.active_count() == 2, "the bar's refresh thread runs"
        job = forking.background(_record, 5)
        assert job.forked
        assert threading.active_count() == 2, "and runs again after the fork"
        say("still here")
        assert job.result() == 10
    assert forking._pauses == [], "the pause is unregistered with the bar"


# --- its uses ------------------------------------------------------------------------------------


@linux_only
def test_the_types_come_from_the_child_as_the_caller_would_compute_them(forking, tmp_path):
    """The first rewrite of a loaded model infers its types in a child while its nodes are
    imported; the loaded model keeps them (data, once per model) for every later rewrite."""
    path = tmp_path / "m.onnx"
    onnx.save(pointwise_chain(6), str(path))
    loaded = load_model(path)
    assert not loaded.has_types
    out = rewrite(loaded, discover().select(), executor=forking)
    assert len(out.result.applied) == 6 and loaded.has_types
    assert loaded.types().SerializeToString() == typed_graph(onnx.load(str(path))).SerializeToString()
    assert loaded.types() is loaded.types(), "once per loaded model"
    again = rewrite(loaded, discover().select(), executor=forking)
    assert again.model == out.model
    assert not _children()


def test_a_model_that_fails_its_checks_is_refused_at_load(tmp_path):
    """Load checks run before anything is handed out: a LoadedModel is a checked model."""
    nodes = [helper.make_node("Relu", ["b"], ["a"], name="r0"), helper.make_node("Relu", ["a"], ["b"], name="r1")]
    path = tmp_path / "cycle.onnx"
    onnx.save(make_model(nodes, [vi("x", [2])], [vi("b", [2])]), str(path))
    with pytest.raises(InputError, match="cycle through node"):
        load_model(path)


class _BogusAttribute(Rule):
    """Relu(x) -> Relu(x) with an attribute Relu does not have: onnx.checker refuses it."""

    id = "test-executor-bogus-attribute"

    def pattern(self, p):
        return p.op("Relu", p.var("x"), name="relu")

    def check(self, m):
        return ok() if "bogus" not in m["relu"].attrs else fail("done", m["relu"])

    def rewrite(self, b, m):
        return b.op("Relu", [m["x"]], {"bogus": 1})


def _relus(n: int = 12) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x" if i == 0 else f"r{i-1}"], [f"r{i}"], name=f"relu{i}") for i in range(n)]
    nodes += [helper.make_node("Neg", [f"r{n-1}" if i == 0 else f"n{i-1}"], [f"n{i}"], name=f"neg{i}") for i in range(3 * n)]
    return make_model(nodes, [vi("x", ["b", 4])], [vi(f"n{3 * n - 1}", ["b", 4])])


class _Spy(Executor):
    """An executor that records what it was asked to do."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.started: list[tuple[str, bool]] = []
        self.retired = 0

    def background(self, fn, *args):
        job = super().background(fn, *args)
        self.started.append((fn.__name__, job.forked))
        return job

    def retire(self, free):
        self.retired += 1
        super().retire(free)


@pytest.mark.parametrize("fork", [False, pytest.param(True, marks=linux_only)])
def test_the_gate_refuses_the_same_models_with_or_without_a_child(fork, tmp_path: Path):
    reg = Registry()
    reg.add(_BogusAttribute, "test")
    spy = _Spy(fork=fork)
    result = rewriter.optimize(_relus(), registry=reg, verify=False, executor=spy)
    assert result.modified
    with pytest.raises(VerificationError, match=r"^not written: the rewritten model fails onnx.checker: .*bogus"):
        result.save(tmp_path / "bad.onnx", executor=spy)
    assert ("cut_region", fork) in spy.started
    assert list(tmp_path.iterdir()) == []
    good = rewriter.optimize(pointwise_chain(8), verify=False, rules=["transposed-conv1x1-to-matmul"], executor=spy)
    spy.started.clear()
    good.save(tmp_path / "good.onnx", executor=spy)
    assert spy.started == [("cut_region", fork)]
    out = onnx.load(str(tmp_path / "good.onnx"))
    assert [n.op_type for n in out.graph.node].count("MatMul") == 8
    assert not _children()


def test_the_library_uses_the_executor_it_is_handed_at_every_rewrite():
    """optimize hands its executor to every rewrite (the first, bisection's, acceptance's) and
    to nothing else behind the caller's back; Result holds data (no pending work)."""
    spy = _Spy()
    result = rewriter.optimize(pointwise_chain(6), verify=rewriter.VerifyOptions(providers=("cpu",)), executor=spy)
    assert result.modified and spy.retired >= 1
    assert [name for name, _ in spy.started] == ["typed_graph"], "types inferred once per loaded model"
    assert all(not callable(getattr(result, f)) for f in ("model", "report", "source"))


def test_the_command_line_hands_its_executor_to_the_library(tmp_path, monkeypatch):
    """run_app(argv, executor=...) is what `onnx-rewrite` runs (main hands in a one-command
    executor): the rewrite command passes it to optimize and to the save."""
    from rewriter.cli import run_app

    src = tmp_path / "m.onnx"
    onnx.save(pointwise_chain(4), str(src))
    spy = _Spy()
    code = run_app([str(src), "-o", str(tmp_path / "out.onnx"), "--no-bench", "--providers", "cpu"], executor=spy)
    assert code == 0
    assert spy.retired >= 1 and ("typed_graph", False) in spy.started


# --- the collector and freeing -------------------------------------------------------------------


def test_no_graph_object_outlives_a_rewrite():
    """The graph's nodes and tensors are freed before the collector is back on: none is left for
    the first collection after the pause to walk (it walked all of them, 0.2 s at 50,000 nodes)."""
    alive_at_resume: list[int] = []

    class Watched(Executor):
        def retire(self, free):
            super().retire(free)
            alive_at_resume.append(sum(isinstance(o, (gs.Node, gs.Tensor)) for o in gc.get_objects()))

    out = rewrite(load_model(pointwise_chain(40)), discover().select(), executor=Watched())
    assert len(out.result.applied) == 40
    assert alive_at_resume == [0]


def test_a_one_command_executor_frees_each_graph_when_the_next_rewrite_starts(monkeypatch):
    """A process that ends with end_process defers taking a graph apart: the graph stays alive,
    frozen out of the collector's walks, until the next rewrite starts, which frees it; what is
    held at the end is never freed. One graph at a time. Any other executor frees it at once."""
    import rewriter.engine.rewrite as rewrite_mod

    graphs: list[weakref.ref] = []
    real = rewrite_mod.ModelGraph

    def tracked(*args, **kwargs):
        graph = real(*args, **kwargs)
        graphs.append(weakref.ref(graph.graph.nodes[0]))
        return graph

    monkeypatch.setattr(rewrite_mod, "ModelGraph", tracked)
    model, rules = load_model(pointwise_chain(8)), discover().select()
    one = Executor(one_command=True)
    try:
        rewrite(model, rules, executor=one)
        assert graphs[0]() is not None, "held after its rewrite"
        assert not any(isinstance(o, gs.Node) for o in gc.get_objects()), "frozen: no collection walks it"
        rewrite(model, rules, executor=one)
        assert graphs[0]() is None and graphs[1]() is not None, "the next rewrite freed the first graph"
        one.free_retired()
        assert graphs[1]() is None
    finally:
        gc.unfreeze()
    rewrite(model, rules, executor=Executor())
    assert graphs[2]() is None, "not deferring: freed as the rewrite ends"


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_pause_restores_its_state(enabled):
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        rewrite(load_model(pointwise_chain(8)), discover().select())
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_a_rewrite_leaves_no_cyclic_garbage():
    """The working graph is freed by reference counting when the rewrite ends: left to the cyclic
    collector, a 50,000-node graph cost two full collections (~2 s) after the run."""
    model = load_model(pointwise_chain(40))
    rules = discover().select()
    gc.collect()
    gc.disable()
    try:
        out = rewrite(model, rules)
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert len(out.result.applied) == 40
    assert unreachable < 50, unreachable


def test_only_a_one_command_executor_ends_the_process_without_teardown():
    with pytest.raises(SystemExit) as ended:
        Executor().end_process(3)
    assert ended.value.code == 3
    started = threading.Event()
    stop = threading.Event()
    other = threading.Thread(target=lambda: (started.set(), stop.wait()))
    other.start()
    started.wait()
    try:
        one = Executor.__new__(Executor)  # as for_one_command makes it, without freezing this test process
        one.fork, one.one_command, one._pauses, one._retired, one._threads = False, True, [], [], None
        with pytest.raises(SystemExit):  # a thread still runs: the normal exit
            one.end_process(0)
    finally:
        stop.set()
        other.join()


def test_the_command_ends_its_process_with_its_exit_code(tmp_path):
    """`onnx-rewrite` (rewriter.cli.main) ends with os._exit after its files are closed: the exit
    code, the written model and the flushed output arrive as they would with a normal exit."""
    import subprocess

    src = tmp_path / "m.onnx"
    onnx.save(pointwise_chain(4), str(src))
    proc = subprocess.run([sys.executable, "-m", "rewriter", str(src), "-o", str(tmp_path / "o.onnx"), "--no-bench", "--providers", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "4 sites rewritten" in proc.stdout and (tmp_path / "o.onnx").exists()
    proc = subprocess.run([sys.executable, "-m", "rewriter", str(tmp_path / "missing.onnx")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no such file" in proc.stderr
