"""The driver's decisions on every fixture, pinned: which sites it rewrote and which it refused.

``tests/driver_golden.txt`` holds, for every model under tests/fixtures plus two pointwise chains
and each rule selection in ``CONFIGS``, one line per decision: each applied site (rule, anchor,
sweep, matched nodes, created nodes), each skipped site, each near miss and quiet refusal of the
final sweep (rule and node: the *decision*, not its wording, so rewording a reason changes no
line), and the sweep count. It is plain text in a stable order, so a review sees exactly which
decision changed. It was first recorded with the driver as it was before the sweep was made lazy
(checks run once, when a candidate's turn comes; matches reused when no splice touched them), so
a change to the driver's schedule that alters any decision fails here.

Re-record only when a decision is meant to change (say why in the commit):
``python tests/test_driver_golden.py --record``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import pointwise_chain  # noqa: E402

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
GOLDEN = HERE / "driver_golden.txt"
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


def _drive(model: onnx.ModelProto | Path, config: str) -> list[str]:
    """The driver's decisions on ``model`` under ``config``, one line each."""
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
    lines = [f"applied {s.rule} @ {s.anchor} sweep {s.iteration}: {', '.join(s.nodes)} -> {', '.join(s.created) or '(none)'}" for s in res.applied]
    lines += [f"skipped {s.rule} @ {s.anchor} sweep {s.iteration}: {', '.join(s.nodes)}" for s in res.skipped]
    lines += [f"near miss {n.rule} @ {n.node}" for n in res.near_misses]
    lines += [f"quiet {n.rule} @ {n.node}" for n in res.quiet]
    return lines + [f"sweeps {res.iterations}"]


def _text(decisions: dict[str, dict[str, list[str]]]) -> str:
    out = []
    for name in sorted(decisions):
        for config in CONFIGS:
            out.append(f"== {name} [{config}]")
            out += [f"  {line}" for line in decisions[name][config]]
    return "\n".join(out) + "\n"


def _parse(text: str) -> dict[str, dict[str, list[str]]]:
    found: dict[str, dict[str, list[str]]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("== "):
            name, config = line[3:].rsplit(" [", 1)
            current = found.setdefault(name, {}).setdefault(config.rstrip("]"), [])
        elif line.strip():
            current.append(line.strip())
    return found


def _record() -> None:
    GOLDEN.write_text(_text({name: {c: _drive(m, c) for c in CONFIGS} for name, m in _models().items()}))


_GOLDEN = _parse(GOLDEN.read_text()) if GOLDEN.exists() else {}


def test_golden_covers_every_fixture() -> None:
    assert sorted(_GOLDEN) == sorted(_models())


@pytest.mark.parametrize("name", sorted(_models()))
def test_driver_decisions_unchanged(name: str) -> None:
    model = _models()[name]
    for config in CONFIGS:
        assert _drive(model, config) == _GOLDEN[name][config], f"{name} [{config}]"


def test_the_text_round_trips() -> None:
    """What the file holds is what the test compares (no line lost to the format)."""
    assert _parse(_text(_GOLDEN)) == _GOLDEN


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_driver_golden.py --record")
    _record()
