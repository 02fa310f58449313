"""Typed options of a run, gathered in one :class:`Options`, and the named presets.

Each step has its own options (:class:`VerifyOptions`, :class:`BenchOptions`,
:class:`TuneOptions`); :class:`Options` says which steps run (``None`` = the step is off) and
which rules. What runs by default is policy, so it lives here as named presets, not in the CLI:

- :data:`PROVEN` -- rewrite with the fixed policy and verify (CPU, plus CUDA when real). The
  Python API's default: no timing, so it is fast and deterministic.
- :data:`MEASURED` -- also tune each site by measurement (when no rules are named), measure the
  whole model and roll back slower rule families. The command line's default.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from rewriter.errors import InputError
from rewriter.measure.bench import BenchOptions
from rewriter.measure.serial import MEASURE_LOCK_ENV
from rewriter.prove.inputs import parse_shape_overrides
from rewriter.prove.verify import VerifyOptions
from rewriter.tune.plan import DEFAULT_BUDGET_S, TuneOptions

__all__ = ["Options", "VerifyOptions", "BenchOptions", "TuneOptions", "PROVEN", "MEASURED", "PRESETS", "DIRECTIONS", "DEFAULT_BUDGET_S",
           "MEASURE_LOCK_ENV", "parse_shape_overrides"]

#: ``auto`` measures every site and keeps its fastest form; the others are fixed policies.
DIRECTIONS = ("default", "to-matmul", "to-conv", "auto")
_STEP_DEFAULTS: dict[str, Any] = {"verify": VerifyOptions, "bench": BenchOptions, "tune": TuneOptions}


@dataclass(frozen=True)
class Options:
    """What one :func:`rewriter.optimize` run does.

    ``rules`` names rule ids (any direction) instead of a policy; ``direction`` None means
    ``auto`` when ``tune`` is set and no ``rules`` are named, else ``default``. ``verify``,
    ``bench`` and ``tune`` are each step's options, or None to skip the step. Tuning times sites
    with ``bench``'s settings (or the defaults when the whole-model benchmark is off).
    ``upgrade_opset`` converts an older model to that opset first (verified like a rewrite)."""

    rules: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    direction: str | None = None
    plugins: tuple[str, ...] = ()
    strict_plugins: bool = False
    verify: VerifyOptions | None = VerifyOptions()
    bench: BenchOptions | None = None
    tune: TuneOptions | None = None
    keep_slower: bool = False
    upgrade_opset: int | None = None

    def __post_init__(self) -> None:
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise InputError(f"unknown direction '{self.direction}': expected one of {', '.join(DIRECTIONS)}")
        for name in ("rules", "exclude", "plugins"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise InputError(f"{name} must be a sequence of strings, not the string {value!r}")
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    @property
    def resolved_direction(self) -> str:
        """The direction this run uses (see the class docstring)."""
        if self.direction is not None:
            return self.direction
        return "auto" if self.tune is not None and not self.rules else "default"

    @property
    def tuning(self) -> bool:
        return self.resolved_direction == "auto"

    @property
    def timing(self) -> BenchOptions:
        """The measurement settings tuning uses: ``tune.timing``, else ``bench``, else the defaults."""
        return (self.tune.timing if self.tune is not None else None) or self.bench or BenchOptions()

    @property
    def tune_options(self) -> TuneOptions:
        return self.tune or TuneOptions()

    def but(self, **changes: Any) -> "Options":
        """A copy with ``changes``; ``verify`` / ``bench`` / ``tune`` also take True (the step's
        default options) or False (skip the step)."""
        known = {f.name for f in fields(self)}
        if unknown := sorted(set(changes) - known):
            raise TypeError(f"unknown option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for name, make in _STEP_DEFAULTS.items():
            if changes.get(name) is True:
                changes[name] = make()
            elif changes.get(name) is False:
                changes[name] = None
        return replace(self, **changes)


#: Rewrite with the fixed policy and verify; the Python API's default.
PROVEN = Options()
#: Tune each site, verify, measure the whole model and reject slower families; the CLI's default.
MEASURED = Options(bench=BenchOptions(), tune=TuneOptions())
PRESETS = {"proven": PROVEN, "measured": MEASURED}
