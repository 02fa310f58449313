"""The measure step's report sections: ``benchmark`` (per provider: latency, memory, verdict)
and ``static`` (FLOPs, weight bytes, activation peak). Each renders as JSON, Markdown and a
terminal table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import onnx

from rewriter.errors import InputError
from rewriter.measure.bench import ProviderBench
from rewriter.measure.costs import static_costs, static_to_json
from rewriter.report import ModelSummary

__all__ = ["BenchmarkSection", "StaticSection", "BenchReport", "static_section"]


class BenchmarkSection(dict):  # type: ignore[type-arg]
    """The report's ``benchmark`` section, ``{provider: ProviderBench JSON}``."""

    def __init__(self, results: Mapping[str, ProviderBench]) -> None:
        super().__init__({name: r.to_json() for name, r in results.items()})

    def to_json(self) -> dict[str, Any]:
        return {name: dict(value) for name, value in self.items()}

    def to_markdown(self) -> str:
        return benchmark_markdown(self)

    def render(self, console: Any, *, verbose: bool = False) -> None:
        render_bench(self, console)


class StaticSection(dict):  # type: ignore[type-arg]
    """The report's ``static`` section (``costs.static_to_json``)."""

    def to_json(self) -> dict[str, Any]:
        return dict(self)

    def to_markdown(self) -> str:
        return static_markdown(self)

    def render(self, console: Any, *, verbose: bool = False) -> None:
        if self.get("after") is not None:
            render_static(self, console)
            return
        b = self["before"]
        console.print(f"static: {b['flops']:,} FLOPs, {b['initializer_bytes']:,} initializer bytes, "
                      f"{b['activation_bytes']:,} peak activation bytes", markup=False)


@dataclass(frozen=True)
class BenchReport:
    """What ``onnx-rewrite bench`` measured: one model, or two compared (before / after)."""

    tool_version: str
    before: ModelSummary
    after: ModelSummary | None
    benchmark: BenchmarkSection
    static: StaticSection | None
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "tool_version": self.tool_version,
            "models": {"before": self.before.to_json(), "after": self.after.to_json() if self.after else None},
            "benchmark": self.benchmark.to_json(),
        }
        if self.static is not None:
            data["static"] = self.static.to_json()
        if self.notes:
            data["notes"] = list(self.notes)
        return data

    def render(self, console: Any, *, verbose: bool = False) -> None:
        self.benchmark.render(console, verbose=verbose)
        if self.static is not None:
            self.static.render(console, verbose=verbose)
        for note in self.notes:
            console.print(f"note: {note}", markup=False)


def static_section(
    before: onnx.ModelProto, after: onnx.ModelProto | None, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[StaticSection | None, str]:
    """The ``static`` section of ``before`` (and ``after``) at ``shapes``, or (None, why not)."""
    try:
        costs_after = static_costs(after, dict(shapes)) if after is not None else None
        return StaticSection(static_to_json(static_costs(before, dict(shapes)), costs_after, dict(shapes))), ""
    except InputError as exc:
        return None, f"static costs unavailable: {exc}"


# --- Markdown and tables ----------------------------------------------------------------------

def _ms(t: Mapping[str, Any] | None, key: str) -> str:
    return "-" if not t or t.get(key) is None else f"{t[key]:.3f} ms"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _change(a: float | None, b: float | None, unit: str, scale: float = 1.0, digits: int = 3) -> str:
    if a is None or b is None:
        return ""
    pct = f" ({(b - a) / a * 100:+.0f}%)" if a else ""
    return f"{(b - a) / scale:+.{digits}f} {unit}{pct}"


def _over_baseline(t: Mapping[str, Any]) -> int | None:
    peak, base = t.get("peak_rss_bytes"), t.get("baseline_rss_bytes")
    return None if peak is None or base is None else peak - base


def _bench_rows(r: Mapping[str, Any], headline: str) -> list[tuple[str, str, str, str]]:
    """metric | before | after | change, from one provider's JSON; ``headline`` is the median's change."""
    b, a = r.get("before") or {}, r.get("after") or {}
    rows = [("median latency", _ms(b, "median_ms"), _ms(a, "median_ms"), headline)]
    for label, key in (("p90 latency", "p90_ms"), ("IQR", "iqr_ms")):
        rows.append((label, _ms(b, key), _ms(a, key), _change(b.get(key), a.get(key), "ms")))
    memory = [("peak RSS", b.get("peak_rss_bytes"), a.get("peak_rss_bytes")),
              ("RSS over baseline", _over_baseline(b), _over_baseline(a)),
              ("peak device memory", b.get("peak_device_bytes"), a.get("peak_device_bytes"))]
    rows += [(label, _mib(vb), _mib(va), _change(vb, va, "MiB", 2**20, 1)) for label, vb, va in memory if vb is not None]
    return rows


def _small_note(r: Mapping[str, Any]) -> str:
    """``; 1.90x at x=[1, 16, 512]`` when acceptance also measured the small shapes."""
    small = r.get("small")
    if not small or small.get("speedup") is None:
        return ""
    shapes = ", ".join(f"{k}={v}" for k, v in small.get("shapes", {}).items())
    return f"; {small['speedup']:.2f}x {small['verdict']} at {shapes}"


def _title(name: str, r: Mapping[str, Any]) -> str:
    shapes = ", ".join(f"{k}={v}" for k, v in r.get("shapes", {}).items())
    source = f" ({r['shape_source']})" if r.get("shape_source") else ""
    threads = "onnxruntime's default threads" if r.get("threads") is None else f"{r['threads']} threads"
    return f"{name}: {threads}, optimizations {r.get('opt_level')}, {shapes}{source}"


def _caption(r: Mapping[str, Any]) -> str:
    return "; ".join([f"{(r.get('before') or {}).get('runs', 0)} interleaved rounds"] + list(r.get("notes", [])))


def benchmark_markdown(section: Mapping[str, Any]) -> str:
    """One Markdown table per provider from the JSON ``benchmark`` section."""
    out: list[str] = []
    for name, r in section.items():
        if r.get("status") != "measured":
            out += [f"**{name}**: skipped: {r.get('reason', '')}", ""]
            continue
        verdict = ""
        if r.get("speedup") is not None:
            verdict = f"{r['speedup']:.2f}x {r['verdict']} ({r['speedup_low']:.2f}-{r['speedup_high']:.2f}x)" + _small_note(r)
        out += [f"**{_title(name, r)}**", "", "| metric | before | after | change |", "|---|---:|---:|---:|"]
        out += [f"| {label} | {vb} | {va} | {ch} |" for label, vb, va, ch in _bench_rows(r, verdict)]
        out += ["", _caption(r), ""]
    return "\n".join(out).rstrip()


def render_bench(section: Mapping[str, Any], console: Any) -> None:
    """One rich table per measured provider: metric | before | after | change."""
    from rich.table import Table

    for name, r in section.items():
        if r.get("status") != "measured":
            console.print(f"[yellow]{name}: skipped[/] — {r.get('reason', '')}")
            continue
        compared = r.get("after") is not None
        table = Table(title=_title(name, r), title_justify="left", caption=_caption(r))
        table.add_column("metric")
        table.add_column("before", justify="right")
        if compared:
            table.add_column("after", justify="right")
            table.add_column("change", justify="right")
        headline = ""
        if r.get("speedup") is not None:
            colour = {"faster": "green", "slower": "red"}.get(r["verdict"], "dim")
            headline = f"[{colour}]{r['speedup']:.2f}× {r['verdict']}[/] ({r['speedup_low']:.2f}–{r['speedup_high']:.2f}×)" + _small_note(r)
        for row in _bench_rows(r, headline):
            table.add_row(*(row if compared else row[:2]))
        console.print(table)


_STATIC_ROWS = (("FLOPs", "flops"), ("initializer bytes", "initializer_bytes"), ("peak activation bytes", "activation_bytes"))


def _static_rows(section: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    b, a = section.get("before") or {}, section.get("after") or {}
    rows = []
    for label, key in _STATIC_ROWS:
        vb, va = b.get(key), a.get(key)
        change = ""
        if vb is not None and va is not None:
            change = f"{va - vb:+,}" + (f" ({(va - vb) / vb * 100:+.0f}%)" if vb else "")
        rows.append((label, f"{vb:,}" if vb is not None else "-", f"{va:,}" if va is not None else "-", change))
    return rows


def static_markdown(section: Mapping[str, Any]) -> str:
    """The JSON ``static`` section as a Markdown table."""
    shapes = ", ".join(f"{k}={v}" for k, v in section.get("input_shapes", {}).items())
    out = [f"at input shapes {shapes or '(static)'}", "", "| | before | after | change |", "|---|---:|---:|---:|"]
    out += [f"| {label} | {vb} | {va} | {ch} |" for label, vb, va, ch in _static_rows(section)]
    return "\n".join(out)


def render_static(section: Mapping[str, Any], console: Any) -> None:
    """The static costs as a small rich table."""
    from rich.table import Table

    shapes = ", ".join(f"{k}={v}" for k, v in section.get("input_shapes", {}).items())
    table = Table(title=f"static costs at {shapes or 'static shapes'}", title_justify="left", show_edge=False)
    table.add_column("")
    for col in ("before", "after", "change"):
        table.add_column(col, justify="right")
    for row in _static_rows(section):
        table.add_row(*row)
    console.print(table)
