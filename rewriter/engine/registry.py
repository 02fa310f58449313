"""Rule discovery: built-ins and third-party plugins through one mechanism.

Sources, in order: the entry-point group ``onnx_rewrite.rules`` (the built-in family
registers itself there like any plugin), then each ``--plugin`` given as a file path
(``path/to/rules.py``) or an importable module (``package.module``). A source exports its
rules as a ``RULES`` list of Rule classes, or else every concrete Rule subclass defined in
the module is taken. A source that fails to import is listed as unavailable with its
error (fatal only when ``strict``); two rules with one id is always an error naming both.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Iterable, Sequence

from rewriter.errors import InputError, PluginError
from rewriter.engine.rule import Rule

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
    source: str
    error: str


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

    def load(source: str, loader: object) -> None:
        try:
            module_or_obj = loader() if callable(loader) else loader
            if inspect.isclass(module_or_obj) and issubclass(module_or_obj, Rule):
                found = [module_or_obj]
            elif isinstance(module_or_obj, (list, tuple)):
                found = list(module_or_obj)
            else:
                found = _rules_in(module_or_obj)  # type: ignore[arg-type]
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
            reg.add(rule, source)

    for ep in sorted(entry_points(group=entry_point_group), key=lambda e: (e.value != "rewriter.rules", e.name)):
        dist = ep.dist.name if ep.dist is not None else "?"
        source = "built-in" if ep.value == "rewriter.rules" else f"plugin {dist} ({ep.name})"
        load(source, ep.load)
    for spec in plugins:
        path = Path(spec)
        if spec.endswith(".py") or path.exists():
            if not path.is_file():
                raise PluginError(f"plugin file not found: {spec}")
            load(f"plugin file {spec}", lambda p=path: _import_file(p))
        else:
            load(f"plugin module {spec}", lambda s=spec: importlib.import_module(s))
    return reg
