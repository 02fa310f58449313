"""The report at a glance: Report.summary_line for every outcome of a successful run, and what
Report.render shows by default and with verbose. Sections are given as their JSON (what the
at-a-glance lines read), so no model runs and no timing is involved."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from rewriter.report import RESTATED_NOTES, ModelSummary, NearMissRecord, Report, RewriteRecord

BEFORE = ModelSummary("m.onnx", "0" * 64, 7, {"Conv": 1, "Reshape": 3, "Squeeze": 1, "Unsqueeze": 1, "Relu": 1})
AFTER = ModelSummary("/out/m.rewritten.onnx", "1" * 64, 2, {"MatMul": 1, "Relu": 1})
UNSAVED = ModelSummary(None, None, 2, {"MatMul": 1, "Relu": 1})


class JsonSection:
    """A section as the report sees it; ``render`` marks where its full table would print."""

    def __init__(self, name: str, data: dict[str, Any]) -> None:
        self.name, self.data = name, data

    def to_json(self) -> dict[str, Any]:
        return self.data

    def to_markdown(self) -> str:
        return f"{self.name} markdown"

    def render(self, console: Any, *, verbose: bool = False) -> None:
        console.print(f"<{self.name} table>")


def verification(passed: bool = True) -> JsonSection:
    return JsonSection("verification", {"passed": passed, "providers": {
        "cpu": {"provider": "cpu", "status": "passed" if passed else "failed", "reason": "", "max_abs": 2.4e-7,
                "shapes": [{"x": [1, 4, 16]}, {"x": [3, 8, 16]}]},
        "cuda": {"provider": "cuda", "status": "skipped", "reason": "CUDA unavailable: no driver", "max_abs": None, "shapes": []},
    }})


def timing(speedup: float, low: float, high: float, verdict: str, shapes: dict[str, list[int]], **kw: Any) -> dict[str, Any]:
    return {"provider": "cpu", "status": "measured", "reason": "", "speedup": speedup, "speedup_low": low,
            "speedup_high": high, "verdict": verdict, "shapes": shapes, **kw}


def benchmark(speedup: float = 1.31, low: float = 1.20, high: float = 1.44, verdict: str = "faster", small: dict | None = None) -> JsonSection:
    main = timing(speedup, low, high, verdict, {"x": [8, 1024, 512]}, shape_source="auto: 21.0 ms >= the 20 ms target",
                  before={"peak_rss_bytes": 100 * 2**20}, after={"peak_rss_bytes": 88 * 2**20})
    if small is not None:
        main["small"] = small
    return JsonSection("benchmark", {"cpu": main, "cuda": {"provider": "cuda", "status": "skipped", "reason": "not asked"}})


def applied(n: int, rule: str = "method1-tf2onnx-to-matmul", family: str = "method1", status: str = "applied", reason: str = "") -> list[RewriteRecord]:
    return [RewriteRecord(rule, (f"{rule}-site{i}", "other"), status, reason, family=family) for i in range(n)]


def report(rewrites=(), near=0, sections=(), notes=(), output=AFTER) -> Report:
    misses = tuple(NearMissRecord("rule-x", f"conv{i}", f"reason {i}") for i in range(near))
    return Report("0.0", BEFORE, output, tuple(rewrites), misses, {s.name: s for s in sections}, tuple(notes))


# --- the summary line, one outcome each --------------------------------------------------------------

@pytest.mark.parametrize("rep, expected", [
    (report(applied(3), sections=[verification(), benchmark()]),
     "m.rewritten.onnx: 3 sites rewritten, verified on cpu at 2 shapes, 1.31× faster (1.20–1.44) at x=[8,1024,512], peak RSS -12%"),
    (report(applied(1), sections=[verification()]),
     "m.rewritten.onnx: 1 site rewritten, verified on cpu at 2 shapes, not measured"),
    (report(applied(2), sections=[benchmark()]),
     "m.rewritten.onnx: 2 sites rewritten, NOT verified, 1.31× faster (1.20–1.44) at x=[8,1024,512], peak RSS -12%"),
    (report(applied(2), sections=[verification(), benchmark(1.01, 0.97, 1.05, "no measurable change")]),
     "m.rewritten.onnx: 2 sites rewritten, verified on cpu at 2 shapes, no measurable change (1.01×, 0.97–1.05) at x=[8,1024,512], peak RSS -12%"),
    (report(applied(2), sections=[verification(), benchmark(0.91, 0.88, 0.94, "slower")]),
     "m.rewritten.onnx: 2 sites rewritten, verified on cpu at 2 shapes, 0.91× slower (0.88–0.94) at x=[8,1024,512], peak RSS -12%"),
    (report(applied(2) + applied(1, "bad", "bad", "rolled_back", "not equivalent") + applied(3, "pw", "pointwise", "rejected", "slower"),
            sections=[verification(), benchmark()]),
     "m.rewritten.onnx: 2 sites rewritten, 1 rolled back as not equivalent, 3 sites kept as they were (not faster), verified on cpu at 2 shapes, "
     "1.31× faster (1.20–1.44) at x=[8,1024,512], peak RSS -12%"),
    (report(near=2), "m.rewritten.onnx: nothing rewritten (written unchanged), 2 near misses"),
    (report(), "m.rewritten.onnx: nothing rewritten (written unchanged)"),
    (report(near=1, sections=[JsonSection("tuning", {"sites": [{"choice": "original"}, {"choice": "original"}]})]),
     "m.rewritten.onnx: nothing rewritten (written unchanged), 2 sites kept as they were (measured), 1 near miss"),
    (report(applied(3, "pw", "pointwise", "rejected", "slower"), sections=[verification(), benchmark(0.9, 0.85, 0.95, "slower")]),
     "m.rewritten.onnx: nothing rewritten (written unchanged), 3 sites kept as they were (not faster)"),
    (report(applied(2), near=1, output=UNSAVED), "not written: 2 sites would be rewritten"),
], ids=["verified-measured", "no-bench", "no-verify", "no-change", "kept-slower", "rolled-back-and-rejected",
        "nothing-near-misses", "nothing", "nothing-tuned", "all-rejected", "not-written"])
def test_summary_line(rep, expected):
    assert rep.summary_line() == expected
    assert rep.to_json()["summary"] == expected


def test_summary_line_subject_is_the_callers_name():
    rep = report(applied(2), output=UNSAVED)
    assert rep.summary_line("dry run") == "dry run: 2 sites would be rewritten"
    assert report(applied(1), sections=[verification()]).summary_line("/tmp/o.onnx").startswith("/tmp/o.onnx: 1 site rewritten")


def test_failed_verification_is_never_called_verified():
    assert "verification FAILED" in report(applied(1), sections=[verification(passed=False)]).summary_line()


# --- the terminal --------------------------------------------------------------------------------------

def text_of(rep: Report, **kw: Any) -> str:
    buf = io.StringIO()
    rep.render(Console(file=buf, width=100_000, soft_wrap=True, color_system=None), **kw)
    return buf.getvalue()


NOTES = ("verification skipped: the output is NOT proven equivalent", "plugin unavailable: x.py: boom")
SMALL = timing(0.97, 0.90, 1.05, "no measurable change", {"x": [1, 16, 512]})


def full_report() -> Report:
    tuning = JsonSection("tuning", {"provider": "cpu", "sites": [{"choice": "original"}, {"choice": "method1-tf2onnx-to-matmul"}]})
    static = JsonSection("static", {})
    return report(applied(2) + applied(1, "pw", "pointwise", "rejected", "kept as it was: 0.91× slower (0.88–0.94) at x=[8,1024,512]; measurably slower"), near=7,
                  sections=[tuning, verification(), benchmark(small=SMALL), static], notes=NOTES)


def test_default_render_is_read_at_a_glance():
    lines = text_of(full_report()).splitlines()
    assert lines[0].split() == ["ops", "before", "after"]
    assert lines[1].split() == ["nodes", "7", "2"] and ["Conv", "1", "0"] in [l.split() for l in lines]
    rows = [l for l in lines if l.startswith(("applied", "kept as it was"))]
    assert rows[0].split()[:4] == ["applied", "method1", "2", "sites"]
    assert rows[1].startswith("kept as it was") and rows[1].split()[4:7] == ["pointwise", "1", "site"]
    # The family's own share, without repeating "kept as it was".
    assert rows[1].endswith("pw: 0.91× slower (0.88–0.94) at x=[8,1024,512]; measurably slower")
    assert "verified: equivalent on cpu at 2 shapes (x=[1,4,16]; x=[3,8,16]); max abs 2.4e-07" in lines
    assert "  cuda: skipped: CUDA unavailable: no driver" in lines
    # The flags that measure there again, and the session settings it was timed with.
    assert ("measured on cpu at x=[8,1024,512] (--bench-shape x:8,1024,512 reproduces it; onnxruntime defaults): 1.31× faster "
            "(1.20–1.44), peak RSS -12%; at x=[1,16,512]: no measurable change (0.97×, 0.90–1.05)") in lines
    assert "  cuda: not measured: not asked" in lines
    assert "tuning on cpu: 1 site kept as it was (no rewrite measured faster there; -v shows the timings)" in lines
    assert "7 candidates not rewritten (near misses): run with -v or --dry-run to see why" in lines
    # Restated by the summary line: not repeated; other notes are.
    assert "note: plugin unavailable: x.py: boom" in lines and not any("verification skipped" in l for l in lines)
    # No table, no site list, no per-miss line.
    assert not any("table>" in l or "-site0" in l or "reason 0" in l for l in lines)


def test_verbose_render_has_every_table_in_pipeline_order():
    text = text_of(full_report(), verbose=True)
    order = [text.index(s) for s in ("<tuning table>", "ops ", "applied", "<verification table>", "<benchmark table>", "<static table>")]
    assert order == sorted(order)
    assert "method1-tf2onnx-to-matmul: method1-tf2onnx-to-matmul-site1, other" in text  # each site
    assert all(f"rule-x at conv{i}: reason {i}" in text for i in range(7))
    assert all(f"note: {n}" in text for n in NOTES)


def test_near_misses_are_listed_when_nothing_was_rewritten():
    same = ModelSummary("/out/m.rewritten.onnx", "0" * 64, 7, dict(BEFORE.op_counts))
    text = text_of(report(near=7, output=same))
    assert text.splitlines()[0] == "ops unchanged: 7 nodes (Conv 1, Reshape 3)"
    assert "7 near misses (candidates not rewritten, and why):" in text
    assert "rule-x at conv4: reason 4" in text and "conv5" not in text
    assert "... 2 more: run with -v or --dry-run" in text
    listed = text_of(report(near=7, output=same), list_all=True)  # a dry run lists them all
    assert "rule-x at conv6: reason 6" in listed and "more" not in listed


def test_restated_notes_are_what_the_library_writes():
    """The notes hidden at a glance are the ones api.optimize writes for skipped steps, and none
    names a flag (a dry run skips verification without --no-verify)."""
    from onnx import helper

    import rewriter
    from engine_rules import DoubleReluToRelu
    from helpers import make_model, vi
    from rewriter.engine.registry import Registry

    model = make_model([helper.make_node("Relu", ["x"], ["r"], name="r0"), helper.make_node("Relu", ["r"], ["y"], name="r1")],
                       [vi("x", ["b", 4])], [vi("y", ["b", 4])])
    reg = Registry()
    reg.add(DoubleReluToRelu, "test")
    skipped = rewriter.optimize(model, registry=reg, verify=False).report.notes
    nothing = rewriter.optimize(model, registry=Registry()).report.notes
    assert len(skipped) == 2 and len(nothing) == 2
    for note in skipped + nothing:
        assert note.startswith(RESTATED_NOTES) and "--" not in note, note
    assert "note:" not in text_of(report(notes=skipped)) + text_of(report(notes=nothing))


def test_no_gpu_is_left_to_verbose_and_json():
    """A machine without an NVIDIA GPU is the usual case: at a glance no cuda line at all (the
    run's notes say it when CUDA was asked for); -v's table and the JSON keep it."""
    from rewriter.ort import NO_CUDA_DEVICE

    section = verification()
    section.data["providers"]["cuda"]["reason"] = NO_CUDA_DEVICE
    rep = report(applied(1), sections=[section])
    lines = text_of(rep).splitlines()
    assert not any("cuda" in line for line in lines), lines
    assert rep.to_json()["verification"]["providers"]["cuda"]["reason"] == NO_CUDA_DEVICE
    assert "<verification table>" in text_of(rep, verbose=True)  # the provider table, cuda's row and reason included


