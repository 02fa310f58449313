"""One rewrite pass over a loaded model: a fresh graph, the driver, the exported result.

Every step that needs the rewritten model -- the first rewrite, bisection, acceptance's
rebuilds -- calls :func:`rewrite`, so each rebuild starts from the untouched input proto. The
:class:`~rewriter.engine.executor.Executor` it is given decides how the process is used: the
collector paused for the pass, the model's shape inference on a second core the first time
(while its nodes are imported), the graph freed now or when the next pass starts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import onnx

from rewriter.engine.driver import DriverResult, SiteFilter, SiteKey, run_rules
from rewriter.engine.executor import Executor
from rewriter.engine.graph import ModelGraph, node_subgraphs, typed_graph
from rewriter.engine.model_io import LoadedModel
from rewriter.engine.rule import Rule

__all__ = ["Rewritten", "rewrite"]


@dataclass(frozen=True)
class Rewritten:
    """The model after one driver run and what the driver did."""

    model: onnx.ModelProto
    result: DriverResult


def rewrite(loaded: LoadedModel, rules: Sequence[Rule], *, skip: Sequence[SiteKey] = (), only: SiteFilter | None = None,
            executor: Executor | None = None) -> Rewritten:
    """Run the driver on a fresh graph of ``loaded`` (the input proto is never mutated), leaving
    the ``skip`` sites as they are and, with ``only``, every site it does not allow its rule."""
    run = executor or Executor()
    with run.collector_paused():
        run.free_retired()  # the graph of the previous rewrite, if the executor deferred its freeing
        if loaded.has_types:
            graph = ModelGraph(loaded.model, loaded.base_dir, typed=loaded.types)
        else:  # the types are inferred beside the nodes' import (a second core, where the executor allows)
            types = run.background(typed_graph, loaded.model)
            try:
                graph = ModelGraph(loaded.model, loaded.base_dir, typed=lambda: loaded.types(lambda _: types.result()))
            finally:
                if types.forked:  # no child outlives the import (a graph with subgraphs never asks); its answer is kept
                    loaded.types(lambda _: types.result())
        members = _members(graph)  # replaced nodes leave the graph: their list is taken now
        try:
            result = run_rules(graph, rules, skip=skip, only=only)
            return Rewritten(graph.export(), result)
        finally:
            # Freed before the collector is back (by reference counting, once taken apart): left
            # for it, the first collection after the pause walked all of them (0.2 s at 50,000
            # nodes). A one-command executor defers this to the next rewrite or to the process's end.
            run.retire(functools.partial(_free, graph, members))


def _members(model: ModelGraph) -> list[object]:
    """Every node and tensor of the graph and its subgraphs, and the graphs."""
    found: list[object] = []
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        found.append(graph)
        for node in graph.nodes:
            if node.attrs:
                graphs += node_subgraphs(node)
            found += (node, *node.inputs, *node.outputs)
    return found


def _free(graph: ModelGraph, members: list[object]) -> None:
    """Take apart and free every node and tensor the graph had or has, and the graph."""
    members += _members(graph)
    _dismantle(members)
    members.clear()
    vars(graph).clear()


def _dismantle(members: list[object]) -> None:
    """Break the reference cycles of graph members so that reference counting frees them at
    once. Each gs node and tensor is a cycle (its input/output lists point back at it), so
    every one of them, replaced ones included, would otherwise wait for the cyclic collector:
    the first collection after the pause walks the whole graph, live, and a later one walks it
    again to free it, ~4x the cost of this."""
    for obj in members:
        vars(obj).clear()
