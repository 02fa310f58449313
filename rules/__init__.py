"""Built-in rule families, one module each; loaded through the `onnx_rewrite.rules` entry
point exactly like a third-party plugin. Each family module exports ``RULES``."""

from __future__ import annotations

import importlib
import pkgutil

from rewriter.ruletools import Rule

__all__ = ["RULES"]


def _collect() -> list[type[Rule]]:
    found: list[type[Rule]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(getattr(module, "RULES", ()))
    return found


RULES: list[type[Rule]] = _collect()
