"""`onnx-rewrite rules`: list every rule with its family and source, and plugins that failed to load."""

from __future__ import annotations

import sys

from rewriter import RuleInfo, list_rules
from rewriter.cli import params as p
from rewriter.cli.app import app
from rewriter.cli.console import stdout_console
from rewriter.errors import InputError
from rewriter.report import json_text

_COLUMNS = ("id", "family", "direction", "default", "source", "description")


def _default(info: RuleInfo) -> str:
    return "opt-in" if info.opt_in else "yes" if info.default else "no"


@app.command("rules")
def rules_cmd(plugin: p.Plugins = None, strict_plugins: p.StrictPlugins = False, verbose: p.Verbose = False, quiet: p.Quiet = False,
              json_out: p.Json = False) -> None:
    """List the available rules, one line each: id, family, direction, default policy (opt-in: a
    plugin's rule, run only when --rules names it), source, description; -v adds the benefit, -q
    prints the ids alone."""
    if quiet and verbose:
        raise InputError("--quiet and --verbose contradict each other; give one")
    rules = list_rules(plugin or (), strict=strict_plugins)
    if json_out:
        sys.stdout.write(json_text(rules.to_json()))
        return
    ordered = sorted(rules, key=lambda i: (i.direction, i.id))
    console = stdout_console()
    if quiet:  # the ids alone, as --rules takes them
        for info in ordered:
            console.print(info.id, markup=False, highlight=False, soft_wrap=True)
        return
    columns = _COLUMNS[:4] + (("benefit",) if verbose else ()) + _COLUMNS[4:]
    rows = [list(columns)] + [[i.id, i.family, i.direction, _default(i), *([f"{i.benefit:g}"] if verbose else []), i.source, i.description]
                              for i in ordered]
    widths = [max(len(r[k]) for r in rows) for k in range(len(columns) - 1)]
    for row in rows:
        # Every column but the description whole (the ids are what --rules takes); on a narrow
        # terminal the description is cut, never folded onto a second line.
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1]
        console.print(line, markup=False, highlight=False, no_wrap=True, overflow="ellipsis", crop=True)
    for u in rules.unavailable:
        console.print(f"unavailable: {u.source}: {u.error}", markup=False, highlight=False, soft_wrap=True)
