"""The tune step's report section ``tuning``: per site, its forms, their timings and the choice."""

from __future__ import annotations

import json
from typing import Any, Mapping

__all__ = ["ORIGINAL", "TuningSection"]

ORIGINAL = "original"


class TuningSection(dict):  # type: ignore[type-arg]
    """The report's ``tuning`` section (see the README)."""

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(self))

    def to_markdown(self) -> str:
        return tuning_markdown(self)

    def render(self, console: Any, *, verbose: bool = False) -> None:
        render_tuning(self, console)


def _forms_cell(forms: Mapping[str, Mapping[str, Any]], sep: str = ", ") -> str:
    """``original`` first, then the other forms fastest first."""
    order = sorted(forms, key=lambda f: (f != ORIGINAL, forms[f]["median_ms"]))
    return sep.join(f"{f} {forms[f]['median_ms']:.4f}" for f in order) or "-"


def tuning_markdown(section: Mapping[str, Any]) -> str:
    shapes = ", ".join(f"{k}={v}" for k, v in section.get("shapes", {}).items())
    cache = section.get("cache", {})
    head = (f"provider {section.get('provider')}, {section.get('threads')} threads, {shapes}, "
            f"{section.get('runs')} rounds; cache: {cache.get('hits', 0)} hit(s), {cache.get('misses', 0)} miss(es), "
            f"{cache.get('repeats', 0)} repeat(s) of a site measured in this run")
    lines = [head, "", "| site | choice | forms (median ms) | cached | reason |", "|---|---|---|---|---|"]
    for s in section.get("sites", []):
        lines.append(f"| {', '.join(s['nodes'])} | {s['choice']} | {_forms_cell(s['forms'])} | "
                     f"{'yes' if s['cached'] else 'no'} | {s['reason']} |")
    return "\n".join(lines)


def _kept_cell(site: Mapping[str, Any], form: str, stats: Mapping[str, Any]) -> str:
    """``kept`` for the form written at the site, flagged when it measured slower than the original."""
    if form != site["choice"]:
        return ""
    speedup = stats.get("speedup")
    if form != ORIGINAL and speedup is not None and speedup < 1.0:
        return "kept, slower than the original but not measurably"
    return "kept" if stats else "kept (not measured)"


def render_tuning(section: Mapping[str, Any], console: Any) -> None:
    """One row per form of each site (fastest first): median, speedup over the original, and
    ``kept`` on the form written; then each site's reason."""
    from rich.table import Table
    from rich.text import Text

    sites = section.get("sites", [])
    if not sites:
        console.print("tuning: nothing to tune (no rule applies at any Conv/MatMul/Gemm node; the near misses say why)")
        return
    cache = section.get("cache", {})
    shapes = ", ".join(f"{k}={v}" for k, v in section.get("shapes", {}).items())
    table = Table(title=f"tuning on {section.get('provider')} at {shapes}: {len(sites)} site(s)", title_justify="left", show_edge=False)
    for col, justify in (("site", "left"), ("form", "left"), ("median", "right"), ("vs original", "right"), ("kept", "left")):
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for i, s in enumerate(sites):
        forms = s["forms"] or {s["choice"]: {}}
        order = sorted(forms, key=lambda f: (forms[f].get("median_ms", 0.0), f))
        site = "\n".join(s["nodes"]) + (" (cached)" if s["cached"] else "")
        for j, f in enumerate(order):
            st = forms[f]
            med = f"{st['median_ms'] * 1e3:.1f} µs" if "median_ms" in st else "-"
            sp = "1.00×" if f == ORIGINAL and st else (f"{st['speedup']:.2f}×" if st.get("speedup") else "-")
            kept = _kept_cell(s, f, st)
            style = "yellow" if kept.startswith("kept,") else "green" if kept else ""
            table.add_row(Text(site if j == 0 else ""), Text(f), med, sp, Text(kept, style=style),
                          end_section=j == len(order) - 1 and i < len(sites) - 1)
    where = cache.get("path") if cache.get("enabled") else "off"
    table.caption = (f"kept: the form written at the site; vs original: median per-round speedup over the original (> 1: faster); "
                     f"cache {where}: {cache.get('hits', 0)} hit(s), {cache.get('misses', 0)} miss(es), "
                     f"{cache.get('repeats', 0)} site(s) identical to one measured before")
    table.caption_justify = "left"
    console.print(table)
    for s in sites:
        console.print(Text(f"  {', '.join(s['nodes'])}: {s['reason']}"))
