"""`onnx-rewrite rules`: list every rule with its source, and plugins that failed to load."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from rewriter.cli.app import app
from rewriter.engine.registry import discover


@app.command("rules")
def rules_cmd(
    plugin: Optional[List[str]] = typer.Option(None, "--plugin", help="Rule plugin: a .py file or an importable module (repeatable)."),
    strict_plugins: bool = typer.Option(False, "--strict-plugins", help="A plugin that fails to load is an error (exit 3)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """List the available rules: id, description, default policy, source."""
    reg = discover(plugin or (), strict=strict_plugins)
    table = Table(show_edge=False)
    for col in ("id", "direction", "default", "description", "source"):
        table.add_column(col)
    for info in sorted(reg.rules.values(), key=lambda i: (i.rule.direction, i.id)):
        r = info.rule
        table.add_row(r.id, r.direction, "yes" if r.default else "no", r.description, info.source)
    console = Console(width=200) if not Console().is_terminal else Console()
    console.print(table)
    for u in reg.unavailable:
        console.print(f"unavailable: {u.source}: {u.error}", markup=False)
