"""Batch mode: many models in one command, each in its own worker process.

Workers are real `python -m rewriter rewrite` processes; the crash and the hang are injected by a
test-only rule plugin (tests/batch_rules.py) through the ordinary --plugin option.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import jsonschema
import onnx
import pytest
import typer
from onnx import helper
from rich.console import Console

import rewriter
from helpers import cli, make_model, vi
from rewriter.cli import app
from rewriter.cli import batch_jobs, cmd_batch
from rewriter.cli.batch_jobs import ModelJob, Outcome, find_models, plan_jobs, run_jobs
from rewriter.cli.batch_summary import Row, read_report, render_table, worst_exit
from rewriter.cli.cmd_batch import _worker_env, claims, worker_args
from rewriter.engine.filelock import exclusive_lock
from rewriter.measure.serial import MEASURE_LOCK_ENV
from rewriter.tune.cache import DecisionCache

FIXTURES = Path(__file__).with_name("fixtures")
PLUGIN = str(Path(__file__).with_name("batch_rules.py"))
SCHEMA = json.loads((Path(rewriter.__file__).parent / "schemas" / "report.schema.json").read_text())
SOME = ["torch/method1_ts.onnx", "torch/dense_ref_ts.onnx", "keras/method2_tf2onnx.onnx", "torch/distractor_k3_ts.onnx"]



def relu_model(path: Path, node_name: str) -> Path:
    """x -> Relu(node_name) -> y: the plugin crashes or hangs the worker on a marked name."""
    onnx.save(make_model([helper.make_node("Relu", ["x"], ["y"], name=node_name)], [vi("x", [2, 3])], [vi("y", [2, 3])]), path)
    return path


def table_rows(out: str) -> dict[str, list[str]]:
    """Plain table lines (stdout is not a terminal) -> {model: cells}; columns are 2+ spaces apart."""
    lines = out.splitlines()
    assert lines[0].split() == ["model", "sites", "verified", "speedup", "status"]
    rows = {}
    for line in lines[1:]:
        if line.startswith(" ") or "model(s):" in line:
            continue
        cells = [c for c in line.split("  ") if c.strip()]
        rows[cells[0].strip()] = [c.strip() for c in cells[1:]]
    return rows


def summary(out_dir: Path) -> dict[str, dict]:
    data = json.loads((out_dir / "summary.json").read_text())
    return {m["input"]: m for m in data["models"]} | {"": data}


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """Some committed fixtures in a tree, with an earlier run's output and a hidden folder beside them."""
    root = tmp_path / "models"
    for rel in SOME:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / rel, root / rel)
    shutil.copy(FIXTURES / SOME[0], root / "torch" / "method1_ts.rewritten.onnx")
    (root / ".hidden").mkdir()
    shutil.copy(FIXTURES / SOME[0], root / ".hidden" / "x.onnx")
    return root


# --- one run over several fixtures ---------------------------------------------------------------

def test_folder_of_fixtures_jobs_2(capsys, models_dir, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = cli(capsys, models_dir, "--out-dir", out_dir, "--no-bench", "--jobs", "2")
    assert code == 0, out + err
    rows = table_rows(out)
    expected = sorted(str(models_dir / rel) for rel in SOME)
    assert sorted(rows) == expected  # recursive; the .rewritten.onnx and the hidden folder are skipped
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for rel in SOME:
        stem = Path(rel).stem
        report = json.loads((out_dir / f"{stem}.report.json").read_text())
        validator.validate(report)
        assert (out_dir / f"{stem}.rewritten.onnx").is_file() and (out_dir / f"{stem}.log").is_file()
        applied = sum(r["status"] == "applied" for r in report["rewrites"])
        sites, verified, speedup, status = rows[str(models_dir / rel)]
        assert (sites, speedup, status) == (str(applied), "-", "ok")  # --no-bench: nothing measured
        assert verified == ("yes" if applied else "-")
    assert rows[str(models_dir / "torch/method1_ts.onnx")][0] == "1"
    assert rows[str(models_dir / "torch/distractor_k3_ts.onnx")][0] == "0"
    assert "4 model(s): 4 ok, 0 failed; exit code 0" in out
    entries = summary(out_dir)
    assert entries[""]["exit_code"] == 0 and entries[""]["options"] == ["--no-bench"]
    # Not a terminal: one stderr line per finished model instead of a progress bar.
    assert sorted(line.split("] ", 1)[1] for line in err.splitlines()) == sorted(f"{m}: ok" for m in expected)


def test_bench_on_tiny_models(capsys, tmp_path):
    """The default flow (tuning, benchmark with its memory probes, acceptance) in two workers at a
    time, measuring in turn; two timed rounds per measurement are enough for a figure and its spread
    (the wording is checked, never a speed)."""
    out_dir = tmp_path / "out"
    models = [FIXTURES / "torch/method1_ts.onnx", FIXTURES / "torch/method2_ts.onnx"]
    code, out, err = cli(capsys, *models, "--out-dir", out_dir, "--jobs", "2", "--bench-runs", "2", "--tune-budget", "5")
    assert code == 0, out + err
    rows = table_rows(out)
    for m in models:
        facts = read_report(json.loads((out_dir / f"{m.stem}.report.json").read_text()))
        assert facts.speedup is not None and facts.provider == "cpu"
        # The single run's wording: figure, spread, shape, provider.
        assert rows[str(m)][2] == facts.figure and facts.figure.endswith(" on cpu") and " at x=[" in facts.figure


# --- failures cost only their model; the exit code is the worst ----------------------------------

def test_native_crash_costs_only_that_model(capsys, tmp_path):
    crash = relu_model(tmp_path / "crash.onnx", "segfault_here")
    good = FIXTURES / "torch/method1_ts.onnx"
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    out_dir = tmp_path / "out"
    code, out, err = cli(capsys, good, crash, bad, "--out-dir", out_dir, "--no-bench", "--plugin", PLUGIN, "-j", "2")
    assert code == 70
    rows = table_rows(out)
    assert rows[str(crash)] == ["-", "-", "-", "exit 70: crashed (SIGSEGV)"]
    assert rows[str(bad)][-1].startswith("exit 2: cannot read model")
    assert rows[str(good)] == ["1", "yes", "-", "ok"]
    assert (out_dir / "method1_ts.report.json").is_file() and (out_dir / "method1_ts.rewritten.onnx").is_file()
    assert not (out_dir / "crash.report.json").exists() and not (out_dir / "crash.rewritten.onnx").exists()
    entries = summary(out_dir)
    assert [entries[str(p)]["exit_code"] for p in (good, crash, bad)] == [0, 70, 2]
    assert entries[""]["exit_code"] == 70


def test_timeout_stops_only_that_worker(capsys, tmp_path, monkeypatch):
    """Two real workers side by side under --timeout 15: the hung one is stopped (exit 70, "timed
    out after 15 s"), the other one's run is left alone and kept. The batch runs on a fake clock
    that passes the 15 s only once the good worker has ended, so a slow machine cannot time the
    good one out and nobody waits 15 s (the real clock: test_a_real_timeout_on_the_wall_clock)."""
    hang = relu_model(tmp_path / "hang.onnx", "hang_here")
    good = FIXTURES / "torch/method2_ts.onnx"
    run_jobs_on_the_wall_clock = cmd_batch.run_jobs

    def run_jobs_on_a_fake_clock(jobs, command, **kw):
        ended: list[Outcome] = []
        on_done = kw["on_done"]
        kw["on_done"] = lambda outcome: (ended.append(outcome), on_done(outcome))
        kw["clock"] = lambda: 1000.0 if ended else 0.0
        return run_jobs_on_the_wall_clock(jobs, command, **kw)

    monkeypatch.setattr(cmd_batch, "run_jobs", run_jobs_on_a_fake_clock)
    code, out, _ = cli(capsys, hang, good, "--out-dir", tmp_path / "out", "--no-bench", "--plugin", PLUGIN, "--timeout", "15", "-j", "2")
    assert code == 70
    rows = table_rows(out)
    assert rows[str(hang)][-1] == "exit 70: timed out after 15 s"
    assert rows[str(good)][-1] == "ok"
    assert summary(tmp_path / "out")[str(good)]["exit_code"] == 0


def test_a_real_timeout_on_the_wall_clock(capsys, tmp_path):
    """--timeout on the real clock: a worker that never ends is stopped after 1 s (exit 70 for it)."""
    hang = relu_model(tmp_path / "hang.onnx", "hang_here")
    code, out, _ = cli(capsys, hang, "--out-dir", tmp_path / "out", "--no-bench", "--plugin", PLUGIN, "--timeout", "1")
    assert code == 70
    assert table_rows(out)[str(hang)][-1] == "exit 70: timed out after 1 s"
    assert not (tmp_path / "out" / "hang.rewritten.onnx").exists()


def test_exit_code_order():
    assert worst_exit([]) == 0
    assert worst_exit([0, 1, 0]) == 1
    assert worst_exit([1, 2, 0]) == 2
    assert worst_exit([2, 3, 1]) == 3
    assert worst_exit([3, 70, 2]) == 70
    assert worst_exit([0, 4, 0]) == 4 and worst_exit([4, 1]) == 1  # a --fail-on event (the output written) is the mildest failure


@pytest.mark.parametrize(("returncode", "expected"), [
    (0, (0, "")), (1, (1, "")), (3, (3, "")), (4, (4, "")), (70, (70, "")),
    (-11, (70, "crashed (SIGSEGV)")), (-8, (70, "crashed (SIGFPE)")), (143, (70, "crashed (exit 143)")),
])
def test_how_a_worker_ended(returncode, expected):
    assert batch_jobs._how_it_ended(returncode) == expected


# --- names, folders, options -------------------------------------------------------------------

def test_name_clashes_get_numbered(capsys, tmp_path):
    a, b = tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx"
    for p in (a, b):
        p.parent.mkdir()
        shutil.copy(FIXTURES / "torch/method1_ts.onnx", p)
    out_dir = tmp_path / "out"
    code, out, err = cli(capsys, a, b, "--out-dir", out_dir, "--no-bench")
    assert code == 0, out + err
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["summary.json"] + [f"{n}.{ext}" for n in ("m", "m-2") for ext in ("rewritten.onnx", "report.json", "log")])
    assert json.loads((out_dir / "m-2.report.json").read_text())["input"]["path"] == str(b.resolve())
    assert f"{b} (as m-2)" in table_rows(out)


def test_plan_jobs_names():
    jobs = plan_jobs([Path("a/m.onnx"), Path("b/m.onnx"), Path("c/M.onnx"), Path("m-2.onnx"), Path("x.rewritten.onnx")], Path("o"))
    assert [j.name for j in jobs] == ["m", "m-2", "M-3", "m-2-2", "x.rewritten"]
    assert jobs[1].output == Path("o/m-2.rewritten.onnx") and jobs[1].report == Path("o/m-2.report.json")


def test_find_models(models_dir, tmp_path):
    explicit = models_dir / "torch" / "method1_ts.rewritten.onnx"  # named explicitly: kept
    found = find_models([models_dir / "torch", models_dir, explicit])
    assert found[:3] == [models_dir / "torch" / n for n in ("dense_ref_ts.onnx", "distractor_k3_ts.onnx", "method1_ts.onnx")]
    assert found[3:] == [models_dir / "keras" / "method2_tf2onnx.onnx", explicit]  # each file once
    with pytest.raises(rewriter.InputError, match="no such file or folder"):
        find_models([tmp_path / "missing"])


def test_routing_keeps_the_single_model_form(tmp_path):
    assert not claims(["m.onnx"]) and not claims(["m.onnx", "--seed", "3", "-o", "x.onnx"])
    assert claims(["m.onnx", "--out-dir", "o"]) and claims(["m.onnx", "-j", "2"])
    a, b = FIXTURES / "torch/method1_ts.onnx", FIXTURES / "torch/method2_ts.onnx"
    assert claims([str(a), str(b)]) and claims([str(a), str(b), str(b)]) and claims([str(a), "new.onnx", "--out-dir", "o"])
    # in.onnx out.onnx (the onnxsim / onnxslim habit): the second path, no existing model or folder, is the output.
    assert not claims([str(a), str(tmp_path / "out.onnx")]) and not claims(["a.onnx", "b.onnx"])
    assert claims([str(a), str(tmp_path)])  # an existing folder: a batch (which asks for --out-dir)
    assert claims([str(FIXTURES)])
    assert not claims([str(FIXTURES), "-o", "x.onnx"])  # single-model form: "is a directory"
    assert not claims(["m.onnx", "--no-such-option"])  # the single-model command reports it


def test_worker_args_pass_options_as_given():
    batch = typer.main.get_command(app).commands["batch"]  # type: ignore[attr-defined]
    given = ["--rules", "a,b", "--rules", "c", "--seed", "3", "--atol", "1e-05", "--no-bench", "--cache", "c.json", "--direction", "to-matmul"]
    ctx = batch.make_context("batch", ["m.onnx", "--out-dir", "o", "-j", "2", *given])
    args = worker_args(ctx)
    assert sorted(args) == sorted(given)
    rewrite = typer.main.get_command(app).commands["rewrite"]  # type: ignore[attr-defined]
    again = rewrite.make_context("rewrite", [*args, "m.onnx"])
    direct = rewrite.make_context("rewrite", [*given, "m.onnx"])
    assert again.params == direct.params


def test_batch_takes_the_rewrite_options_without_redeclaring_them(capsys):
    code, out, _ = cli(capsys, "batch", "--help")
    assert code == 0
    for flag in ("--out-dir", "--jobs", "--timeout", "--seed", "--bench-runs", "--plugin", "--tune-budget", "--dry-run"):
        assert flag in out
    offered = {word for line in out.splitlines() for word in line.replace("│", " ").split() if word.startswith("--")}
    for per_file in ("--output", "--report", "--report-md", "--overwrite"):  # parsed to be refused, not offered
        assert per_file not in offered


def test_hiding_an_option_leaves_its_declaration_alone():
    from rewriter.cli import params as p
    from rewriter.cli.cmd_batch import _hidden

    param = inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, annotation=p.Seed, default=0)
    hidden = _hidden(param)
    (info,) = [m for m in typing.get_args(hidden.annotation)[1:] if isinstance(m, typer.models.OptionInfo)]
    (original,) = [m for m in typing.get_args(p.Seed)[1:] if isinstance(m, typer.models.OptionInfo)]
    assert info.hidden and not original.hidden and info.param_decls == original.param_decls


@pytest.mark.parametrize(("args", "needle"), [
    (["--out-dir", "{tmp}/o", "-o", "x.onnx"], "-o/--output cannot be used in batch mode"),
    (["--out-dir", "{tmp}/o", "--report", "r.json", "--report-md", "r.md"], "--report, --report-md cannot be used"),
    ([], "batch mode needs --out-dir"),
    (["--out-dir", "{tmp}/o", "--timeout", "0"], "--timeout must be > 0"),
    (["-o", "x.onnx"], "-o/--output cannot be used"),  # the more specific message first
])
def test_refused_options(capsys, tmp_path, args, needle):
    a = FIXTURES / "torch/method1_ts.onnx"
    code, out, err = cli(capsys, a, a.with_name("method2_ts.onnx"), *[x.format(tmp=tmp_path) for x in args])
    assert code == 2 and err.strip().splitlines() == [err.strip()] and needle in err, err
    assert not (tmp_path / "o" / "summary.json").exists()


def test_empty_folder_is_an_error(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, tmp_path / "empty", "--out-dir", tmp_path / "o")
    assert code == 2 and "no .onnx model found" in err
    assert not (tmp_path / "o").exists()  # nothing created before the command line is known good


def test_plain_table_lines_are_never_cut():
    long_name = Path("a" * 120 + ".onnx")
    job = ModelJob(long_name, "a" * 120, Path("o"))
    buf = io.StringIO()
    render_table([Row(Outcome(job, 2, "", "cannot read model: " + "x" * 100), None)], Console(file=buf, width=40))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith(str(long_name)) and lines[1].endswith("x" * 100)


# --- workers stopped on interruption -------------------------------------------------------------

def test_interrupted_batch_leaves_no_worker(tmp_path, monkeypatch):
    started: list[subprocess.Popen[bytes]] = []

    class Recorded(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            started.append(self)

    monkeypatch.setattr(batch_jobs.subprocess, "Popen", Recorded)
    jobs = plan_jobs([Path(f"m{i}.onnx") for i in range(3)], tmp_path)

    def interrupt_at_second(job: ModelJob) -> None:
        if len(started) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, lambda j: [sys.executable, "-c", "import time; time.sleep(60)"], parallel=2, on_start=interrupt_at_second)
    assert len(started) == 2 and all(p.poll() is not None for p in started)


# --- shared state between workers: the tuning cache and the measuring lock ------------------------

_CACHE_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from rewriter.tune.cache import DecisionCache
    path, me, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    entry = {"choice": "original", "reason": "test", "forms": {"original": {"median_ms": 1.0, "p90_ms": 1.0}}}
    for i in range(rounds):
        cache = DecisionCache(path, True)  # each round a new run: read, then merge-write
        cache.put(f"{me}-{i}", entry)
        cache.save()
        assert not cache.notes, cache.notes
""")


def test_cache_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "cache" / "tuning.json"
    writers, rounds = 4, 25
    procs = [subprocess.Popen([sys.executable, "-c", _CACHE_WRITER, str(path), f"w{k}", str(rounds)]) for k in range(writers)]
    assert [p.wait(120) for p in procs] == [0] * writers
    entries = DecisionCache(path, True)._entries
    assert sorted(entries) == sorted(f"w{k}-{i}" for k in range(writers) for i in range(rounds))
    assert (tmp_path / "cache" / "tuning.json.lock").exists()


_MEASURER = textwrap.dedent("""
    from rewriter.measure.serial import measuring
    with measuring(lambda msg: print(msg, flush=True)):
        print("measuring", flush=True)
""")


def test_measuring_waits_for_the_lock(tmp_path, monkeypatch):
    lock = tmp_path / "measure.lock"
    monkeypatch.setenv(MEASURE_LOCK_ENV, str(lock))
    with exclusive_lock(lock):
        child = subprocess.Popen([sys.executable, "-c", _MEASURER], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "waiting for another run to finish measuring"
    assert child.stdout.readline().strip() == "measuring"  # only once the lock is released
    assert child.wait(60) == 0


def test_optimize_measures_under_the_lock(tmp_path, monkeypatch):
    """Tuning and acceptance run while the lock is held; verification and the workload choice (it
    times nothing: the shape comes from the model) do not."""
    import rewriter.api as api

    lock = tmp_path / "measure.lock"
    monkeypatch.setenv(MEASURE_LOCK_ENV, str(lock))
    seen: dict[str, bool] = {}

    def held() -> bool:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT)
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def spy(name, fn):
        def wrapped(*a, **kw):
            seen[name] = held()
            return fn(*a, **kw)
        monkeypatch.setattr(api, name, wrapped)

    for name in ("choose_workload", "tune_sites", "accept", "prove"):
        spy(name, getattr(api, name))
    api.optimize(FIXTURES / "torch/method1_ts.onnx", rewriter.MEASURED,
                 bench=rewriter.BenchOptions(runs=3), verify=rewriter.VerifyOptions(providers=("cpu",)))
    assert seen == {"choose_workload": False, "tune_sites": True, "accept": True, "prove": False}


def test_workers_share_a_measuring_lock_only_when_parallel(tmp_path, monkeypatch):
    monkeypatch.delenv(MEASURE_LOCK_ENV, raising=False)
    assert MEASURE_LOCK_ENV not in _worker_env(str(tmp_path), 1)
    assert _worker_env(str(tmp_path), 2)[MEASURE_LOCK_ENV] == str(tmp_path / "measure.lock")
    monkeypatch.setenv(MEASURE_LOCK_ENV, "/shared/lock")
    assert _worker_env(str(tmp_path), 2)[MEASURE_LOCK_ENV] == "/shared/lock"
