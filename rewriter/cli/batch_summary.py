"""Batch mode's summary: one row per model read from its JSON report, the table, the batch's
exit code and ``OUT/summary.json``.

Rows are built from each worker's JSON report (the stable contract: ``rewrites[].status``,
``verification.passed``, ``benchmark.<provider>.speedup``), never from its terminal output, so
:func:`read_report` is the one place to adapt when a report section changes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.table import Table

from rewriter.cli.batch_jobs import KNOWN_EXITS, Outcome
from rewriter import __version__, atomic_write_text
from rewriter.errors import EXIT_FAIL_ON, EXIT_OK

__all__ = ["ReportFacts", "read_report", "Row", "make_row", "worst_exit", "render_table", "write_summary"]

COLUMNS = ("model", "sites", "verified", "speedup", "status")


def worst_exit(codes: Sequence[int]) -> int:
    """The batch's exit code: the worst of its models' in the order 0 < 4 < 1 < 2 < 3 < 70
    (:data:`KNOWN_EXITS`; 4, a --fail-on event, still wrote its output; a crashed or timed-out
    worker already counts as 70)."""
    return max(codes, key=KNOWN_EXITS.index, default=EXIT_OK)


@dataclass(frozen=True)
class ReportFacts:
    """What the batch table shows of one model's JSON report."""

    applied: int = 0
    rolled_back: int = 0
    rejected: int = 0
    verified: bool | None = None  # None: no verification section (nothing rewritten, or --no-verify)
    speedup: float | None = None  # the first provider measured (the one acceptance used)
    provider: str | None = None
    verdict: str | None = None
    speedup_low: float | None = None  # the paired ratios' 10th-90th percentile spread
    speedup_high: float | None = None
    significant: bool | None = None
    shapes: dict[str, list[int]] | None = None  # where it was measured
    session: str | None = None  # the timed sessions' settings

    @property
    def figure(self) -> str:
        """``1.58× faster (1.45–1.68) at frames=[8,512,400] on cpu`` or ``no measurable change
        (1.01×, 0.97–1.05) at ...``: the single run's wording."""
        if self.speedup is None:
            return "-"
        spread = f"{self.speedup_low:.2f}–{self.speedup_high:.2f}" if self.speedup_low is not None and self.speedup_high is not None else "?"
        head = (f"{self.speedup:.2f}× {self.verdict} ({spread})" if self.significant
                else f"no measurable change ({self.speedup:.2f}×, {spread})")
        at = ", ".join(f"{k}=[{','.join(str(d) for d in v)}]" for k, v in (self.shapes or {}).items())
        return f"{head}{' at ' + at if at else ''} on {self.provider}"


def read_report(report: Mapping[str, Any]) -> ReportFacts:
    """The table's facts from a report's JSON (``rewriter/schemas/report.schema.json``)."""
    statuses = Counter(r.get("status") for r in report.get("rewrites") or ())
    verification = report.get("verification")
    measured = [b for b in (report.get("benchmark") or {}).values() if b.get("status") == "measured" and b.get("speedup") is not None]
    first = measured[0] if measured else {}
    return ReportFacts(
        applied=statuses["applied"],
        rolled_back=statuses["rolled_back"],
        rejected=statuses["rejected"],
        verified=bool(verification.get("passed")) if isinstance(verification, Mapping) else None,
        speedup=first.get("speedup"),
        provider=first.get("provider"),
        verdict=first.get("verdict"),
        speedup_low=first.get("speedup_low"),
        speedup_high=first.get("speedup_high"),
        significant=first.get("significant"),
        shapes=first.get("shapes"),
        session=first.get("session"),
    )


@dataclass(frozen=True)
class Row:
    outcome: Outcome
    facts: ReportFacts | None  # None: the worker wrote no report (it failed)

    @property
    def model(self) -> str:
        job = self.outcome.job
        shown = str(job.source)
        return shown if job.source.name == f"{job.name}.onnx" else f"{shown} (as {job.name})"

    @property
    def status(self) -> str:
        o = self.outcome
        if o.exit_code == EXIT_OK:
            return "ok"
        why = ": ".join(x for x in (o.ended, o.error) if x) or "failed"
        return f"exit {o.exit_code}: {why}"

    def cells(self) -> tuple[str, str, str, str, str]:
        f = self.facts
        if f is None:
            return self.model, "-", "-", "-", self.status
        sites = str(f.applied)
        others = [f"{n} {what}" for n, what in ((f.rolled_back, "rolled back"), (f.rejected, "kept as it was")) if n]
        if others:
            sites += f" ({', '.join(others)})"
        verified = "-" if f.verified is None and not f.applied else {True: "yes", False: "NO", None: "not verified"}[f.verified]
        return self.model, sites, verified, f.figure, self.status


def make_row(outcome: Outcome) -> Row:
    """The row of one model: its report's facts when it wrote one (it ended well, or with a
    --fail-on event: exit 4, the output and report written)."""
    facts = None
    if outcome.exit_code in (EXIT_OK, EXIT_FAIL_ON) and outcome.job.report.is_file():
        try:
            facts = read_report(json.loads(outcome.job.report.read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError):
            facts = None
    return Row(outcome, facts)


def render_table(rows: Sequence[Row], console: Console) -> None:
    """A rich table on a terminal; elsewhere plain lines, one per model, never cut or wrapped."""
    cells = [r.cells() for r in rows]
    if console.is_terminal:
        table = Table(show_edge=False)
        for name in COLUMNS:
            table.add_column(name, overflow="fold")
        for c in cells:
            table.add_row(*c)
        console.print(table)
        return
    widths = [max(len(x) for x in col) for col in zip(COLUMNS, *cells)]
    for line in (COLUMNS, *cells):
        console.out("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip(), highlight=False)


def _summary_entry(row: Row) -> dict[str, Any]:
    o, f = row.outcome, row.facts
    job = o.job
    return {
        "input": str(job.source),
        "name": job.name,
        "output": str(job.output) if job.output.is_file() else None,
        "report": str(job.report) if job.report.is_file() else None,
        "log": str(job.log),
        "exit_code": o.exit_code,
        "status": row.status,
        "seconds": round(o.seconds, 3),
        "sites": f.applied if f else None,
        "verified": f.verified if f else None,
        "speedup": f.speedup if f else None,
        "speedup_provider": f.provider if f else None,
        "speedup_low": f.speedup_low if f else None,
        "speedup_high": f.speedup_high if f else None,
        "significant": f.significant if f else None,
        "verdict": f.verdict if f else None,
        "shapes": f.shapes if f else None,
        "session": f.session if f else None,
        "figure": f.figure if f and f.speedup is not None else None,
    }


def write_summary(path: Path, rows: Sequence[Row], *, exit_code: int, worker_args: Sequence[str]) -> dict[str, Any]:
    """``OUT/summary.json``: the batch's exit code, the options passed to every worker and one
    entry per model (input, output names, exit code, status, sites, verified, speedup); returns
    what it wrote."""
    data = {
        "tool_version": __version__,
        "exit_code": exit_code,
        "options": list(worker_args),
        "models": [_summary_entry(r) for r in rows],
    }
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return data
