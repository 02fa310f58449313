"""One report object -> JSON (the stable contract), terminal tables (rich) and Markdown.

JSON top level (documented in the README; later sections are added, never renamed):
``tool_version``, ``input`` / ``output`` ({path, sha256, nodes, op_counts}), ``rewrites``
([{rule, nodes, status, reason}]), ``near_misses`` ([{rule, node, reason}]), and when
they ran: ``verification``, ``benchmark``, ``static``, ``tuning``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Protocol, runtime_checkable

import onnx

from rewriter.engine.save import atomic_write_text

__all__ = ["Section", "ModelSummary", "RewriteRecord", "NearMissRecord", "Report", "summarize", "op_counts"]


@runtime_checkable
class Section(Protocol):
    """A report section (``verification``, ``benchmark``, ``static``, ``tuning``, or a new one):
    the step that produced it knows how to show it as JSON, Markdown and on a terminal."""

    def to_json(self) -> Any: ...

    def to_markdown(self) -> str: ...

    def render(self, console: Any, *, verbose: bool = False) -> None: ...

STATUSES = ("applied", "rolled_back", "rejected")


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """{op_type: count} over the main graph and every subgraph, sorted by op type."""
    counts: Counter[str] = Counter()

    def walk(g: onnx.GraphProto) -> None:
        for n in g.node:
            counts[n.op_type] += 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        walk(sub)

    walk(model.graph)
    return dict(sorted(counts.items()))


@dataclass(frozen=True)
class ModelSummary:
    path: str | None
    sha256: str | None
    nodes: int
    op_counts: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "nodes": self.nodes, "op_counts": dict(self.op_counts)}


def summarize(model: onnx.ModelProto, path: str | Path | None = None, sha256: str | None = None) -> ModelSummary:
    counts = op_counts(model)
    return ModelSummary(str(path) if path is not None else None, sha256, sum(counts.values()), counts)


@dataclass(frozen=True)
class RewriteRecord:
    rule: str
    nodes: tuple[str, ...]
    status: str
    reason: str = ""
    detail: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "nodes": list(self.nodes), "status": self.status, "reason": self.reason}
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True)
class NearMissRecord:
    rule: str
    node: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "node": self.node, "reason": self.reason}


@dataclass(frozen=True)
class Report:
    tool_version: str
    input: ModelSummary
    output: ModelSummary | None
    rewrites: tuple[RewriteRecord, ...]
    near_misses: tuple[NearMissRecord, ...]
    sections: dict[str, Section] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def applied(self) -> list[RewriteRecord]:
        return [r for r in self.rewrites if r.status == "applied"]

    def with_output(self, output: ModelSummary) -> "Report":
        return replace(self, output=output)

    def with_section(self, name: str, value: Section) -> "Report":
        return replace(self, sections={**self.sections, name: value})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tool_version": self.tool_version,
            "input": self.input.to_json(),
            "output": self.output.to_json() if self.output else None,
            "rewrites": [r.to_json() for r in self.rewrites],
            "near_misses": [n.to_json() for n in self.near_misses],
        }
        for name, value in self.sections.items():
            out[name] = value.to_json()
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def write_json(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=2) + "\n")

    def to_markdown(self) -> str:
        lines = [f"# onnx-rewrite report (v{self.tool_version})", ""]
        lines += ["| | input | output |", "|---|---|---|"]
        outp = self.output
        lines.append(f"| path | {self.input.path or '(memory)'} | {(outp.path if outp else None) or '(not written)'} |")
        lines.append(f"| nodes | {self.input.nodes} | {outp.nodes if outp else '-'} |")
        for op in _interesting_ops(self.input.op_counts, outp.op_counts if outp else {}):
            lines.append(f"| {op} | {self.input.op_counts.get(op, 0)} | {(outp.op_counts.get(op, 0) if outp else '-')} |")
        lines += ["", "## Rewrites", ""]
        if self.rewrites:
            lines += ["| rule | status | nodes | reason |", "|---|---|---|---|"]
            lines += [f"| {r.rule} | {r.status} | {', '.join(r.nodes)} | {r.reason} |" for r in self.rewrites]
        else:
            lines.append("No rewrite applied.")
        if self.near_misses:
            lines += ["", "## Near misses", "", "| rule | node | reason |", "|---|---|---|"]
            lines += [f"| {n.rule} | {n.node} | {n.reason} |" for n in self.near_misses]
        for name, value in self.sections.items():
            lines += ["", f"## {name.capitalize()}", "", value.to_markdown()]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def render(self, console: Any, *, verbose: bool = False) -> None:
        """A compact terminal summary with rich tables."""
        from rich.table import Table

        outp = self.output
        t = Table(title="onnx-rewrite", show_edge=False)
        t.add_column("")
        t.add_column("before", justify="right")
        t.add_column("after", justify="right")
        t.add_row("nodes", str(self.input.nodes), str(outp.nodes) if outp else "-")
        for op in _interesting_ops(self.input.op_counts, outp.op_counts if outp else {}):
            t.add_row(op, str(self.input.op_counts.get(op, 0)), str(outp.op_counts.get(op, 0)) if outp else "-")
        console.print(t)
        by_rule: Counter[tuple[str, str]] = Counter((r.rule, r.status) for r in self.rewrites)
        if by_rule:
            rt = Table(title="rewrites", show_edge=False)
            rt.add_column("rule")
            rt.add_column("status")
            rt.add_column("sites", justify="right")
            for (rule, status), n in sorted(by_rule.items()):
                rt.add_row(rule, status, str(n))
            console.print(rt)
        else:
            console.print("no rewrite applied")
        for r in self.rewrites:
            if r.status != "applied" and r.reason:
                console.print(f"  {r.status}: {r.rule} at {r.nodes[0] if r.nodes else '?'}: {r.reason}")
        if self.near_misses:
            shown = self.near_misses if verbose else self.near_misses[:10]
            console.print(f"near misses: {len(self.near_misses)}")
            for miss in shown:
                console.print(f"  {miss.rule} at {miss.node}: {miss.reason}", markup=False)
            if len(shown) < len(self.near_misses):
                console.print(f"  ... {len(self.near_misses) - len(shown)} more (see --report)")
        for section in self.sections.values():  # in pipeline order
            section.render(console, verbose=verbose)
        for note in self.notes:
            console.print(f"note: {note}", markup=False)


def _interesting_ops(a: dict[str, int], b: dict[str, int]) -> Iterable[str]:
    key = {"Conv", "MatMul", "Gemm", "Transpose", "Reshape"}
    return sorted(op for op in set(a) | set(b) if op in key or a.get(op, 0) != b.get(op, 0))
