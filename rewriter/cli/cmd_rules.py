"""`onnx-rewrite rules`: list every rule with its source, and plugins that failed to load."""

from __future__ import annotations

from rich.table import Table

from rewriter.api import list_rules
from rewriter.cli import params as p
from rewriter.cli.app import app
from rewriter.cli.console import stdout_console


@app.command("rules")
def rules_cmd(plugin: p.Plugins = None, strict_plugins: p.StrictPlugins = False) -> None:
    """List the available rules: id, description, default policy, source."""
    reg = list_rules(plugin or (), strict=strict_plugins)
    table = Table(show_edge=False)
    for col in ("id", "direction", "default", "description", "source"):
        table.add_column(col)
    for info in sorted(reg.rules.values(), key=lambda i: (i.rule.direction, i.id)):
        r = info.rule
        table.add_row(r.id, r.direction, "yes" if r.default else "no", r.description, info.source)
    console = stdout_console()
    console.print(table)
    for u in reg.unavailable:
        console.print(f"unavailable: {u.source}: {u.error}", markup=False)
