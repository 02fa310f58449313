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
a plugin error that says why; so is naming an unknown id while a source failed to import (its
rules are not known: the error is that source's). A valid rule whose pattern can never match
as written (:func:`pattern_warnings`: an op that is no ONNX operator, a wrong number of inputs)
loads with a :class:`RuleWarning`.

**Plugin rules are opt-in.** A plugin's rules run when ``--rules`` names them; the policies
(``default``, ``--direction to-matmul|to-conv``, per-site tuning) take built-in rules only, so
installing a plugin package changes no run by itself. A source that should join them says so
with ``JOIN_DEFAULT_POLICY = True`` at module level (beside ``RULES``): its rules then count
like built-in ones (``default``, ``direction``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable, Sequence

from rewriter.errors import InputError, PluginError, RuleWarning
from rewriter.engine.rule import Rule, pattern_warnings, rule_problem

__all__ = ["ENTRY_POINT_GROUP", "JOIN_DEFAULT_POLICY", "BUILT_IN", "RuleInfo", "Unavailable", "Registry", "discover", "DIRECTIONS"]

ENTRY_POINT_GROUP = "onnx_rewrite.rules"
#: The module attribute by which a plugin source lets its rules join the policies (see the module docstring).
JOIN_DEFAULT_POLICY = "JOIN_DEFAULT_POLICY"
BUILT_IN = "built-in"
# No "all": to-matmul and to-conv rules undo each other, so together they never converge.
DIRECTIONS = ("default", "to-matmul", "to-conv")


@dataclass(frozen=True)
class RuleInfo:
    """One available rule: its class, where it came from, and whether it is opt-in (a plugin's
    rule whose source did not join the policies: it runs only when named)."""

    rule: type[Rule]
    source: str  # "built-in", "plugin <dist> (<entry point>)", or "plugin file <path>" / "plugin module <name>"
    opt_in: bool = False

    @property
    def id(self) -> str:
        return self.rule.id

    @property
    def family(self) -> str:
        return self.rule.family_name()

    @property
    def direction(self) -> str:
        return self.rule.direction

    @property
    def default(self) -> bool:
        """Part of the default policy: the rule says so, and it is not opt-in."""
        return self.rule.default and not self.opt_in

    @property
    def benefit(self) -> float:
        return self.rule.benefit

    @property
    def description(self) -> str:
        return self.rule.description

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "family": self.family, "direction": self.direction, "default": self.default, "opt_in": self.opt_in,
                "benefit": self.benefit, "description": self.description, "source": self.source}


@dataclass(frozen=True)
class Unavailable:
    """A source that failed to load, or one rule of it (``rule``: its id) that is invalid."""

    source: str
    error: str
    rule: str = ""

    def to_json(self) -> dict[str, str]:
        return {"source": self.source, "error": self.error, **({"rule": self.rule} if self.rule else {})}


@dataclass
class Registry:
    rules: dict[str, RuleInfo] = field(default_factory=dict)
    unavailable: list[Unavailable] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # each rule whose pattern cannot match as written, and why

    def add(self, rule: type[Rule], source: str, *, opt_in: bool = False) -> None:
        if not rule.id:
            raise PluginError(f"rule class {rule.__qualname__} from {source} has no id")
        if rule.id in self.rules:
            other = self.rules[rule.id]
            if other.rule is rule:
                return
            raise PluginError(f"duplicate rule id '{rule.id}': defined by {other.source} and by {source}")
        self.rules[rule.id] = RuleInfo(rule, source, opt_in)

    def select(
        self,
        rules: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        direction: str = "default",
    ) -> list[Rule]:
        """Instantiate the rules to run.

        ``rules`` names ids explicitly (any direction, opt-in plugin rules included). Otherwise
        ``direction`` picks among the rules that are not opt-in: ``default`` = rules marked
        default; ``to-matmul`` / ``to-conv`` = every rule of that direction plus the cleanups.
        ``exclude`` removes ids. (``auto``, per-site tuning, is resolved above the engine: it
        selects from ``to-matmul`` and ``to-conv``.)
        """
        self._check_known(list(rules or ()) + list(exclude))
        if direction not in DIRECTIONS:
            raise InputError(f"unknown direction '{direction}': expected one of {', '.join(DIRECTIONS)}")
        if rules:
            chosen = [self.rules[r] for r in rules]
        elif direction == "default":
            chosen = [i for i in self.rules.values() if i.default]
        else:
            chosen = [i for i in self.rules.values() if not i.opt_in and i.rule.direction in (direction, "cleanup")]
        return [i.rule() for i in chosen if i.id not in set(exclude)]

    def _check_known(self, ids: Sequence[str]) -> None:
        """Every id names an available rule; else why not: the rule's own error when it is invalid,
        the error of a source that failed to import (the id may be one of its rules), else unknown."""
        unknown = [r for r in ids if r not in self.rules]
        if not unknown:
            return
        broken = [u for u in self.unavailable if u.rule and u.rule in unknown]
        if broken:
            raise PluginError(f"{broken[0].source}: {broken[0].error}")
        failed = [u for u in self.unavailable if not u.rule]
        if failed:
            raise PluginError(f"unknown rule id(s): {', '.join(unknown)}, and "
                              + "; ".join(f"{u.source} failed to load: {u.error}" for u in failed)
                              + (" (its rules are unavailable)" if len(failed) == 1 else " (their rules are unavailable)"))
        raise InputError(f"unknown rule id(s): {', '.join(unknown)} (see 'onnx-rewrite rules')")


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
        source = BUILT_IN if ep.value == "rewriter.rules" else f"plugin {dist} ({ep.name})"
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
    (a PluginError when ``strict``). A plugin's rules are opt-in unless the source joins the policies."""
    try:
        loaded = loader()
        found = _rules_from(loaded)
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
        _add_valid(reg, source, rule, strict, opt_in=source != BUILT_IN and not _joins_policies(loaded, rule))


def _joins_policies(loaded: object, rule: object) -> bool:
    """Whether a plugin's ``rule`` joins the policies: its source module (the module loaded, else
    the one defining the rule) sets ``JOIN_DEFAULT_POLICY = True``."""
    module = loaded if isinstance(loaded, ModuleType) else sys.modules.get(getattr(rule, "__module__", ""))
    return getattr(module, JOIN_DEFAULT_POLICY, False) is True


def _add_valid(reg: Registry, source: str, rule: object, strict: bool, *, opt_in: bool) -> None:
    """Add ``rule`` when it is a valid Rule class (warning when its pattern cannot match as written);
    else list it as unavailable (a PluginError when ``strict``)."""
    problem = rule_problem(rule) if inspect.isclass(rule) and issubclass(rule, Rule) else f"{rule!r} is not a Rule class"
    if problem is None:
        reg.add(rule, source, opt_in=opt_in)  # type: ignore[arg-type]
        for why in pattern_warnings(rule):  # type: ignore[arg-type]
            text = f"{source}: rule '{getattr(rule, 'id', '')}': {why}"
            reg.warnings.append(text)
            warnings.warn(text, RuleWarning, stacklevel=2)
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
