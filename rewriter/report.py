"""One report object -> JSON (the stable contract), Markdown (every detail) and the terminal
(at a glance by default, every detail with ``verbose``).

JSON top level (documented in the README; later keys are added, never renamed):
``tool_version``, ``input`` / ``output`` ({path, sha256, nodes, op_counts}), ``rewrites``
([{rule, family, nodes, status, reason}]), ``near_misses`` ([{rule, node, reason}]), ``summary``
(:meth:`Report.summary_line`), and when they ran: ``verification``, ``benchmark``, ``static``,
``tuning``.

The at-a-glance lines and the summary line read the sections' JSON (the documented contract), so
this module needs none of the steps that made them.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import onnx

from rewriter.engine.tensors import node_graphs
from rewriter.errors import FailOnError, InputError

__all__ = ["Section", "ModelSummary", "RewriteRecord", "NearMissRecord", "Report", "summarize", "op_counts", "format_shapes",
           "FAIL_ON_EVENTS", "parse_fail_on", "strict_json", "json_text", "bench_line"]

#: The events a CI gate may refuse (``--fail-on``, ``Result.check``): a site rolled back as not
#: equivalent, a family rejected as not faster, a rewritten output not verified at every site,
#: nothing rewritten, a candidate not rewritten (a near miss, tuning's kept sites included).
FAIL_ON_EVENTS = ("rolled-back", "rejected", "not-verified", "unchanged", "near-miss")


@runtime_checkable
class Section(Protocol):
    """A report section (``verification``, ``benchmark``, ``static``, ``tuning``, or a new one):
    the step that produced it knows how to show it as JSON, Markdown and on a terminal."""

    def to_json(self) -> Any: ...

    def to_markdown(self) -> str: ...

    def render(self, console: Any, *, verbose: bool = False) -> None: ...

STATUSES = ("applied", "rolled_back", "rejected")
#: How a rolled-back site's reason starts when its rewritten form did not load or run in onnxruntime.
FAILED_TO_RUN = "rewritten site failed to run"


def parse_fail_on(events: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"rolled-back,rejected"`` (or a sequence of names) -> the events, checked against
    :data:`FAIL_ON_EVENTS`."""
    names = [events] if isinstance(events, str) else list(events or ())
    out = tuple(dict.fromkeys(e.strip() for name in names for e in name.split(",") if e.strip()))
    unknown = [e for e in out if e not in FAIL_ON_EVENTS]
    if unknown:
        raise InputError(f"unknown --fail-on event(s): {', '.join(unknown)}; expected some of {', '.join(FAIL_ON_EVENTS)}")
    return out


def strict_json(value: Any) -> Any:
    """``value`` as strict JSON holds it: a float that is not finite (inf, nan) becomes null, and
    the top-level object lists each in ``non_finite`` (``[{"path": "/verification/providers/cpu/max_abs",
    "value": "inf"}]``, JSON Pointers) beside the reason its own section gives, so parsers that
    refuse ``Infinity`` / ``NaN`` (JavaScript, ``json.loads(..., parse_constant=...)``) read every report."""
    found: list[dict[str, str]] = []
    out = _finite(value, "", found)
    if found and isinstance(out, dict):
        out["non_finite"] = list(out.get("non_finite") or []) + found
    return out


def _finite(value: Any, path: str, found: list[dict[str, str]]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        found.append({"path": path, "value": str(value)})
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v, f"{path}/{str(k).replace('~', '~0').replace('/', '~1')}", found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{path}/{i}", found) for i, v in enumerate(value)]
    return value


def json_text(value: Any) -> str:
    """``value`` as strict, indented JSON text (see :func:`strict_json`), one trailing newline."""
    return json.dumps(strict_json(value), indent=2, allow_nan=False) + "\n"


def format_shapes(shapes: Mapping[str, Sequence[int]]) -> str:
    """``{"x": [1, 16]}`` -> ``x=[1,16]``."""
    return ", ".join(f"{k}=[{','.join(str(d) for d in v)}]" for k, v in shapes.items())


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """{op_type: count} over the main graph and every subgraph, sorted by op type."""
    counts: Counter[str] = Counter()
    graphs = [model.graph]
    while graphs:
        nodes = graphs.pop().node
        counts.update([n.op_type for n in nodes])
        graphs += [g for n in nodes if len(n.attribute) for g in node_graphs(n)]
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
    """One site's outcome. ``evidence``: what verification compared at the site's boundary
    (``rewrites[].evidence`` in the JSON report), when it ran."""

    rule: str
    nodes: tuple[str, ...]
    status: str
    reason: str = ""
    detail: dict[str, Any] | None = None
    family: str = ""  # the rule's family (acceptance rolls families back as one); "" when unknown
    evidence: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "nodes": list(self.nodes), "status": self.status, "reason": self.reason}
        if self.family:
            out["family"] = self.family
        if self.detail:
            out["detail"] = self.detail
        if self.evidence is not None:
            out["evidence"] = self.evidence
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

    @property
    def written(self) -> bool:
        """Whether the output model was saved (``Result.save``); not in a dry run."""
        return self.output is not None and self.output.path is not None

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
            "summary": self.summary_line(),
        }
        for name, value in self.sections.items():
            out[name] = value.to_json()
        if self.notes:
            out["notes"] = list(self.notes)
        return strict_json(out)

    # --- events a CI gate may refuse ------------------------------------------------------------

    def events(self) -> dict[str, str]:
        """The :data:`FAIL_ON_EVENTS` that happened in this run, each with what happened, e.g.
        ``{"rolled-back": "1 site rolled back (method1-conv-to-matmul at conv: not equivalent: ...)"}``."""
        found: dict[str, str] = {}
        for event, status, what in (("rolled-back", "rolled_back", "rolled back"), ("rejected", "rejected", "kept as it was (not faster)")):
            sites = [r for r in self.rewrites if r.status == status]
            if sites:
                first = sites[0]
                found[event] = f"{_count(len(sites), 'site')} {what} ({first.rule} at {', '.join(first.nodes) or '-'}: {first.reason})"
        if self.applied:
            verification = self._json_of("verification")
            if verification is None:
                found["not-verified"] = f"{_count(len(self.applied), 'rewritten site')}, verification off: the output is NOT verified"
            elif not verification.get("passed"):
                found["not-verified"] = "verification did not pass at every rewritten site"
        else:
            found["unchanged"] = "nothing rewritten" + (" (written unchanged)" if self.written else "")
        if self.near_misses:
            miss = self.near_misses[0]
            found["near-miss"] = (f"{_count(len(self.near_misses), 'near miss', 'near misses')} "
                                  f"(first: {miss.rule} at {miss.node}: {miss.reason})")
        return {e: found[e] for e in FAIL_ON_EVENTS if e in found}

    def check(self, fail_on: str | Sequence[str]) -> None:
        """Raise :class:`rewriter.FailOnError` (exit 4) when an event of ``fail_on`` (names of
        :data:`FAIL_ON_EVENTS`, a sequence or comma-separated) happened in this run; the message
        names each, with what happened."""
        wanted = parse_fail_on(fail_on)
        happened = self.events()
        hit = tuple(e for e in wanted if e in happened)
        if hit:
            raise FailOnError("; ".join(f"{e}: {happened[e]}" for e in hit), hit)

    # --- the summary line ---------------------------------------------------------------------

    def summary_line(self, output_name: str | None = None) -> str:
        """What the run did, in one line:

            model.rewritten.onnx: 3 sites rewritten, verified on cpu at 2 shapes, 1.31× faster (1.20–1.44) at x=[8,1024,512], peak RSS -12%

        ``output_name`` is the line's subject (default: the written model's file name, or
        "not written" when the model was not saved, e.g. a dry run). Every outcome of a
        successful run has its wording: nothing rewritten, sites rolled back or rejected,
        verification or measurement skipped."""
        subject = output_name or (Path(self.output.path).name if self.output and self.output.path else "not written")
        return f"{subject}: " + ", ".join(self._summary_parts())

    def _summary_parts(self) -> list[str]:
        n = len(self.applied)
        parts = [f"{_count(n, 'site')} {'rewritten' if self.written else 'would be rewritten'}" if n
                 else "nothing rewritten" + (" (written unchanged)" if self.written else "")]
        rolled = [r for r in self.rewrites if r.status == "rolled_back"]
        failed = sum(r.reason.startswith(FAILED_TO_RUN) for r in rolled)
        if len(rolled) > failed:
            parts.append(f"{len(rolled) - failed} rolled back as not equivalent")
        if failed:
            parts.append(f"{failed} rolled back as failing to run in onnxruntime")
        k = sum(r.status == "rejected" for r in self.rewrites)
        if k:
            parts.append(f"{_count(k, 'site')} kept as {'it was' if k == 1 else 'they were'} (not faster)")
        if not n:
            kept = _kept_by_tuning(self._json_of("tuning"))
            if kept:
                parts.append(f"{_count(kept, 'site')} kept as {'it was' if kept == 1 else 'they were'} (measured)")
            if self.near_misses:
                parts.append(_count(len(self.near_misses), "near miss", "near misses"))
            return parts
        verification = self._json_of("verification")
        if verification is not None:
            parts.append(_verified_phrase(verification))
        elif self.written:
            parts.append("NOT verified")
        bench = _target_bench(self._json_of("benchmark"))
        if bench is not None:
            parts.append(f"{_speed(bench)} at {format_shapes(bench.get('shapes', {}))}" + _rss_change(bench))
        elif self.written:
            parts.append("not measured")
        return parts

    def _json_of(self, name: str) -> Any:
        section = self.sections.get(name)
        return None if section is None else section.to_json()

    # --- Markdown: every detail -----------------------------------------------------------------

    def to_markdown(self) -> str:
        lines = [f"# onnx-rewrite report (v{self.tool_version})", "", f"**{self.summary_line()}**", ""]
        lines += ["| | input | output |", "|---|---|---|"]
        outp = self.output
        lines.append(f"| path | {self.input.path or '(memory)'} | {(outp.path if outp else None) or '(not written)'} |")
        lines.append(f"| nodes | {self.input.nodes} | {outp.nodes if outp else '-'} |")
        for op in _interesting_ops(self.input.op_counts, outp.op_counts if outp else {}):
            lines.append(f"| {op} | {self.input.op_counts.get(op, 0)} | {(outp.op_counts.get(op, 0) if outp else '-')} |")
        lines += ["", "## Rewrites", ""]
        if self.rewrites:
            lines += ["| rule | family | status | nodes | evidence | reason |", "|---|---|---|---|---|---|"]
            lines += [f"| {r.rule} | {r.family or '-'} | {r.status} | {', '.join(r.nodes)} | {_evidence_text(r.evidence).strip(' ()') or '-'} "
                      f"| {r.reason} |" for r in self.rewrites]
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

    # --- the terminal -----------------------------------------------------------------------------

    def render(self, console: Any, *, verbose: bool = False, list_all: bool = False) -> None:
        """The report on a rich Console, in pipeline order; the caller prints
        :meth:`summary_line` after it.

        At a glance (default): the op counts before and after, one line per rule family and
        status, the verification and the measurement in one line each, the near misses (listed
        when nothing was rewritten, else counted) and the notes the summary does not restate.
        ``verbose``: every section's full tables (tuning first: it ran first), each site, every
        near miss and note. ``list_all`` (a dry run): each site and every near miss."""
        if verbose and "tuning" in self.sections:
            self.sections["tuning"].render(console, verbose=True)
        self._render_ops(console)
        self._render_rewrites(console, sites=verbose or list_all)
        for name, section in self.sections.items():
            if verbose:
                if name != "tuning":
                    section.render(console, verbose=True)
            elif name not in _GLANCE:
                section.render(console, verbose=False)
            else:
                for line in _GLANCE[name](section.to_json(), bool(self.applied)):
                    console.print(line, markup=False, highlight=False)
        self._render_near_misses(console, every=verbose or list_all)
        for note in self.notes:
            if verbose or not note.startswith(RESTATED_NOTES):
                console.print(f"note: {note}", markup=False, highlight=False)

    def _render_ops(self, console: Any) -> None:
        from rich.table import Table

        outp = self.output
        rows = [("nodes", self.input.nodes, outp.nodes if outp else None)]
        rows += [(op, self.input.op_counts.get(op, 0), outp.op_counts.get(op, 0) if outp else None)
                 for op in _interesting_ops(self.input.op_counts, outp.op_counts if outp else {})]
        if all(before == after for _, before, after in rows):
            ops = ", ".join(f"{op} {before}" for op, before, _ in rows[1:])
            console.print(f"ops unchanged: {_count(self.input.nodes, 'node')}" + (f" ({ops})" if ops else ""), highlight=False)
            return
        grid = Table.grid(padding=(0, 2))
        grid.add_column()
        grid.add_column(justify="right")
        grid.add_column(justify="right")
        grid.add_row("ops", "before", "after", style="bold")
        for op, before, after in rows:
            grid.add_row(op, str(before), "-" if after is None else str(after))
        console.print(grid)

    def _render_rewrites(self, console: Any, *, sites: bool) -> None:
        """One line per (status, family): sites, rules, and for sites not kept the first reason;
        with ``sites``, a line per site under it."""
        groups: dict[tuple[str, str], list[RewriteRecord]] = {}
        for r in sorted(self.rewrites, key=lambda r: STATUSES.index(r.status) if r.status in STATUSES else len(STATUSES)):
            groups.setdefault((r.status, r.family or r.rule), []).append(r)
        rows = [(_STATUS_WORDS.get(status, status), family, _count(len(recs), "site"), recs) for (status, family), recs in groups.items()]
        widths = [max((len(row[k]) for row in rows), default=0) for k in range(3)]
        for *cells, recs in rows:
            rules = ", ".join(dict.fromkeys(r.rule for r in recs))
            share = (recs[0].detail or {}).get("share")
            if recs[0].status == "applied":
                detail = f"{rules}: {share}" if share else rules  # the family's own measured share
            else:
                detail = f"{rules}: {recs[0].reason.removeprefix('kept as it was: ')}"
            console.print("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + detail, markup=False, highlight=False)
            for r in recs if sites else ():
                console.print(f"    {r.rule}: {', '.join(r.nodes)}{_evidence_text(r.evidence)}", markup=False, highlight=False)

    def _render_near_misses(self, console: Any, *, every: bool) -> None:
        """Listed (the first few, at a glance) when nothing was rewritten or ``every``; else counted."""
        n = len(self.near_misses)
        if not n:
            return
        if not every and self.applied:
            console.print(f"{_count(n, 'candidate')} not rewritten (near misses): run with -v or --dry-run to see why",
                          highlight=False)
            return
        shown = self.near_misses if every else self.near_misses[:_NEAR_MISSES_AT_A_GLANCE]
        console.print(f"{_count(n, 'near miss', 'near misses')} (candidates not rewritten, and why):", highlight=False)
        for miss in shown:
            console.print(f"  {miss.rule} at {miss.node}: {miss.reason}", markup=False, highlight=False)
        if len(shown) < n:
            console.print(f"  ... {n - len(shown)} more: run with -v or --dry-run", highlight=False)


#: How each status reads at a glance (the JSON keeps the status names).
_STATUS_WORDS = {"applied": "applied", "rolled_back": "rolled back", "rejected": "kept as it was"}

#: Notes the summary line already says (the terminal shows them only with ``verbose``; JSON and
#: Markdown keep every note).
RESTATED_NOTES = (
    "verification skipped", "verification: nothing was rewritten", "benchmark skipped", "benchmark: nothing was rewritten",
    "acceptance: no measurable change",
)
_NEAR_MISSES_AT_A_GLANCE = 5


def _evidence_text(evidence: Mapping[str, Any] | None) -> str:
    """`` (verified: cpu 2 runs, max abs 1.2e-07)``: what verification compared at a site."""
    if not evidence:
        return ""
    runs = [f"{name} {len(p.get('runs', []))} run{'s' if len(p.get('runs', [])) != 1 else ''}" + (
            f", max abs {p['max_abs']:.2g}" if p.get("max_abs") is not None else "")
            for name, p in (evidence.get("providers") or {}).items()]
    return f" ({evidence.get('status')}{': ' + '; '.join(runs) if runs else ''})"


def _interesting_ops(a: dict[str, int], b: dict[str, int]) -> Iterable[str]:
    key = {"Conv", "MatMul", "Gemm", "Transpose", "Reshape"}
    return sorted(op for op in set(a) | set(b) if op in key or a.get(op, 0) != b.get(op, 0))


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


# --- at a glance, from the sections' JSON ----------------------------------------------------------

def _passed_shapes(verification: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(providers that passed, distinct input shapes they ran)."""
    passed = [name for name, p in verification.get("providers", {}).items() if p.get("status") == "passed"]
    shapes = [format_shapes(s) for name in passed for s in verification["providers"][name].get("shapes", [])]
    return passed, list(dict.fromkeys(shapes))


def _every_site(verification: Mapping[str, Any]) -> bool:
    """Whether verification compared every rewritten site at its boundary and all passed."""
    sites = verification.get("sites") or {}
    return bool(sites) and set(sites) == {"verified"}


def _verified_phrase(verification: Mapping[str, Any]) -> str:
    passed, shapes = _passed_shapes(verification)
    if not verification.get("passed"):
        return "verification FAILED"
    where = " at every site" if _every_site(verification) else ""
    return f"verified{where} on {', '.join(passed)} at {_count(len(shapes), 'shape')}"


def _verification_lines(verification: Mapping[str, Any], _applied: bool) -> list[str]:
    """``verified: equivalent on cpu at 2 shapes (x=[1,8], x=[3,8]); max abs 2.4e-07`` and a line
    per provider that did not pass."""
    passed, shapes = _passed_shapes(verification)
    providers = verification.get("providers", {})
    if verification.get("passed"):
        worst = [providers[n]["max_abs"] for n in passed if providers[n].get("max_abs") is not None]
        line = f"verified: equivalent on {', '.join(passed)} at {_count(len(shapes), 'shape')} ({'; '.join(shapes)})"
        if _every_site(verification):
            n = verification["sites"]["verified"]
            line += f", {'the site' if n == 1 else f'each of {n} sites'} compared at its boundary"
        inputs = verification.get("inputs") or []
        if len(inputs) > 1:
            line += f", inputs searched: {', '.join(inputs)}"
        lines = [line + (f"; max abs {max(worst):.3g}" if worst else "")]
    else:
        lines = ["verification: NOT equivalent"]
    # "cuda: not used (no NVIDIA GPU/driver ...)", the usual case on a machine without a GPU, is
    # left to -v and the JSON (the run's notes say it when CUDA was asked for); other skips and
    # failures keep their status word.
    lines += [f"  {name}: {p.get('status')}: {p.get('reason') or '-'}" for name, p in providers.items()
              if p.get("status") != "passed" and not (p.get("status") == "skipped" and p.get("reason", "").startswith("not used"))]
    return lines


def _target_bench(benchmark: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The provider that decided acceptance: the first one measured."""
    return next((r for r in (benchmark or {}).values() if r.get("status") == "measured"), None)


def _speed(r: Mapping[str, Any]) -> str:
    """``1.31× faster (1.20–1.44)``, ``0.91× slower (...)``, ``no measurable change (1.01×, 0.97–1.05)``."""
    if r.get("speedup") is None:
        return str(r.get("verdict", "not compared"))
    spread = f"{r['speedup_low']:.2f}–{r['speedup_high']:.2f}"
    if r.get("verdict") in ("faster", "slower"):
        return f"{r['speedup']:.2f}× {r['verdict']} ({spread})"
    return f"{r.get('verdict')} ({r['speedup']:.2f}×, {spread})"


def bench_line(provider: str, r: Mapping[str, Any]) -> str:
    """One provider's measurement in one line: ``cpu at x=[8,512,512]: 1.31× faster (1.20–1.44), peak
    RSS -12%`` for two models, ``cpu at x=[8,512,512]: median 1.234 ms (p90 1.301 ms)`` for one."""
    where = f"{provider} at {format_shapes(r.get('shapes', {}))}"
    if r.get("status") != "measured":
        return f"{provider}: not measured: {r.get('reason') or '-'}"
    if r.get("after"):
        return f"{where}: {_speed(r)}{_rss_change(r)}"
    before = r.get("before") or {}
    median, p90 = before.get("median_ms"), before.get("p90_ms")
    return f"{where}: median {median:.3f} ms (p90 {p90:.3f} ms)" if median is not None and p90 is not None else f"{where}: measured"


def _rss_change(r: Mapping[str, Any]) -> str:
    """``, peak RSS +16% (the model's own +22%)``: the whole process's peak (interpreter and
    onnxruntime included) and the model's own share, its peak over the process before its
    session (weights, onnxruntime's arena, activations), both measured in a fresh process at the
    measured shape."""
    b, a = r.get("before") or {}, r.get("after") or {}
    before, after = b.get("peak_rss_bytes"), a.get("peak_rss_bytes")
    if not before or after is None:
        return ""
    # Rounded first, so a change under half a percent reads +0%, not -0%.
    text = f", peak RSS {round((after - before) / before * 100):+d}%"
    if b.get("baseline_rss_bytes") and a.get("baseline_rss_bytes"):
        own_before, own_after = before - b["baseline_rss_bytes"], after - a["baseline_rss_bytes"]
        if own_before > 0:
            text += f" (the model's own {round((own_after - own_before) / own_before * 100):+d}%)"
    return text


def _benchmark_lines(benchmark: Mapping[str, Any], applied: bool) -> list[str]:
    """``measured on cpu at x=[8,1024,512] (auto: ...): 1.31× faster (1.20–1.44), peak RSS -12%``
    (and the small shape's figure), and a line per provider not measured."""
    lines = []
    target = _target_bench(benchmark)
    if target is not None:
        flags = " ".join(f"--bench-shape {k}:{','.join(str(d) for d in v)}" for k, v in target.get("shapes", {}).items())
        line = (f"measured on {target['provider']} at {format_shapes(target.get('shapes', {}))} ({flags} reproduces it; "
                f"{target.get('session') or 'onnxruntime defaults'}): {_speed(target)}{_rss_change(target)}")
        small = target.get("small")
        if small and small.get("status") == "measured":
            line += f"; at {format_shapes(small.get('shapes', {}))}: {_speed(small)}"
        lines.append(line + ("" if applied else " (the rejected rewrite)"))
    lines += [f"  {name}: not measured: {r.get('reason') or '-'}" for name, r in benchmark.items() if r.get("status") != "measured"]
    return lines


def _kept_by_tuning(tuning: Mapping[str, Any] | None) -> int:
    """How many sites tuning measured and left as they were."""
    return sum(s.get("choice") == "original" for s in (tuning or {}).get("sites", []))


def _tuning_lines(tuning: Mapping[str, Any], _applied: bool) -> list[str]:
    """A line only when measuring kept sites as they were (the applied lines show the others)."""
    kept = _kept_by_tuning(tuning)
    if not kept:
        return []
    return [f"tuning on {tuning.get('provider')}: {_count(kept, 'site')} kept as {'it was' if kept == 1 else 'they were'} "
            "(no rewrite measured faster there; -v shows the timings)"]


_GLANCE: dict[str, Callable[[Any, bool], list[str]]] = {
    "verification": _verification_lines,
    "benchmark": _benchmark_lines,
    "tuning": _tuning_lines,
    "static": lambda _json, _applied: [],  # its table, with -v
}
