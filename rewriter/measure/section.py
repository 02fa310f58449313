"""The measure step's report sections: ``benchmark`` (per provider: latency, memory, verdict)
and ``static`` (FLOPs, weight bytes, activation peak). Each renders as JSON, Markdown and a
terminal table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import onnx

from rewriter.errors import InputError
from rewriter.measure.bench import ModelTiming, ProviderBench
from rewriter.measure.costs import static_costs, static_to_json
from rewriter.report import ModelSummary

__all__ = ["BenchmarkSection", "StaticSection", "BenchReport", "static_section"]


class BenchmarkSection(dict):  # type: ignore[type-arg]
    """The report's ``benchmark`` section, ``{provider: ProviderBench JSON}``; keeps the
    ProviderBench objects in ``results`` for terminal rendering."""

    def __init__(self, results: Mapping[str, ProviderBench]) -> None:
        super().__init__({name: r.to_json() for name, r in results.items()})
        self.results = dict(results)

    def to_json(self) -> dict[str, Any]:
        return {name: dict(value) for name, value in self.items()}

    def to_markdown(self) -> str:
        return benchmark_markdown(self)

    def render(self, console: Any, *, verbose: bool = False) -> None:
        render_bench(self.results, console)


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

def _fmt_ms(t: Mapping[str, Any] | None, key: str) -> str:
    return "-" if not t or t.get(key) is None else f"{t[key]:.3f} ms"


def _fmt_mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _change(a: float | None, b: float | None, unit: str, scale: float = 1.0, digits: int = 3) -> str:
    if a is None or b is None:
        return ""
    pct = f" ({(b - a) / a * 100:+.0f}%)" if a else ""
    return f"{(b - a) / scale:+.{digits}f} {unit}{pct}"


def benchmark_markdown(section: Mapping[str, Any]) -> str:
    """One Markdown table per provider from the JSON ``benchmark`` section."""
    out: list[str] = []
    for name, r in section.items():
        if r.get("status") != "measured":
            out += [f"**{name}**: skipped: {r.get('reason', '')}", ""]
            continue
        shapes = ", ".join(f"{k}={v}" for k, v in r.get("shapes", {}).items())
        out += [f"**{name}** ({r.get('threads')} threads, optimizations {r.get('opt_level')}, {shapes})", ""]
        b, a = r.get("before"), r.get("after")
        out += ["| metric | before | after | change |", "|---|---:|---:|---:|"]
        verdict = ""
        if r.get("speedup") is not None:
            verdict = f"{r['speedup']:.2f}x {r['verdict']} ({r['speedup_low']:.2f}-{r['speedup_high']:.2f}x)"
        out.append(f"| median latency | {_fmt_ms(b, 'median_ms')} | {_fmt_ms(a, 'median_ms')} | {verdict} |")
        out.append(f"| p90 latency | {_fmt_ms(b, 'p90_ms')} | {_fmt_ms(a, 'p90_ms')} | "
                   f"{_change(b and b.get('p90_ms'), a and a.get('p90_ms'), 'ms')} |")
        for label, key in (("peak RSS", "peak_rss_bytes"), ("device memory", "peak_device_bytes")):
            vb, va = (b or {}).get(key), (a or {}).get(key)
            if vb is not None or va is not None:
                out.append(f"| {label} | {_fmt_mib(vb)} | {_fmt_mib(va)} | {_change(vb, va, 'MiB', 2**20, 1)} |")
        runs = (b or {}).get("runs", 0)
        out += ["", "; ".join([f"{runs} interleaved rounds"] + list(r.get("notes", []))), ""]
    return "\n".join(out).rstrip()


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


def _ms(t: ModelTiming | None, attr: str) -> str:
    return "—" if t is None else f"{getattr(t, attr):.3f} ms"


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f} MiB"


def _pct(a: float, b: float) -> str:
    return f" ({(b - a) / a * 100:+.0f}%)" if a else ""


def _change_ms(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"{b - a:+.3f} ms{_pct(a, b)}"


def _change_bytes(a: int | None, b: int | None) -> str:
    return "" if a is None or b is None else f"{(b - a) / 2**20:+.1f} MiB{_pct(a, b)}"


def _over_baseline(t: ModelTiming | None) -> int | None:
    if t is None or t.peak_rss_bytes is None or t.baseline_rss_bytes is None:
        return None
    return t.peak_rss_bytes - t.baseline_rss_bytes


def render_bench(results: dict[str, ProviderBench], console: Any) -> None:
    """One rich table per measured provider: metric | before | after | change."""
    from rich.table import Table

    for name, r in results.items():
        if r.status != "measured":
            console.print(f"[yellow]{name}: skipped[/] — {r.reason}")
            continue
        shapes = ", ".join(f"{k}={v}" for k, v in r.shapes.items())
        table = Table(title=f"{name}: {r.threads} threads, optimizations {r.opt_level}, {shapes}", title_justify="left")
        table.add_column("metric")
        table.add_column("before", justify="right")
        if r.after is not None:
            table.add_column("after", justify="right")
            table.add_column("change", justify="right")
        b, a = r.before, r.after
        rows: list[tuple[str, str, str, str]] = []
        if r.speedup is not None:
            colour = {"faster": "green", "slower": "red"}.get(r.verdict, "dim")
            spread = f"{r.speedup_low:.2f}–{r.speedup_high:.2f}×"
            headline = f"[{colour}]{r.speedup:.2f}× {r.verdict}[/] ({spread})"
        else:
            headline = ""
        rows.append(("median latency", _ms(b, "median_ms"), _ms(a, "median_ms"), headline))
        for label, attr in (("p90 latency", "p90_ms"), ("IQR", "iqr_ms")):
            rows.append((label, _ms(b, attr), _ms(a, attr), _change_ms(getattr(b, attr, None), getattr(a, attr, None))))
        if b is not None and b.peak_rss_bytes is not None:
            rows.append(("peak RSS", _mib(b.peak_rss_bytes), _mib(a.peak_rss_bytes if a else None),
                         _change_bytes(b.peak_rss_bytes, a.peak_rss_bytes if a else None)))
            rows.append(("RSS over baseline", _mib(_over_baseline(b)), _mib(_over_baseline(a)),
                         _change_bytes(_over_baseline(b), _over_baseline(a))))
        if b is not None and b.peak_device_bytes is not None:
            rows.append(("device memory", _mib(b.peak_device_bytes), _mib(a.peak_device_bytes if a else None),
                         _change_bytes(b.peak_device_bytes, a.peak_device_bytes if a else None)))
        for row in rows:
            table.add_row(*(row if r.after is not None else row[:2]))
        runs = b.runs if b is not None else 0
        table.caption = "; ".join([f"{runs} interleaved rounds"] + list(r.notes))
        console.print(table)
