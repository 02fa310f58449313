"""Option parsing shared by several commands (comma lists, verification options)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from rewriter.errors import InputError

__all__ = ["split_ids", "verify_options"]


def split_ids(values: Sequence[str] | None) -> list[str]:
    """`--rules a,b --rules c` -> [a, b, c]."""
    out: list[str] = []
    for v in values or ():
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


def verify_options(
    providers: str | None,
    seed: int,
    atol: float | None,
    rtol: float | None,
    shapes: Sequence[str] | None,
    inputs: Path | None,
    input_range: str | None,
) -> Any:
    from rewriter.prove.inputs import parse_shape_overrides
    from rewriter.prove.verify import VerifyOptions

    rng = None
    if input_range:
        try:
            lo, hi = (float(x) for x in input_range.split(","))
        except ValueError:
            raise InputError(f"--input-range expects LOW,HIGH, got '{input_range}'") from None
        if not lo < hi:
            raise InputError(f"--input-range: LOW must be below HIGH, got '{input_range}'")
        rng = (lo, hi)
    return VerifyOptions(
        providers=tuple(split_ids([providers])) if providers else None,
        seed=seed,
        input_range=rng,
        inputs_npz=inputs,
        shape_overrides=parse_shape_overrides(list(shapes or ())) or None,
        atol=atol,
        rtol=rtol,
    )
