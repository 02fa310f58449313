"""Input description and generation: specs, shape overrides, shape sets, feeds, .npz files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from rewriter.errors import InputError
from rewriter.prove.inputs import (
    BFLOAT16,
    InputSpec,
    input_specs,
    load_npz_feeds,
    make_feeds,
    parse_shape_overrides,
    shape_sets,
)

F32 = np.dtype(np.float32)


def _model_with_inputs() -> onnx.ModelProto:
    w = nh.from_array(np.ones((4, 3), np.float32), "w")
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "w"], ["y"]), h.make_node("Identity", ["ids"], ["z"])],
        "g",
        [
            h.make_tensor_value_info("x", TP.FLOAT, ["batch", None, 4]),
            h.make_tensor_value_info("ids", TP.INT64, ["batch"]),
            h.make_tensor_value_info("w", TP.FLOAT, [4, 3]),  # an initializer listed as input
        ],
        [h.make_tensor_value_info("y", TP.FLOAT, None), h.make_tensor_value_info("z", TP.INT64, None)],
        [w],
    )
    return h.make_model(graph, ir_version=10, opset_imports=[h.make_opsetid("", 17)])


def test_input_specs_excludes_initializers_and_reads_dims() -> None:
    specs = input_specs(_model_with_inputs())
    assert [s.name for s in specs] == ["x", "ids"]
    assert specs[0] == InputSpec("x", F32, ("batch", None, 4))
    assert specs[1].dtype == np.int64 and specs[1].shape == ("batch",)


def test_parse_shape_overrides() -> None:
    assert parse_shape_overrides(["x:0=1,4", "input:0:-1=2,2,8"]) == {("x", 0): [1, 4], ("input:0", -1): [2, 8]}


@pytest.mark.parametrize("item", ["x=1,4", "x:a=1", "x:0=", "x:0=1,b", "x:0=0", ":0=1"])
def test_parse_shape_overrides_rejects_bad_syntax(item: str) -> None:
    with pytest.raises(InputError):
        parse_shape_overrides([item])


def test_parse_shape_overrides_rejects_duplicates() -> None:
    with pytest.raises(InputError, match="twice"):
        parse_shape_overrides(["x:0=1", "x:0=2"])


def test_dynamic_dims_get_one_and_a_larger_value_shared_symbols_agree() -> None:
    runs = shape_sets(input_specs(_model_with_inputs()))
    assert len(runs) >= 2
    batch = {r["x"][0] for r in runs}
    anon = {r["x"][1] for r in runs}
    for values in (batch, anon):
        assert 1 in values and max(values) > 1
    for r in runs:
        assert r["x"][0] == r["ids"][0]  # both are "batch"
        assert r["x"][2] == 4  # static


def test_override_on_one_occurrence_applies_to_the_symbol() -> None:
    runs = shape_sets(input_specs(_model_with_inputs()), {("ids", 0): [2, 5, 7]})
    assert [r["x"][0] for r in runs] == [2, 5, 7]
    assert [r["ids"][0] for r in runs] == [2, 5, 7]
    assert [r["x"][1] for r in runs] == [1, 3, 1]  # shorter default list cycles


def test_static_model_has_one_run() -> None:
    assert shape_sets([InputSpec("x", F32, (2, 3))]) == [{"x": (2, 3)}]


@pytest.mark.parametrize(
    ("override", "message"),
    [({("nope", 0): [1]}, "unknown input"), ({("x", 2): [5]}, "static"), ({("x", 3): [1]}, "rank")],
)
def test_bad_overrides(override: dict[tuple[str, int], list[int]], message: str) -> None:
    with pytest.raises(InputError, match=message):
        shape_sets(input_specs(_model_with_inputs()), override)


def test_unknown_rank_needs_npz() -> None:
    with pytest.raises(InputError, match="npz"):
        shape_sets([InputSpec("x", F32, None)])


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.one_of(st.integers(1, 4), st.sampled_from(["a", "b"]), st.none()), max_size=4),
        min_size=1,
        max_size=3,
    )
)
def test_shape_sets_property(shapes: list[list[int | str | None]]) -> None:
    specs = [InputSpec(f"i{k}", F32, tuple(s)) for k, s in enumerate(shapes)]
    runs = shape_sets(specs)
    for spec in specs:
        for axis, dim in enumerate(spec.shape or ()):
            values = {r[spec.name][axis] for r in runs}
            if isinstance(dim, int):
                assert values == {dim}
            else:
                assert 1 in values and max(values) > 1
    for r in runs:
        seen: dict[str, int] = {}
        for spec in specs:
            for axis, dim in enumerate(spec.shape or ()):
                if isinstance(dim, str):
                    assert seen.setdefault(dim, r[spec.name][axis]) == r[spec.name][axis]


def test_make_feeds_dtypes_ranges_and_determinism() -> None:
    specs = [
        InputSpec("f", F32, (64,)),
        InputSpec("h", np.dtype(np.float16), (8,)),
        InputSpec("d", np.dtype(np.float64), (8,)),
        InputSpec("i", np.dtype(np.int64), (200,)),
        InputSpec("u", np.dtype(np.uint8), (50,)),
        InputSpec("b", np.dtype(np.bool_), (50,)),
    ]
    shapes = {s.name: s.shape for s in specs}
    feeds = make_feeds(specs, shapes, seed=3)  # type: ignore[arg-type]
    assert {k: v.dtype for k, v in feeds.items()} == {s.name: s.dtype for s in specs}
    assert feeds["i"].min() >= 0 and feeds["i"].max() < 8
    assert feeds["b"].any() and not feeds["b"].all()
    assert feeds["f"].std() > 0.5  # N(0, 1), not uniform [0, 1)
    again = make_feeds(specs, shapes, seed=3)  # type: ignore[arg-type]
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)
    other = make_feeds(specs, shapes, seed=4)  # type: ignore[arg-type]
    assert not np.array_equal(feeds["f"], other["f"])


def test_make_feeds_input_range() -> None:
    specs = [InputSpec("f", F32, (1000,)), InputSpec("i", np.dtype(np.int32), (1000,))]
    feeds = make_feeds(specs, {"f": (1000,), "i": (1000,)}, input_range=(2.0, 5.0))
    assert feeds["f"].min() >= 2.0 and feeds["f"].max() <= 5.0
    assert set(np.unique(feeds["i"])) == {2, 3, 4, 5}


@pytest.mark.skipif(BFLOAT16 is None, reason="ml_dtypes not installed: bfloat16 inputs raise InputError")
def test_make_feeds_bfloat16() -> None:
    feeds = make_feeds([InputSpec("x", BFLOAT16, (4,))], {"x": (4,)})  # type: ignore[arg-type]
    assert feeds["x"].dtype == BFLOAT16


def test_make_feeds_refuses_strings() -> None:
    with pytest.raises(InputError, match="npz"):
        make_feeds([InputSpec("s", np.dtype(object), (2,))], {"s": (2,)})


def test_load_npz_feeds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "in.npz"
    np.savez(path, x=np.arange(6, dtype=np.float32).reshape(2, 3), ids=np.array([1, 2]))
    feeds = load_npz_feeds(path)
    assert feeds["x"].shape == (2, 3) and feeds["ids"].dtype == np.int64


def test_load_npz_feeds_bad_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    garbage = tmp_path / "bad.npz"
    garbage.write_bytes(b"not a zip at all")
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(2))
    for path in (garbage, npy, tmp_path / "missing.npz"):
        with pytest.raises(InputError):
            load_npz_feeds(path)


def test_distinct_dynamic_dims_get_distinct_values_above_one():
    """So a rewrite that swaps two dynamic axes cannot pass by the two being equal."""
    from rewriter.prove.inputs import InputSpec, shape_sets

    specs = [InputSpec("x", np.dtype("float32"), ("batch", "frames", 16)), InputSpec("y", np.dtype("float32"), ("batch", None))]
    runs = shape_sets(specs)
    assert runs[0] == {"x": (1, 1, 16), "y": (1, 1)}
    assert runs[1]["x"][:2] == (3, 4)  # batch and frames differ
    assert runs[1]["y"] == (3, 5)  # shared symbol keeps its value; the anonymous dim gets its own


# --- memory needed by random inputs ---------------------------------------------------------


def test_make_feeds_refuses_shapes_that_do_not_fit_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    import rewriter.prove.inputs as inputs

    specs = [InputSpec("x", F32, (1, None, 16)), InputSpec("ids", np.dtype(np.int64), ("batch",))]
    with pytest.raises(InputError) as exc:
        make_feeds(specs, {"x": (1, 99999999999, 16), "ids": (1,)})
    message = str(exc.value)
    assert message.startswith("input 'x' at [1,99999999999,16] would need 17.5 TiB for random float32 values; the limit is ")
    assert "half the available memory" in message and "\n" not in message

    # The limit is half the available memory; each input briefly holds its 8-byte draw too.
    monkeypatch.setattr(inputs, "_available_memory", lambda: 2 * 1000)
    make_feeds(specs[:1], {"x": (1, 5, 16)})  # 80 values * (4 + 8) bytes = 960 <= 1000
    with pytest.raises(InputError, match=r"^input 'x' at \[1,6,16\] would need 1.12 KiB .* the limit is 1000 bytes "):
        make_feeds(specs[:1], {"x": (1, 6, 16)})  # 96 * 12 = 1152
    make_feeds(specs, {"x": (1, 5, 16), "ids": (5,)})  # 320 + 40 kept, 640 drawn at most: 1000
    with pytest.raises(InputError, match=r"^inputs at x=\[1,5,16\], ids=\[10\] would need 1.02 KiB .* together"):
        make_feeds(specs, {"x": (1, 5, 16), "ids": (10,)})  # 320 + 80 kept + 640 drawn = 1040
    monkeypatch.setattr(inputs, "_available_memory", lambda: None)  # unknown: no limit
    assert make_feeds(specs[:1], {"x": (1, 7, 16)})["x"].shape == (1, 7, 16)


def test_available_memory_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import rewriter.prove.inputs as inputs

    limit = inputs.feed_memory_limit()
    assert limit is None or limit > 0
    monkeypatch.setattr(inputs, "_meminfo_available", lambda: 5000)
    monkeypatch.setattr(inputs, "_cgroup_available", lambda: None)
    assert inputs._available_memory() == 5000 and inputs.feed_memory_limit() == 2500
    monkeypatch.setattr(inputs, "_cgroup_available", lambda: 1000)  # a container's limit is lower
    assert inputs._available_memory() == 1000
    monkeypatch.setattr(inputs, "_meminfo_available", lambda: None)  # no /proc: psutil, else sysconf
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setattr(inputs, "_cgroup_available", lambda: None)
    monkeypatch.setattr(inputs.os, "sysconf", {"SC_AVPHYS_PAGES": 10, "SC_PAGE_SIZE": 4096}.__getitem__)
    assert inputs._available_memory() == 40960


def test_whole_shapes_are_run_each_as_given():
    """Several whole shapes of one input: one run each, as given, even where an axis repeats a
    value (x:8,512 x:1,512 x:1,16 is three runs, (1, 512) among them); a static dim may be
    given its own value in each."""
    from rewriter.prove.inputs import InputSpec, parse_shape_overrides, shape_sets

    spec = InputSpec("x", np.dtype(np.float32), ("b", "l"))
    runs = shape_sets([spec], parse_shape_overrides(["x:8,512", "x:1,512", "x:1,16"]))
    assert runs == [{"x": (8, 512)}, {"x": (1, 512)}, {"x": (1, 16)}]
    static = InputSpec("x", np.dtype(np.float32), ("b", 16))
    assert shape_sets([static], parse_shape_overrides(["x:8,16", "x:1x16"])) == [{"x": (8, 16)}, {"x": (1, 16)}]
