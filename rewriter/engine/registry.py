"""Rule discovery: built-ins and third-party plugins through one mechanism.

Sources, in order: the entry-point group ``onnx_rewrite.rules`` (the built-in family
registers itself there like any plugin), then each ``--plugin`` given as a file path
(``path/to/rules.py``) or an importable module (``package.module``). A source exports its
rules as a ``RULES`` list of Rule classes, or else every concrete Rule subclass defined in
the module is taken. A source that fails to import is listed as unavailable with its
error (fatal only when ``strict``); two rules with one id is always an error naming both.
Each rule is validated as it loads (:func:`rule_problem`: its attributes' types and values,
``pattern()`` built once): an invalid rule is unavailable like a source that fails to import
(fatal when ``strict``), the source's other rules still load, and naming it in ``--rules`` is
a plugin error that says why.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable, Sequence

from rewriter.errors import InputError, PluginError
from rewriter.engine.rule import Rule, rule_problem

__all__ = ["ENTRY_POINT_GROUP", "RuleInfo", "Unavailable", "Registry", "discover", "DIRECTIONS"]

ENTRY_POINT_GROUP = "onnx_rewrite.rules"
# No "all": to-matmul and to-conv rules undo each other, so together they never converge.
DIRECTIONS = ("default", "to-matmul", "to-conv")


@dataclass(frozen=True)
class RuleInfo:
    rule: type[Rule]
    source: str  # "built-in", "plugin <dist> (<entry point>)", or "plugin file <path>" / "plugin module <name>"

    @property
    def id(self) -> str:
        return self.rule.id


@dataclass(frozen=True)
class Unavailable:
    """A source that failed to load, or one rule of it (``rule``: its id) that is invalid."""

    source: str
    error: str
    rule: str = ""


@dataclass
class Registry:
    rules: dict[str, RuleInfo] = field(default_factory=dict)
    unavailable: list[Unavailable] = field(default_factory=list)

    def add(self, rule: type[Rule], source: str) -> None:
        if not rule.id:
            raise PluginError(f"rule class {rule.__qualname__} from {source} has no id")
        if rule.id in self.rules:
            other = self.rules[rule.id]
            if other.rule is rule:
                return
            raise PluginError(f"duplicate rule id '{rule.id}': defined by {other.source} and by {source}")
        self.rules[rule.id] = RuleInfo(rule, source)

    def select(
        self,
        rules: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        direction: str = "default",
    ) -> list[Rule]:
        """Instantiate the rules to run.

        ``rules`` names ids explicitly (any direction). Otherwise ``direction`` picks:
        ``default`` = rules marked default; ``to-matmul`` / ``to-conv`` = every rule of that
        direction plus the cleanups. ``exclude`` removes ids. (``auto``, per-site tuning, is
        resolved above the engine: it selects from ``to-matmul`` and ``to-conv``.)
        """
        unknown = [r for r in list(rules or ()) + list(exclude) if r not in self.rules]
        broken = [u for u in self.unavailable if u.rule and u.rule in unknown]
        if broken:
            raise PluginError(f"{broken[0].source}: {broken[0].error}")
        if unknown:
            raise InputError(f"unknown rule id(s): {', '.join(unknown)} (see 'onnx-rewrite rules')")
        if direction not in DIRECTIONS:
            raise InputError(f"unknown direction '{direction}': expected one of {', '.join(DIRECTIONS)}")
        if rules:
            chosen = [self.rules[r] for r in rules]
        elif direction == "default":
            chosen = [i for i in self.rules.values() if i.rule.default]
        else:
            chosen = [i for i in self.rules.values() if i.rule.direction in (direction, "cleanup")]
        return [i.rule() for i in chosen if i.id not in set(exclude)]


def _rules_in(module: ModuleType) -> list[type[Rule]]:
    listed = getattr(module, "RULES", None)
    if listed is not None:
        out = list(listed)
        bad = [r for r in out if not (inspect.isclass(r) and issubclass(r, Rule))]
        if bad:
            raise TypeError(f"RULES holds something that is not a Rule class: {bad[0]!r}")
        return out
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, Rule) and obj is not Rule and obj.__module__ == module.__name__ and obj.id
    ]


def _import_file(path: Path) -> ModuleType:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"onnx_rewrite_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def discover(plugins: Iterable[str] = (), *, strict: bool = False, entry_point_group: str = ENTRY_POINT_GROUP) -> Registry:
    """Load every rule source; see the module docstring for the order and error policy."""
    reg = Registry()
    for source, loader in _entry_point_sources(entry_point_group):
        _load(reg, source, loader, strict)
    for spec in plugins:
        source, loader = _plugin_source(spec)
        _load(reg, source, loader, strict)
    return reg


_Loader = Callable[[], object]
"""Imports a rule source; returns a Rule class, a list of them, or a module."""


def _entry_point_sources(group: str) -> list[tuple[str, _Loader]]:
    """(source, loader) of each entry point in ``group``: the built-in family first, then by name."""
    sources: list[tuple[str, _Loader]] = []
    for ep in sorted(entry_points(group=group), key=lambda e: (e.value != "rewriter.rules", e.name)):
        dist = ep.dist.name if ep.dist is not None else "?"
        source = "built-in" if ep.value == "rewriter.rules" else f"plugin {dist} ({ep.name})"
        sources.append((source, ep.load))
    return sources


def _plugin_source(spec: str) -> tuple[str, _Loader]:
    """(source, loader) of one ``--plugin``: a file path (``*.py``, or any existing path) or a module name."""
    path = Path(spec)
    shown = spec if spec.isprintable() else repr(spec)  # one line, whatever the name holds
    if spec.endswith(".py") or path.exists():
        if not path.is_file():
            raise PluginError(f"plugin file not found: {shown}")
        return f"plugin file {shown}", functools.partial(_import_file, path)
    return f"plugin module {shown}", functools.partial(importlib.import_module, spec)


def _load(reg: Registry, source: str, loader: _Loader, strict: bool) -> None:
    """Add the rules of one source to ``reg``; a source that fails to load is listed as unavailable
    (a PluginError when ``strict``)."""
    try:
        found = _rules_from(loader())
    except PluginError:
        raise
    except BaseException as exc:  # a broken plugin must not take the tool down
        if isinstance(exc, KeyboardInterrupt):
            raise
        if strict:
            raise PluginError(f"{source} failed to load: {_short(exc)}") from exc
        reg.unavailable.append(Unavailable(source, _short(exc)))
        return
    for rule in found:
        _add_valid(reg, source, rule, strict)


def _add_valid(reg: Registry, source: str, rule: object, strict: bool) -> None:
    """Add ``rule`` when it is a valid Rule class; else list it as unavailable (a PluginError when ``strict``)."""
    problem = rule_problem(rule) if inspect.isclass(rule) and issubclass(rule, Rule) else f"{rule!r} is not a Rule class"
    if problem is None:
        reg.add(rule, source)  # type: ignore[arg-type]
        return
    rule_id = getattr(rule, "id", "")
    rule_id = rule_id if isinstance(rule_id, str) else ""
    what = f"rule '{rule_id}'" if rule_id else f"rule class {getattr(rule, '__qualname__', rule)!r}"
    if strict:
        raise PluginError(f"{source}: {what} is invalid: {problem}")
    reg.unavailable.append(Unavailable(source, f"{what} is invalid: {problem}", rule_id))


def _rules_from(loaded: object) -> list[type[Rule]]:
    """The rules a source gave: a Rule class, a list of them, or those of a module (see :func:`_rules_in`)."""
    if inspect.isclass(loaded) and issubclass(loaded, Rule):
        return [loaded]
    if isinstance(loaded, (list, tuple)):
        return list(loaded)
    return _rules_in(loaded)  # type: ignore[arg-type]
