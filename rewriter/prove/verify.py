"""Prove a rewritten model equals its original on onnxruntime.

`verify_models` runs both models on each execution provider with the same inputs, at several
values of every dynamic dimension, and compares every output within a per-dtype tolerance.
`bisect_offenders` finds the applied rewrites to roll back when verification fails.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnxruntime as ort

from rewriter.prove.compare import (
    DEFAULT_TOLERANCES,
    OutputDiff,
    Tolerance,
    compare_arrays,
    json_num as _num,
    merge as _merge,
    noise as _noise,
    tolerance_for as _tolerance,
)
from rewriter.errors import InputError, VerificationError
from rewriter.prove.inputs import BFLOAT16, InputSpec, input_specs, load_npz_feeds, make_feeds, shape_sets

__all__ = [
    "Tolerance",
    "DEFAULT_TOLERANCES",
    "OutputDiff",
    "ProviderResult",
    "VerificationResult",
    "VerifyOptions",
    "cuda_status",
    "resolve_providers",
    "compare_arrays",
    "verify_models",
    "bisect_offenders",
    "render_verification",
]

T = TypeVar("T")
ModelLike = onnx.ModelProto | str | Path
_CUDA, _CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
_EXTERNAL_DIR_KEY = "session.model_external_initializers_file_folder_path"
@dataclass(frozen=True)
class ProviderResult:
    provider: str
    status: str  # "passed" | "failed" | "skipped"
    reason: str
    shapes: list[dict[str, list[int]]] = field(default_factory=list)
    max_abs: float | None = None
    max_rel: float | None = None
    tolerance: Tolerance | None = None
    noise_max_abs: float | None = None
    outputs: list[OutputDiff] = field(default_factory=list)
    rejected_shapes: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "status": self.status,
            "reason": self.reason,
            "shapes": self.shapes,
            "max_abs": _num(self.max_abs),
            "max_rel": _num(self.max_rel),
            "tolerance": self.tolerance.to_json() if self.tolerance else None,
            "noise_max_abs": _num(self.noise_max_abs),
            "outputs": [o.to_json() for o in self.outputs],
            "rejected_shapes": self.rejected_shapes,
        }


@dataclass(frozen=True)
class VerificationResult:
    """Passed iff no provider failed and at least one provider passed."""

    passed: bool
    providers: dict[str, ProviderResult]

    def __bool__(self) -> bool:
        return self.passed

    @property
    def nothing_ran(self) -> str | None:
        """When no provider could run at all: why (per provider); else None."""
        if self.providers and all(p.status == "skipped" for p in self.providers.values()):
            return "; ".join(f"{name}: {p.reason}" for name, p in self.providers.items())
        return None

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "providers": {k: v.to_json() for k, v in self.providers.items()}}

    def to_markdown(self) -> str:
        lines = [
            f"**{'equivalent' if self.passed else 'not verified'}**",
            "",
            "| provider | status | shapes | max abs | max rel | tolerance | reason |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.providers.values():
            tol = f"atol={r.tolerance.atol:g} rtol={r.tolerance.rtol:g}" if r.tolerance else "-"
            shapes = "; ".join(_fmt_shapes(x) for x in r.shapes) or "-"
            reason = r.reason.replace("|", "\\|")
            lines.append(f"| {r.provider} | {r.status} | {shapes} | {_fmt_num(r.max_abs)} | {_fmt_num(r.max_rel)} | {tol} | {reason} |")
        return "\n".join(lines)


@dataclass(frozen=True)
class VerifyOptions:
    providers: tuple[str, ...] | None = None  # None: cpu, and cuda (skipped when unavailable)
    seed: int = 0
    input_range: tuple[float, float] | None = None
    inputs_npz: Path | None = None
    shape_overrides: dict[tuple[str, int], list[int]] | None = None
    atol: float | None = None  # override the per-dtype defaults for every output
    rtol: float | None = None


# --------------------------------------------------------------------------- ORT plumbing

def _ort_error_types() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = [v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)]
    return (RuntimeError, *found)


_ORT_ERRORS = _ort_error_types()
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


_ORT_NODE = re.compile(r"^Non-zero status code returned while running (\S+) node\. Name:'([^']*)' Status Message: ")
_ORT_SOURCE = re.compile(r"^/\S+:\d+ .*? was false\.\s*")


def _first_line(exc: BaseException | str, limit: int = 300) -> str:
    """One readable line from an ORT error: no code prefix, no C++ source location."""
    text = _ANSI.sub("", str(exc))
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    line = _ORT_PREFIX.sub("", line)
    node = _ORT_NODE.match(line)
    if node:
        line = f"{node.group(1)} node {node.group(2)!r}: " + _ORT_SOURCE.sub("", line[node.end():])
    return line if len(line) <= limit else line[: limit - 1] + "…"


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Capture fd 2 (ORT's C++ logger writes there, bypassing sys.stderr); yields a list that
    holds the captured text after the block."""
    out: list[str] = []
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2: nothing to silence
        yield out
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", "replace"))


def _tiny_model() -> bytes:
    h, tp = onnx.helper, onnx.TensorProto
    graph = h.make_graph(
        [h.make_node("Add", ["x", "x"], ["y"])],
        "cuda_probe",
        [h.make_tensor_value_info("x", tp.FLOAT, [2])],
        [h.make_tensor_value_info("y", tp.FLOAT, [2])],
    )
    return h.make_model(graph, ir_version=8, opset_imports=[h.make_opsetid("", 13)]).SerializeToString()


@functools.lru_cache(maxsize=1)
def cuda_status() -> tuple[bool, str]:
    """(True, "") when a session really runs on CUDA, else (False, "CUDA unavailable: <why>").

    `get_available_providers()` lists CUDA whenever the GPU package is installed, even when
    libcudart/cuDNN are missing, so the probe builds a session and asks what it got."""
    if _CUDA not in ort.get_available_providers():
        return False, "CUDA unavailable: this onnxruntime build has no CUDAExecutionProvider"
    so = ort.SessionOptions()
    so.log_severity_level = 4
    with _captured_stderr() as captured:
        try:
            sess = ort.InferenceSession(_tiny_model(), so, providers=[_CUDA, _CPU])
            ok = _CUDA in sess.get_providers()
            if ok:
                sess.run(None, {"x": np.ones(2, np.float32)})
        except _ORT_ERRORS as exc:
            return False, f"CUDA unavailable: {_first_line(exc)}"
    if ok:
        return True, ""
    log = _ANSI.sub("", "".join(captured))
    m = re.search(r"with error: ([^\n]+)", log)
    reason = m.group(1).strip() if m else "the session fell back to CPUExecutionProvider"
    need = re.search(r"Require (cuDNN [\d.*]+ and CUDA [\d.*]+)", log)
    if need:
        reason += f" (needs {need.group(1).rstrip('.')})"
    return False, f"CUDA unavailable: {reason}"


_PROVIDER_ALIASES = {"cpu": "cpu", "cpuexecutionprovider": "cpu", "cuda": "cuda", "cudaexecutionprovider": "cuda"}


def resolve_providers(requested: Sequence[str] | None) -> list[tuple[str, bool, str]]:
    """(name, available, reason) per provider. None means cpu and cuda; cuda is then listed
    even when unavailable so results say why it was skipped."""
    names: list[str] = []
    for raw in requested if requested is not None else ("cpu", "cuda"):
        name = _PROVIDER_ALIASES.get(raw.strip().lower())
        if name is None:
            raise InputError(f"unknown provider {raw!r}; known: cpu, cuda")
        if name not in names:
            names.append(name)
    if not names:
        raise InputError("no provider requested")
    return [(n, True, "") if n == "cpu" else (n, *cuda_status()) for n in names]


@dataclass
class _Prepared:
    """A model as ORT will load it, plus the graph (without external data) for interface checks."""

    label: str
    proto: onnx.ModelProto
    payload: bytes | str
    external_dir: Path | None
    outputs: list[str]  # graph output names
    fetch: list[str]  # names to ask ORT for (bfloat16 outputs read through an added Cast)
    out_dtypes: dict[str, np.dtype | None]


def _prepare(model: ModelLike, base_dir: Path | None, label: str) -> _Prepared:
    path: Path | None = None
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        path = Path(model)
        if not path.is_file():
            raise InputError(f"{label} model not found: {path}")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises several unrelated types on a corrupt file
            raise InputError(f"cannot read {label} model {path}: {_first_line(exc)}") from exc
    outputs = [o.name for o in proto.graph.output]
    out_dtypes: dict[str, np.dtype | None] = {}
    bf16: list[str] = []
    for o in proto.graph.output:
        et = o.type.tensor_type.elem_type if o.type.HasField("tensor_type") else 0
        if et == onnx.TensorProto.BFLOAT16:
            bf16.append(o.name)
            out_dtypes[o.name] = BFLOAT16
        else:
            out_dtypes[o.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(et)) if et else None
    fetch = list(outputs)
    if bf16:
        # numpy cannot receive bfloat16 from ORT; add an exact Cast to float32 output per such output.
        proto = _with_float_casts(proto, bf16)
        fetch = [f"{n}::as_float32" if n in bf16 else n for n in outputs]

    uses_external = any(
        onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer
    )
    if path is not None and not bf16:
        return _Prepared(label, proto, str(path), None, outputs, fetch, out_dtypes)
    external_dir = path.parent if path is not None else base_dir
    if uses_external and external_dir is None:
        raise InputError(f"{label} model has external data that is not loaded; pass base_dir (its folder)")
    try:
        payload = proto.SerializeToString()
    except ValueError as exc:
        raise InputError(f"{label} model is too large to pass in memory; pass its path instead") from exc
    return _Prepared(label, proto, payload, external_dir if uses_external else None, outputs, fetch, out_dtypes)


def _with_float_casts(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for n in names:
        copy.graph.node.append(onnx.helper.make_node("Cast", [n], [f"{n}::as_float32"], to=onnx.TensorProto.FLOAT))
        copy.graph.output.append(onnx.helper.make_tensor_value_info(f"{n}::as_float32", onnx.TensorProto.FLOAT, None))
    return copy


def make_session(model: _Prepared, provider: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    if model.external_dir is not None:
        so.add_session_config_entry(_EXTERNAL_DIR_KEY, str(model.external_dir))
    providers = [_CUDA, _CPU] if provider == "cuda" else [_CPU]
    sess = ort.InferenceSession(model.payload, so, providers=providers)
    if provider == "cuda" and _CUDA not in sess.get_providers():
        raise RuntimeError("the session fell back to CPUExecutionProvider")
    return sess


def _to_ort(arr: np.ndarray) -> Any:
    if BFLOAT16 is not None and arr.dtype == BFLOAT16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            np.ascontiguousarray(arr).view(np.uint16), onnx.TensorProto.BFLOAT16
        )
    return arr


_RUN_OPTIONS = ort.RunOptions()
# A shape the model rejects raises with the same text that ORT would also log; log nothing.
_RUN_OPTIONS.log_severity_level = 4


def _run(sess: ort.InferenceSession, model: _Prepared, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    outs = sess.run(model.fetch, {k: _to_ort(v) for k, v in feeds.items()}, _RUN_OPTIONS)
    return dict(zip(model.outputs, outs))


def _fmt_shapes(shapes: Mapping[str, Sequence[int]]) -> str:
    return ", ".join(f"{k}=[{','.join(str(d) for d in v)}]" for k, v in shapes.items())


def _mismatch_reason(d: OutputDiff, ref_shape: tuple[int, ...], got_shape: tuple[int, ...], shapes: str) -> str:
    if ref_shape != got_shape:
        return f"output {d.name!r} has shape {list(got_shape)}, original {list(ref_shape)} (inputs {shapes})"
    return (
        f"output {d.name!r} differs (inputs {shapes}): max abs {d.max_abs:.3g}, "
        f"{d.mismatch_fraction:.2%} of elements outside atol={d.tolerance.atol:g} rtol={d.tolerance.rtol:g}"
    )


# --------------------------------------------------------------------------- verify

def _check_interface(orig: onnx.ModelProto, rew: onnx.ModelProto) -> list[InputSpec]:
    a, b = input_specs(orig), input_specs(rew)
    amap, bmap = {s.name: s for s in a}, {s.name: s for s in b}
    if set(amap) != set(bmap):
        raise InputError(f"inputs differ: original {sorted(amap)}, rewritten {sorted(bmap)}")
    for name, sa in amap.items():
        sb = bmap[name]
        if sa.dtype != sb.dtype:
            raise InputError(f"input {name!r} is {sa.dtype} in the original, {sb.dtype} in the rewritten model")
        if sa.shape is not None and sb.shape is not None and len(sa.shape) != len(sb.shape):
            raise InputError(f"input {name!r} has rank {len(sa.shape)} in the original, {len(sb.shape)} rewritten")
    oa, ob = [o.name for o in orig.graph.output], [o.name for o in rew.graph.output]
    if oa != ob:
        raise InputError(f"outputs differ: original {oa}, rewritten {ob}")
    for x, y in zip(orig.graph.output, rew.graph.output):
        ex, ey = x.type.tensor_type.elem_type, y.type.tensor_type.elem_type
        if ex and ey and ex != ey:
            raise InputError(
                f"output {x.name!r} is {onnx.TensorProto.DataType.Name(ex)} in the original, "
                f"{onnx.TensorProto.DataType.Name(ey)} rewritten"
            )
    return a


def _check_feeds(specs: Sequence[InputSpec], feeds: Mapping[str, np.ndarray]) -> None:
    names = {s.name for s in specs}
    if missing := names - set(feeds):
        raise InputError(f"inputs file lacks {sorted(missing)}")
    if extra := set(feeds) - names:
        raise InputError(f"inputs file has arrays that are not model inputs: {sorted(extra)}")
    for s in specs:
        arr = feeds[s.name]
        if arr.dtype != s.dtype:
            raise InputError(f"input {s.name!r}: file has {arr.dtype}, model expects {s.dtype}")
        if s.shape is not None:
            bad = len(s.shape) != arr.ndim or any(isinstance(d, int) and d != n for d, n in zip(s.shape, arr.shape))
            if bad:
                raise InputError(f"input {s.name!r}: file has shape {list(arr.shape)}, model expects {list(s.shape)}")


class _Lazy:
    """Creates ORT sessions on first use, remembering failures as text."""

    def __init__(self, model: _Prepared, provider: str) -> None:
        self.model, self.provider = model, provider
        self._sess: ort.InferenceSession | None = None
        self.error: str | None = None

    def get(self) -> ort.InferenceSession | None:
        if self._sess is None and self.error is None:
            try:
                self._sess = make_session(self.model, self.provider)
            except _ORT_ERRORS as exc:
                self.error = _first_line(exc)
        return self._sess


def verify_models(
    original: ModelLike,
    rewritten: ModelLike,
    options: VerifyOptions = VerifyOptions(),
    *,
    base_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> VerificationResult:
    """Run both models on each provider with the same inputs and compare every output.

    Raises InputError for unreadable models, a different interface, bad options, or an
    original that onnxruntime cannot load on CPU."""
    orig = _prepare(original, base_dir, "original")
    rew = _prepare(rewritten, base_dir, "rewritten")
    specs = _check_interface(orig.proto, rew.proto)
    providers = resolve_providers(options.providers)

    feed_sets: list[dict[str, np.ndarray]]
    if options.inputs_npz is not None:
        feeds = load_npz_feeds(options.inputs_npz)
        _check_feeds(specs, feeds)
        feed_sets = [feeds]
    else:
        feed_sets = [
            make_feeds(specs, s, seed=options.seed, input_range=options.input_range)
            for s in shape_sets(specs, options.shape_overrides)
        ]

    cpu_orig = _Lazy(orig, "cpu")
    if cpu_orig.get() is None:
        raise InputError(f"the original model does not load on onnxruntime: {cpu_orig.error}")
    reference: dict[int, dict[str, np.ndarray] | str] = {}  # original on CPU, per run; str = error

    def ref_outputs(i: int) -> dict[str, np.ndarray] | str:
        if i not in reference:
            try:
                reference[i] = _run(cpu_orig.get(), orig, feed_sets[i])  # type: ignore[arg-type]
            except _ORT_ERRORS as exc:
                reference[i] = _first_line(exc)
        return reference[i]

    results: dict[str, ProviderResult] = {}
    for name, available, why in providers:
        if not available:
            results[name] = ProviderResult(name, "skipped", why)
            continue
        results[name] = _verify_provider(name, orig, rew, cpu_orig, feed_sets, ref_outputs, options, progress)
    statuses = [r.status for r in results.values()]
    passed = "failed" not in statuses and "passed" in statuses
    return VerificationResult(passed, results)


def _verify_provider(
    provider: str,
    orig: _Prepared,
    rew: _Prepared,
    cpu_orig: _Lazy,
    feed_sets: list[dict[str, np.ndarray]],
    ref_outputs: Callable[[int], dict[str, np.ndarray] | str],
    options: VerifyOptions,
    progress: Callable[[str], None] | None,
) -> ProviderResult:
    dev_orig = cpu_orig if provider == "cpu" else _Lazy(orig, provider)
    dev_rew = _Lazy(rew, provider)
    if dev_orig.get() is None:
        return ProviderResult(provider, "skipped", f"the original model does not load on {provider}: {dev_orig.error}")
    if dev_rew.get() is None:
        return ProviderResult(provider, "failed", f"the rewritten model does not load on {provider}: {dev_rew.error}")

    ran: list[dict[str, list[int]]] = []
    rejected: list[dict[str, Any]] = []
    failures: list[str] = []
    diffs: dict[str, OutputDiff] = {}
    noise_max: float | None = 0.0 if provider == "cuda" else None
    for i, feeds in enumerate(feed_sets):
        shapes = {k: [int(d) for d in v.shape] for k, v in feeds.items()}
        text = _fmt_shapes(shapes)
        if progress is not None:
            progress(f"{provider} {i + 1}/{len(feed_sets)}: {text}")
        ref = ref_outputs(i)
        if isinstance(ref, str):
            rejected.append({"shapes": shapes, "error": ref})
            continue
        noise: dict[str, float] = {}
        if provider == "cuda":
            # ORT's CUDA kernels (TF32, cuDNN algorithm choice) differ from CPU on their own.
            # Measure that noise on the original, and let the rewritten model on CUDA deviate
            # from the original on CPU by atol + max(rtol*|ref|, 2*noise): twice the noise
            # because its kernels differ from the original's CUDA kernels too.
            try:
                base = _run(dev_orig.get(), orig, feeds)  # type: ignore[arg-type]
            except _ORT_ERRORS as exc:
                rejected.append({"shapes": shapes, "error": f"on {provider}: {_first_line(exc)}"})
                continue
            noise = {n: _noise(ref[n], base[n]) for n in orig.outputs}
            noise_max = max([noise_max or 0.0, *noise.values()])
        try:
            got = _run(dev_rew.get(), rew, feeds)  # type: ignore[arg-type]
        except _ORT_ERRORS as exc:
            failures.append(f"the rewritten model rejects inputs {text} that the original accepts: {_first_line(exc)}")
            continue
        ran.append(shapes)
        for out in orig.outputs:
            dtype = orig.out_dtypes.get(out) or ref[out].dtype
            tol = _tolerance(dtype, options.atol, options.rtol)
            d = compare_arrays(out, ref[out], got[out], tol, noise.get(out, 0.0))
            diffs[out] = _merge(diffs.get(out), d)
            if not d.passed:
                failures.append(_mismatch_reason(d, ref[out].shape, got[out].shape, text))

    outputs = [diffs[n] for n in orig.outputs if n in diffs]
    worst = max(outputs, key=lambda d: (d.mismatch_fraction, d.max_abs), default=None)
    metrics: dict[str, Any] = {
        "shapes": ran,
        "max_abs": max((d.max_abs for d in outputs), default=None),
        "max_rel": max((d.max_rel for d in outputs), default=None),
        "tolerance": worst.tolerance if worst else None,
        "noise_max_abs": noise_max,
        "outputs": outputs,
        "rejected_shapes": rejected,
    }
    if failures:
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        return ProviderResult(provider, "failed", failures[0] + more, **metrics)
    if not ran:
        first = rejected[0]["error"] if rejected else "no inputs"
        return ProviderResult(provider, "skipped", f"no input shape ran on the original: {first}", **metrics)
    return ProviderResult(provider, "passed", "", **metrics)


# --------------------------------------------------------------------------- rollback

def bisect_offenders(sites: Sequence[T], passes_without: Callable[[frozenset[T]], bool]) -> list[T]:
    """A minimal set of sites whose exclusion makes the model verify, in `sites` order.

    Assumes a site's failure does not depend on the others. Each offender costs one binary
    search over the remaining candidates (O(k log n) calls for k offenders among n). The set
    returned is always one for which `passes_without` answered True."""
    items = list(dict.fromkeys(sites))
    if not passes_without(frozenset(items)):
        raise VerificationError("no equivalent model: the failure remains with every rewrite undone")
    found: list[T] = []
    candidates = items
    # Invariant: passes_without(found + candidates) is True.
    while candidates and not passes_without(frozenset(found)):
        lo, hi = 0, len(candidates)  # fails with candidates[:lo], passes with candidates[:hi]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if passes_without(frozenset(found + candidates[:mid])):
                hi = mid
            else:
                lo = mid
        found.append(candidates[hi - 1])
        candidates = candidates[: hi - 1]
    order = {s: i for i, s in enumerate(items)}
    return sorted(found, key=order.__getitem__)


# --------------------------------------------------------------------------- rendering

def _fmt_num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def render_verification(result: VerificationResult, console: Any) -> None:
    """Print one row per provider and an overall verdict on a rich Console."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="verification", title_justify="left", show_edge=False)
    for col in ("provider", "status", "shapes", "max abs", "max rel", "tolerance"):
        table.add_column(col, overflow="fold")
    style = {"passed": "green", "failed": "bold red", "skipped": "yellow"}
    reasons: list[str] = []
    for r in result.providers.values():
        shapes = " ".join(_fmt_shapes(s) for s in r.shapes) or "-"
        tol = f"atol={r.tolerance.atol:g} rtol={r.tolerance.rtol:g}" if r.tolerance else "-"
        reason = r.reason
        if r.rejected_shapes:
            reason = (reason + "; " if reason else "") + f"{len(r.rejected_shapes)} shape(s) rejected by the original"
        if r.noise_max_abs:
            reason = (reason + "; " if reason else "") + f"CUDA noise {r.noise_max_abs:.3g}"
        if reason:
            reasons.append(f"{r.provider}: {reason}")
        # Text cells: shapes contain brackets that rich would read as markup.
        table.add_row(
            Text(r.provider), Text(r.status, style=style.get(r.status, "")), Text(shapes),
            _fmt_num(r.max_abs), _fmt_num(r.max_rel), tol,
        )
    console.print(table)
    for line in reasons:  # long ORT/CUDA reasons read better as lines than as a folded column
        console.print(Text(f"  {line}"))
    console.print("[green]equivalent[/]" if result.passed else "[bold red]not verified[/]")
