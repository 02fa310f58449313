"""The driver's decisions on every fixture, pinned: applied sites and near misses.

``tests/driver_golden.json.gz`` holds what the driver did (applied sites with their nodes, the
nodes they created and their sweep; skipped sites; near misses and quiet refusals of the final
sweep; sweep count) on every model under tests/fixtures, plus two pointwise chains, for each
rule selection in ``CONFIGS``. It was recorded with the driver as it was before the sweep was
made lazy (checks run once, when a candidate's turn comes; matches reused when no splice
touched them), so a change to the driver's schedule that alters any decision fails here.

Re-record only when a decision is meant to change (say why in the commit):
``python tests/test_driver_golden.py --record``.
"""

from __future__ import annotations

import functools
import gzip
import json
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import pointwise_chain  # noqa: E402

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
GOLDEN = HERE / "driver_golden.json.gz"  # ~250 kB of JSON
CONFIGS = ("default", "to-matmul", "to-conv", "default-skip-first")


def _models() -> dict[str, onnx.ModelProto | Path]:
    models: dict[str, onnx.ModelProto | Path] = {str(p.relative_to(FIXTURES)): p for p in sorted(FIXTURES.rglob("*.onnx"))}
    models["pointwise_chain_3"] = pointwise_chain(3)
    models["pointwise_chain_40"] = pointwise_chain(40)
    return models


@functools.lru_cache(maxsize=None)
def _registry() -> Any:
    from rewriter.engine.registry import discover

    return discover()


def _drive(model: onnx.ModelProto | Path, config: str) -> dict[str, Any]:
    from rewriter.engine.driver import run_rules
    from rewriter.engine.graph import ModelGraph

    proto = onnx.load(str(model)) if isinstance(model, Path) else model
    base = model.parent if isinstance(model, Path) else None
    rules = _registry().select(direction=config.removesuffix("-skip-first"))
    skip: list[tuple[str, str]] = []
    if config.endswith("-skip-first"):
        first = run_rules(ModelGraph(proto, base), rules).applied
        skip = [first[0].key] if first else []
    res = run_rules(ModelGraph(proto, base), rules, skip=skip)
    return {
        "applied": [[s.rule, s.anchor, list(s.nodes), list(s.created), s.iteration] for s in res.applied],
        "skipped": [[s.rule, s.anchor, list(s.nodes), s.iteration] for s in res.skipped],
        "near_misses": [[n.rule, n.node, n.reason] for n in res.near_misses],
        "quiet": [[n.rule, n.node, n.reason] for n in res.quiet],
        "iterations": res.iterations,
    }


def _record() -> None:
    golden = {name: {c: _drive(m, c) for c in CONFIGS} for name, m in _models().items()}
    GOLDEN.write_bytes(gzip.compress(json.dumps(golden, indent=0, sort_keys=True).encode(), mtime=0))


_GOLDEN: dict[str, Any] = json.loads(gzip.decompress(GOLDEN.read_bytes())) if GOLDEN.exists() else {}


def test_golden_covers_every_fixture() -> None:
    assert sorted(_GOLDEN) == sorted(_models())


@pytest.mark.parametrize("name", sorted(_models()))
def test_driver_decisions_unchanged(name: str) -> None:
    model = _models()[name]
    for config in CONFIGS:
        assert _drive(model, config) == _GOLDEN[name][config], f"{name} [{config}]"


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_driver_golden.py --record")
    _record()
