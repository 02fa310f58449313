"""What verification found: per provider, per output, and the verdict; as JSON, Markdown and a
terminal table (the report's ``verification`` section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rewriter.engine.driver import SiteKey
from rewriter.ort import NO_CUDA_DEVICE
from rewriter.prove.compare import OutputDiff, Tolerance, json_num as _num
from rewriter.prove.evidence import SiteEvidence
from rewriter.report import format_shapes

__all__ = ["ProviderResult", "VerificationResult", "format_shapes"]


@dataclass(frozen=True)
class ProviderResult:
    provider: str
    status: str  # "passed" | "failed" | "skipped"
    reason: str
    shapes: list[dict[str, list[int]]] = field(default_factory=list)
    max_abs: float | None = None
    max_rel: float | None = None
    tolerance: Tolerance | None = None
    noise_max_abs: float | None = None
    outputs: list[OutputDiff] = field(default_factory=list)
    rejected_shapes: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "status": self.status,
            "reason": self.reason,
            "shapes": self.shapes,
            "max_abs": _num(self.max_abs),
            "max_rel": _num(self.max_rel),
            "tolerance": self.tolerance.to_json() if self.tolerance else None,
            "noise_max_abs": _num(self.noise_max_abs),
            "outputs": [o.to_json() for o in self.outputs],
            "rejected_shapes": self.rejected_shapes,
        }


@dataclass(frozen=True)
class VerificationResult:
    """Passed iff no provider failed, at least one provider passed and every rewritten site
    was verified at its boundary (``sites``, :mod:`rewriter.prove.evidence`). ``inputs``: the
    input distributions run, in order (the evidence search)."""

    passed: bool
    providers: dict[str, ProviderResult]
    shape_search: dict[str, str] = field(default_factory=dict)  # dim -> why its values were searched for
    sites: dict[SiteKey, SiteEvidence] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.passed

    @property
    def clean(self) -> bool:
        """No provider found a difference (sites without evidence do not count here)."""
        return all(p.status != "failed" for p in self.providers.values())

    def with_status(self, status: str) -> list[SiteEvidence]:
        """The sites of one evidence status (``failed``, ``no-evidence``, ...), in site order."""
        return [e for e in self.sites.values() if e.status == status]

    @property
    def nothing_ran(self) -> str | None:
        """When no provider could run at all: why (per provider); else None."""
        if self.providers and all(p.status == "skipped" for p in self.providers.values()):
            return "; ".join(f"{name}: {p.reason}" for name, p in self.providers.items())
        return None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"passed": self.passed, "providers": {k: v.to_json() for k, v in self.providers.items()}}
        if self.shape_search:
            out["shape_search"] = dict(self.shape_search)
        if self.inputs:
            out["inputs"] = list(self.inputs)
        if self.sites:
            counts: dict[str, int] = {}
            for e in self.sites.values():
                counts[e.status] = counts.get(e.status, 0) + 1
            out["sites"] = counts
        return out

    def render(self, console: Any, *, verbose: bool = False) -> None:
        """One row per provider and an overall verdict on a rich Console."""
        _render(self, console)

    def to_markdown(self) -> str:
        lines = [
            f"**{'equivalent' if self.passed else 'not verified'}**",
            *[f"- `{dim}`: {why}" for dim, why in self.shape_search.items()],
            "",
            "| provider | status | shapes | max abs | max rel | tolerance | reason |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.providers.values():
            tol = f"atol={r.tolerance.atol:g} rtol={r.tolerance.rtol:g}" if r.tolerance else "-"
            shapes = "; ".join(format_shapes(x) for x in r.shapes) or "-"
            reason = r.reason.replace("|", "\\|")
            lines.append(f"| {r.provider} | {r.status} | {shapes} | {_fmt_num(r.max_abs)} | {_fmt_num(r.max_rel)} | {tol} | {reason} |")
        return "\n".join(lines)


def _fmt_num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _render(result: VerificationResult, console: Any) -> None:
    """Print one row per provider and an overall verdict on a rich Console."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="verification", title_justify="left", show_edge=False)
    for col in ("provider", "status", "shapes", "max abs", "max rel", "tolerance"):
        table.add_column(col, overflow="fold")
    style = {"passed": "green", "failed": "bold red", "skipped": "yellow"}
    reasons: list[str] = []
    for r in result.providers.values():
        shapes = " ".join(format_shapes(s) for s in r.shapes) or "-"
        tol = f"atol={r.tolerance.atol:g} rtol={r.tolerance.rtol:g}" if r.tolerance else "-"
        reason = r.reason
        if r.rejected_shapes:
            reason = (reason + "; " if reason else "") + f"{len(r.rejected_shapes)} shape(s) rejected by the original"
        if r.noise_max_abs:
            reason = (reason + "; " if reason else "") + f"CUDA noise {r.noise_max_abs:.3g}"
        if reason:
            reasons.append(f"{r.provider}: {reason}")
        # A machine without an NVIDIA GPU is the usual case, not a problem: that row stays calm.
        calm = r.status == "skipped" and r.reason == NO_CUDA_DEVICE
        # Text cells: shapes contain brackets that rich would read as markup.
        table.add_row(
            Text(r.provider), Text(r.status, style="dim" if calm else style.get(r.status, "")), Text(shapes),
            _fmt_num(r.max_abs), _fmt_num(r.max_rel), tol,
        )
    console.print(table)
    for dim, why in result.shape_search.items():
        console.print(Text(f"  {dim}: {why}"))
    for line in reasons:  # long ORT/CUDA reasons read better as lines than as a folded column
        console.print(Text(f"  {line}"))
    console.print("[green]equivalent[/]" if result.passed else "[bold red]not verified[/]")
