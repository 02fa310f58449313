"""The tuning decision cache: one JSON file, so repeated runs in export pipelines do not re-measure.

Location: ``--cache PATH``, else ``$XDG_CACHE_HOME/onnx-rewrite/tuning.json`` (``~/.cache/...``
without XDG_CACHE_HOME). Layout: ``{"format": 1, "entries": {key: decision}}``. The key is the
sha256 of a canonical JSON of the isolated site (op types, attributes, edges, constant shapes and
dtypes, small integer constants, boundary input shapes and dtypes, opsets), its forms, the
provider, the thread count, and the onnxruntime and onnx-rewrite versions: tensor and node names
do not count, so the same layer in another export hits. A file that cannot be read is ignored
with a note and replaced by the next write. A write reads the file again, merges this run's
decisions into it and replaces it atomically, all under an exclusive lock on ``<cache>.lock``
(``fcntl.flock``; no lock where unavailable), so concurrent runs (``onnx-rewrite`` batch workers,
parallel CI jobs) never lose each other's entries.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from rewriter.version import __version__
from rewriter.engine.filelock import exclusive_lock
from rewriter.engine.save import atomic_write_text
from rewriter.ort import RUNTIME_VERSION

__all__ = ["CACHE_FORMAT", "DecisionCache", "cache_key", "default_cache_path", "site_signature"]

CACHE_FORMAT = 1


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/onnx-rewrite/tuning.json`` (``~/.cache/onnx-rewrite/tuning.json`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "onnx-rewrite" / "tuning.json"


def _attr_json(a: onnx.AttributeProto) -> Any:
    v = onnx.helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, onnx.TensorProto):
        return {"dims": list(v.dims), "type": v.data_type}
    if isinstance(v, (onnx.GraphProto, onnx.TypeProto)) or (isinstance(v, list) and v and not isinstance(v[0], (int, float, bytes))):
        return type(v).__name__
    return [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v] if isinstance(v, list) else v


def site_signature(sub: onnx.ModelProto) -> list[Any]:
    """A name-free description of an isolated site: nodes, edges, constant shapes, input shapes."""
    g = sub.graph
    refs: dict[str, Any] = {}
    inputs = []
    for i, vi in enumerate(g.input):
        refs[vi.name] = ["in", i]
        tt = vi.type.tensor_type
        inputs.append([tt.elem_type, [d.dim_value for d in tt.shape.dim]])
    for t in g.initializer:
        small = t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and int(np.prod(t.dims)) <= 16
        refs[t.name] = ["const", list(t.dims), t.data_type, numpy_helper.to_array(t).tolist() if small else None]
    nodes = []
    for k, n in enumerate(g.node):
        ins = [refs.get(x, ["?"]) if x else None for x in n.input]
        nodes.append([n.domain, n.op_type, ins, sorted([a.name, _attr_json(a)] for a in n.attribute)])
        for j, o in enumerate(n.output):
            refs[o] = ["node", k, j]
    return [inputs, nodes, [refs.get(o.name) for o in g.output], [[o.domain, o.version] for o in sub.opset_import]]


def cache_key(sub: onnx.ModelProto, forms: Iterable[str], provider: str, threads: int | None) -> str:
    doc = {"site": site_signature(sub), "forms": sorted(forms), "provider": provider, "threads": threads,
           "onnxruntime": RUNTIME_VERSION, "onnx_rewrite": __version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class DecisionCache:
    """The JSON decision cache: ``{"format": 1, "entries": {key: decision}}``. A file that cannot
    be read or parsed is ignored (with a note) and replaced on save."""

    def __init__(self, path: Path | None, enabled: bool, *, read_only: bool = False) -> None:
        self.path = path
        self.enabled = enabled and path is not None
        self.read_only = read_only  # --dry-run: use what is cached, write nothing
        self.notes: list[str] = []
        self.hits = self.misses = self.repeats = 0
        self._new: dict[str, dict[str, Any]] = {}
        # Decisions of this run, kept whether or not the file cache is on: structurally identical
        # sites (same key) are measured once per run (``repeats`` counts the others).
        self._run: dict[str, dict[str, Any]] = {}
        self._entries = self._read() if self.enabled else {}

    def _read(self) -> dict[str, Any]:
        assert self.path is not None
        try:
            if not self.path.exists():
                return {}
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError("not a tuning cache of this version")
            return dict(data["entries"])
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            self.notes.append(f"tuning cache {self.path} ignored ({type(exc).__name__}: {str(exc)[:120]}); it will be rewritten")
            return {}

    def get(self, key: str, forms: Iterable[str]) -> dict[str, Any] | None:
        if key in self._run:
            self.repeats += 1
            return self._run[key]
        entry = self._entries.get(key) if self.enabled else None
        valid = (
            isinstance(entry, dict)
            and entry.get("choice") in set(forms)
            and isinstance(entry.get("reason"), str)
            and isinstance(entry.get("forms"), dict)
            and all(
                isinstance(v, dict) and all(isinstance(v.get(k), (int, float)) for k in ("median_ms", "p90_ms"))
                for v in entry["forms"].values()
            )
        )
        if valid:
            self.hits += 1
            self._run[key] = entry  # type: ignore[assignment]
            return entry  # type: ignore[return-value]
        self.misses += 1
        return None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self._run[key] = entry
        if self.enabled:
            self._new[key] = entry

    def save(self) -> None:
        if not self.enabled or self.read_only or not self._new:
            return
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with exclusive_lock(self.lock_path):
                merged = {**self._read_quietly(), **self._new}  # keep what a concurrent run added meanwhile
                atomic_write_text(self.path, json.dumps({"format": CACHE_FORMAT, "entries": merged}, indent=1, sort_keys=True) + "\n")
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written only costs time
            self.notes.append(f"tuning cache {self.path} not written: {exc}")

    @property
    def lock_path(self) -> Path:
        """The lock file beside the cache: the cache file itself is replaced by each write, so it cannot carry the lock."""
        assert self.path is not None
        return self.path.with_name(self.path.name + ".lock")

    def _read_quietly(self) -> dict[str, Any]:
        saved = list(self.notes)
        entries = self._read()
        self.notes = saved
        return entries
