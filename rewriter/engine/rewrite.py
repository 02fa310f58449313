"""One rewrite pass over a loaded model: a fresh graph, the driver, the exported result.

Every step that needs the rewritten model -- the first rewrite, bisection, acceptance's
rebuilds -- calls :func:`rewrite`, so each rebuild starts from the untouched input proto.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import onnx

from rewriter.engine.driver import DriverResult, SiteKey, run_rules
from rewriter.engine.graph import ModelGraph
from rewriter.engine.model_io import LoadedModel
from rewriter.engine.rule import Rule

__all__ = ["Rewritten", "rewrite"]


@dataclass(frozen=True)
class Rewritten:
    """The model after one driver run and what the driver did."""

    model: onnx.ModelProto
    result: DriverResult


def rewrite(loaded: LoadedModel, rules: Sequence[Rule], *, skip: Sequence[SiteKey] = ()) -> Rewritten:
    """Run the driver on a fresh graph of ``loaded`` (the input proto is never mutated), leaving
    the ``skip`` sites as they are."""
    graph = ModelGraph(loaded.model, loaded.base_dir)
    result = run_rules(graph, rules, skip=skip)
    return Rewritten(graph.export(), result)
