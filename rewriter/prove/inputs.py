"""Model input description and test-input generation for verification and benchmarks.

A model's real inputs become `InputSpec`s; `shape_sets` turns their dynamic dimensions into
concrete shapes (every dynamic dim at >= 2 values, 1 among them); `make_feeds` fills them with
deterministic random data; `load_npz_feeds` reads user-supplied inputs instead.

`make_feeds` estimates the memory its arrays need before allocating any: above half of the
memory available (``feed_memory_limit``) it refuses with an ``InputError`` naming the input and
its shape, instead of failing part way with a MemoryError (or being killed).
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from rewriter.errors import InputError

__all__ = [
    "InputSpec",
    "input_specs",
    "parse_shape_overrides",
    "shape_sets",
    "DimPlan",
    "dim_plan",
    "make_feeds",
    "feed_memory_limit",
    "load_npz_feeds",
    "BFLOAT16",
    "Distribution",
    "NORMAL",
    "EVIDENCE_SEARCH",
    "BOOL_VARIANTS",
    "index_bounds",
]

Dim = int | str | None

try:  # ml_dtypes ships with onnx >= 1.16; guard anyway so a bare install still imports
    import ml_dtypes

    BFLOAT16: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    BFLOAT16 = None

# Integer inputs are usually indices, lengths or ids; small non-negative values are valid for
# nearly every such use (Gather, Slice, embedding tables), while large ones go out of range.
_INT_RANGE = (0, 8)


@dataclass(frozen=True)
class InputSpec:
    """One real graph input. `shape` entries: int = static, str = named dynamic, None = anonymous
    dynamic; `shape` itself is None when the model does not declare a rank. ``bound``: for an
    integer input used as an index (Gather and its kind), the size of the axis it indexes."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None
    bound: int | None = None

    @property
    def dynamic(self) -> bool:
        return self.shape is None or any(not isinstance(d, int) for d in self.shape)


def _np_dtype(elem_type: int, name: str) -> np.dtype:
    if elem_type == onnx.TensorProto.BFLOAT16:
        if BFLOAT16 is None:
            raise InputError(f"input {name!r} is bfloat16 but ml_dtypes is not installed")
        return BFLOAT16
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"input {name!r} has unsupported element type {elem_type}") from exc


def _dims(tensor_type: onnx.TypeProto.Tensor) -> tuple[Dim, ...] | None:
    if not tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Real graph inputs, in graph order; initializers listed as inputs are excluded."""
    init_names = {t.name for t in model.graph.initializer}
    init_names |= {t.values.name for t in model.graph.sparse_initializer}
    specs = []
    bounds: dict[str, int] | None = None
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        if vi.type.WhichOneof("value") != "tensor_type":
            raise InputError(f"input {vi.name!r} is not a tensor; only tensor inputs are supported")
        tt = vi.type.tensor_type
        dtype = _np_dtype(tt.elem_type, vi.name)
        bound = None
        if np.issubdtype(dtype, np.integer):
            bounds = index_bounds(model) if bounds is None else bounds
            bound = bounds.get(vi.name)
        specs.append(InputSpec(vi.name, dtype, _dims(tt), bound))
    return specs


# Ops that pass an index tensor on unchanged in value, and the ops that use one as an index:
# op -> (index input, data input, default axis).
_KEEPS_VALUES = frozenset({"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand"})
_INDEXES = {"Gather": (1, 0, 0), "GatherElements": (1, 0, 0)}


def index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For integer graph inputs that index a static axis (Gather, GatherElements, through
    value-preserving ops), the smallest such axis size: random values must stay below it."""
    g = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    dims: dict[str, list[int]] = {t.name: list(t.dims) for t in g.initializer}
    for vi in [*g.input, *g.value_info, *g.output]:
        shape = _dims(vi.type.tensor_type) if vi.type.HasField("tensor_type") else None
        if shape is not None and all(isinstance(d, int) for d in shape):
            dims.setdefault(vi.name, [int(d) for d in shape])  # type: ignore[arg-type]
    found: dict[str, int] = {}
    for vi in g.input:
        seen, todo = {vi.name}, [vi.name]
        while todo:
            name = todo.pop()
            for node in readers.get(name, []):
                if node.op_type in _KEEPS_VALUES and node.input and node.input[0] == name and node.output[0] not in seen:
                    seen.add(node.output[0])
                    todo.append(node.output[0])
                index = _INDEXES.get(node.op_type)
                if index is not None and len(node.input) > index[0] and node.input[index[0]] == name:
                    data = dims.get(node.input[index[1]])
                    axis = next((a.i for a in node.attribute if a.name == "axis"), index[2])
                    if data and -len(data) <= axis < len(data) and data[axis] > 0:
                        found[vi.name] = min(found.get(vi.name, data[axis]), data[axis])
    return found


_OVERRIDE_RE = re.compile(r"^(?P<name>.+):(?P<axis>-?\d+)=(?P<values>.+)$")


def parse_shape_overrides(items: Sequence[str]) -> dict[tuple[str, int], list[int]]:
    """Parse ``--shape`` items: ``NAME:AXIS=V[,V...]`` (the values of one dim, ``x:0=1,4``) or a
    whole shape ``NAME:D,D,...`` / ``NAME:DxDxD`` (``x:8,512,400``: each axis at that value;
    several whole shapes of one input give each axis its values in turn, one run each). The
    name may itself contain ':' (tf2onnx names inputs ``x:0``): the last ':' separates it."""
    full_re = re.compile(r"^(?P<name>.+):(?P<dims>\d+(?:,\d+)*|\d+(?:x\d+)+)$")
    out: dict[tuple[str, int], list[int]] = {}
    per_axis: set[tuple[str, int]] = set()
    for item in items:
        m = _OVERRIDE_RE.match(item.strip())
        whole = None if m is not None else full_re.match(item.strip())
        if m is None and whole is None:
            raise InputError(f"bad shape {item!r}: expected NAME:D,D,... (a whole shape, e.g. x:8,512,400) "
                             "or NAME:AXIS=V[,V...] (the values of one dim, e.g. x:0=1,4)")
        if whole is not None:
            dims = [int(d) for d in re.split(r"[,x]", whole["dims"])]
            if any(d < 1 for d in dims):
                raise InputError(f"bad shape {item!r}: dims must be >= 1")
            for axis, d in enumerate(dims):
                key = (whole["name"], axis)
                if key in per_axis:
                    raise InputError(f"shape override for {whole['name']}:{axis} given twice")
                out.setdefault(key, []).append(d)  # repeats kept: the k-th whole shape is run k on every axis
            continue
        assert m is not None
        try:
            values = [int(v) for v in m["values"].split(",")]
        except ValueError:
            raise InputError(f"bad shape override {item!r}: values must be integers") from None
        if any(v < 1 for v in values):
            raise InputError(f"bad shape override {item!r}: values must be >= 1")
        key = (m["name"], int(m["axis"]))
        if key in out:
            raise InputError(f"shape override for {m['name']}:{m['axis']} given twice")
        per_axis.add(key)
        out[key] = list(dict.fromkeys(values))  # drop repeats, keep order
    return out


Var = object
"""A dynamic-dim variable: its symbolic name, or (input, axis) for an anonymous dynamic dim."""


@dataclass(frozen=True)
class DimPlan:
    """The dynamic dims of a model's inputs as variables: ``layout`` per input holds an int per
    static dim and the variable of each dynamic one; ``values`` the values each variable takes
    (one per run, shorter lists cycle); ``given`` the variables the user set (``--shape``)."""

    layout: dict[str, list[object]]
    values: dict[Var, list[int]]
    given: frozenset[Var]

    @property
    def variables(self) -> list[Var]:
        return list(dict.fromkeys(e for entries in self.layout.values() for e in entries if not isinstance(e, int)))

    def shapes(self, assignment: Mapping[Var, int]) -> dict[str, tuple[int, ...]]:
        """Input shapes with each variable at ``assignment[var]``."""
        return {name: tuple(e if isinstance(e, int) else int(assignment[e]) for e in entries) for name, entries in self.layout.items()}

    def runs(self) -> list[dict[str, tuple[int, ...]]]:
        used = self.variables
        n_runs = max((len(self.values[v]) for v in used), default=1)
        return [self.shapes({v: self.values[v][i % len(self.values[v])] for v in used}) for i in range(n_runs)]


def dim_plan(
    specs: Sequence[InputSpec],
    overrides: Mapping[tuple[str, int], Sequence[int]] | None = None,
    defaults: Sequence[int] = (1, 3),
) -> DimPlan:
    """The :class:`DimPlan` of ``specs``: overridden variables take the user's values, the others
    ``defaults`` (see :func:`shape_sets`)."""
    var_values = _overridden_vars(specs, overrides or {})
    given = frozenset(var_values)
    layout = _layout(specs, var_values, defaults)
    return DimPlan(layout, var_values, given)


def shape_sets(
    specs: Sequence[InputSpec],
    overrides: Mapping[tuple[str, int], Sequence[int]] | None = None,
    defaults: Sequence[int] = (1, 3),
) -> list[dict[str, tuple[int, ...]]]:
    """Concrete input shapes, one dict per run.

    Every dynamic dim takes each of its values (overrides, else `defaults`, where the k-th
    distinct dynamic dim has k added to every default above the first) in some run; the
    number of runs is the longest value list and shorter lists cycle. Dims sharing a symbolic
    name are one variable: they always take the same value, and an override on any of them
    applies to all. Static dims are fixed (overriding one with another value is an error).
    """
    return dim_plan(specs, overrides, defaults).runs()


def _overridden_vars(specs: Sequence[InputSpec], overrides: Mapping[tuple[str, int], Sequence[int]]) -> dict[Var, list[int]]:
    """{variable: values} from ``--shape`` overrides, each checked against the input it names."""
    by_name = {s.name: s for s in specs}
    var_values: dict[Var, list[int]] = {}
    for (name, axis), values in overrides.items():
        var = _override_target(by_name, name, axis, values)
        if var is None:
            continue
        if var in var_values and var_values[var] != list(values):
            raise InputError(f"conflicting shape overrides for symbolic dim {var!r}")
        var_values[var] = list(values)
    return var_values


def _override_target(by_name: Mapping[str, InputSpec], name: str, axis: int, values: Sequence[int]) -> Var | None:
    """The variable an override of ``name:axis`` sets; None for a static dim given its own value."""
    spec = by_name.get(name)
    if spec is None:
        raise InputError(f"shape override names unknown input {name!r}; inputs: {sorted(by_name)}")
    if spec.shape is None:
        raise InputError(f"input {name!r} has no declared rank; use --inputs with an .npz file")
    rank = len(spec.shape)
    if not -rank <= axis < rank:
        raise InputError(f"shape override {name}:{axis}: input has rank {rank}")
    axis %= rank
    dim = spec.shape[axis]
    if isinstance(dim, int):
        if set(values) != {dim}:
            raise InputError(f"shape override {name}:{axis}: that dim is static ({dim})")
        return None
    return dim if isinstance(dim, str) else (name, axis)


def _layout(specs: Sequence[InputSpec], var_values: dict[Var, list[int]], defaults: Sequence[int]) -> dict[str, list[object]]:
    """Per input: an int for each static dim, the variable of each dynamic one. Variables without
    an override get the defaults (added to ``var_values``)."""
    layout: dict[str, list[object]] = {}
    # Distinct dynamic dims get distinct values above 1 (3, 4, 5, ...), so a rewrite that swaps
    # two dynamic axes cannot pass by both being equal.
    n_defaulted = 0
    for spec in specs:
        if spec.shape is None:
            raise InputError(f"input {spec.name!r} has no declared rank; use --inputs with an .npz file")
        entries: list[object] = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                entries.append(dim)
                continue
            var = dim if isinstance(dim, str) else (spec.name, axis)
            if var not in var_values:
                var_values[var] = [defaults[0]] + [d + n_defaulted for d in defaults[1:]]
                n_defaulted += 1
            entries.append(var)
        layout[spec.name] = entries
    return layout


@dataclass(frozen=True)
class Distribution:
    """How random inputs are drawn: floats from a normal (``floats`` = ("normal", mean, std)) or
    a uniform ("uniform", low, high: half-open at ``low``, so (0, 1] never gives 0); booleans
    "random", "true" or "false"; integers in [0, 8), below an index input's bound."""

    label: str
    floats: tuple[str, float, float] = ("normal", 0.0, 1.0)
    bools: str = "random"


NORMAL = Distribution("normal(0,1)")
#: What verification tries, in order, until every output and every site's boundary has finite
#: values: a log or sqrt front end needs positive inputs, an exp or a power small ones, a
#: threshold (``max(x) > 100``) large ones.
EVIDENCE_SEARCH = (
    NORMAL,
    Distribution("uniform(0,1]", ("uniform", 0.0, 1.0)),
    Distribution("normal(0,0.01)", ("normal", 0.0, 0.01)),
    Distribution("normal(0,1000)", ("normal", 0.0, 1000.0)),
)
#: Tried too when the model has boolean inputs (a branch taken only when a flag is set).
BOOL_VARIANTS = (Distribution("bools all true", bools="true"), Distribution("bools all false", bools="false"))


# Random values are drawn as 8-byte numbers (float64 normals/uniforms, int64 integers) and then
# cast: generating one input briefly holds both arrays.
_DRAW_ITEMSIZE = 8


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """Room left under a cgroup v2 memory limit (containers), if there is one."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            current = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" or not limit.isdigit() else max(0, int(limit) - current)


def _available_memory() -> int | None:
    """Bytes of memory available now: MemAvailable (/proc/meminfo), else psutil, else
    sysconf's free pages; capped by the cgroup's remaining room. None when unknown."""
    found = _meminfo_available()
    if found is None:
        try:
            import psutil

            found = int(psutil.virtual_memory().available)
        except Exception:  # not installed, or no answer on this platform
            found = None
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            found = None
    room = _cgroup_available()
    if room is not None:
        found = room if found is None else min(found, room)
    return found


def feed_memory_limit() -> int | None:
    """Most bytes ``make_feeds`` may allocate: half the memory available now (the models
    still need room to run on these inputs). None when the available memory is unknown."""
    available = _available_memory()
    return None if available is None else available // 2


def _format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _check_feed_memory(specs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse shapes whose random inputs would not fit in memory (before allocating any)."""
    limit = feed_memory_limit()
    if limit is None:
        return
    cap = f"the limit is {_format_bytes(limit)} (half the available memory): use smaller shapes"
    kept, draw = 0, 0
    for spec in specs:
        count = math.prod(shapes[spec.name])
        need = count * (spec.dtype.itemsize + _DRAW_ITEMSIZE)
        if need > limit:
            dims = ",".join(str(d) for d in shapes[spec.name])
            raise InputError(f"input '{spec.name}' at [{dims}] would need {_format_bytes(need)} for random {spec.dtype} values; {cap}")
        kept += count * spec.dtype.itemsize
        draw = max(draw, count * _DRAW_ITEMSIZE)
    if kept + draw > limit:
        listed = ", ".join(f"{name}=[{','.join(str(d) for d in dims)}]" for name, dims in shapes.items())
        raise InputError(f"inputs at {listed} would need {_format_bytes(kept + draw)} for random values together; {cap}")


def make_feeds(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]],
    *,
    seed: int = 0,
    input_range: tuple[float, float] | None = None,
    distribution: Distribution = NORMAL,
) -> dict[str, np.ndarray]:
    """Deterministic random inputs: floats N(0, 1) (or as ``distribution`` says, or uniform in
    `input_range`), integers in [0, 8) (below an index input's bound; or `input_range` rounded),
    bools fair coin flips (or as ``distribution`` says). Raises ``InputError`` before
    allocating anything when the arrays would not fit in half the available memory."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    concrete: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name not in shapes:
            raise InputError(f"no shape given for input {spec.name!r}")
        concrete[spec.name] = tuple(int(d) for d in shapes[spec.name])
        if any(d < 0 for d in concrete[spec.name]):
            raise InputError(f"input {spec.name!r}: negative dim in shape {list(concrete[spec.name])}")
    _check_feed_memory(specs, concrete)
    for spec in specs:
        feeds[spec.name] = _draw(rng, spec, concrete[spec.name], input_range, distribution)
    return feeds


def _draw(rng: np.random.Generator, spec: InputSpec, shape: tuple[int, ...], input_range: tuple[float, float] | None,
          distribution: Distribution) -> np.ndarray:
    """One input's random values (see :func:`make_feeds`)."""
    dt = spec.dtype
    if dt == np.bool_:
        if distribution.bools == "random":
            return rng.integers(0, 2, size=shape).astype(np.bool_)
        return np.full(shape, distribution.bools == "true", dtype=np.bool_)
    if np.issubdtype(dt, np.integer):
        lo, hi = _INT_RANGE
        if spec.bound is not None:
            hi = max(1, min(hi, spec.bound))
        if input_range is not None:
            lo, hi = int(np.ceil(input_range[0])), int(np.floor(input_range[1])) + 1
            if hi <= lo:
                raise InputError(f"input range {input_range} holds no integer for input {spec.name!r}")
        info = np.iinfo(dt)
        lo, hi = max(lo, int(info.min)), min(hi, int(info.max) + 1)
        return rng.integers(lo, hi, size=shape, dtype=np.int64).astype(dt)
    if np.issubdtype(dt, np.floating) or dt == BFLOAT16:
        kind, a, b = ("uniform", *input_range) if input_range is not None else distribution.floats
        if kind == "normal":
            data = rng.standard_normal(size=shape) * b + a
        elif input_range is not None:
            data = rng.uniform(a, b, size=shape)
        else:
            data = b - rng.uniform(0.0, b - a, size=shape)  # (a, b]: never a itself
        return data.astype(dt)
    raise InputError(f"cannot generate inputs of type {dt} for {spec.name!r}; pass them with --inputs data.npz")


def load_npz_feeds(path: str | Path) -> dict[str, np.ndarray]:
    """Read named input arrays from an .npz file (no pickles)."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"cannot read inputs from {path}: {exc}") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: not an .npz archive (save inputs with numpy.savez)")
    try:
        with data:
            feeds = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"cannot read inputs from {path}: {exc}") from exc
    if not feeds:
        raise InputError(f"{path}: archive holds no arrays")
    return feeds
