"""Batch mode's models and workers: expand the inputs, give each model its output names, run one
worker process per model (a crash or a timeout costs only that model).

The worker command line is the caller's (``onnx-rewrite rewrite MODEL ...``); this module only
starts, watches and stops processes, and maps how each ended to an exit code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from rewriter.errors import EXIT_FAIL_ON, EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_PLUGIN, EXIT_VERIFY, InputError, shown_path

__all__ = ["ModelJob", "Outcome", "find_models", "plan_jobs", "run_jobs", "KNOWN_EXITS"]

# Exit codes a worker ends with on purpose; anything else (a signal, 130/143 from outside) is a crash.
KNOWN_EXITS = (EXIT_OK, EXIT_FAIL_ON, EXIT_VERIFY, EXIT_INPUT, EXIT_PLUGIN, EXIT_INTERNAL)
_OUTPUT_SUFFIX = ".rewritten.onnx"
_STOP_GRACE_S = 10.0  # after SIGTERM a worker removes its staged files; then SIGKILL


@dataclass(frozen=True)
class ModelJob:
    """One model of a batch and where its files go: ``OUT/<name>.rewritten.onnx``,
    ``OUT/<name>.report.json`` and ``OUT/<name>.log`` (the worker's terminal output)."""

    source: Path
    name: str
    out_dir: Path

    @property
    def output(self) -> Path:
        return self.out_dir / f"{self.name}{_OUTPUT_SUFFIX}"

    @property
    def report(self) -> Path:
        return self.out_dir / f"{self.name}.report.json"

    @property
    def log(self) -> Path:
        return self.out_dir / f"{self.name}.log"


@dataclass(frozen=True)
class Outcome:
    """How one worker ended. ``exit_code`` is its exit status when it is one of
    :data:`KNOWN_EXITS`, else 70 with ``ended`` saying why (crashed by a signal, timed out)."""

    job: ModelJob
    exit_code: int
    ended: str = ""  # "" when the worker exited by itself with a known code
    error: str = ""  # the worker's one-line error message, if it printed one
    seconds: float = 0.0


def _stem(path: Path) -> str:
    return path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name


def _folder_models(folder: Path) -> list[Path]:
    """``*.onnx`` under ``folder``, recursively and sorted; hidden folders (``.venv``, ``.git``)
    and earlier outputs (``*.rewritten.onnx``) are skipped, symlinked folders not followed."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files) if f.endswith(".onnx") and not f.endswith(_OUTPUT_SUFFIX))
    return found


def find_models(paths: Sequence[Path]) -> list[Path]:
    """The models named by ``paths``: files as given, folders expanded (:func:`_folder_models`);
    a file reached twice runs once. Raises InputError for a path that does not exist."""
    models: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        if not path.exists():
            raise InputError(f"cannot read model {shown_path(path)}: no such file or folder")
        for model in _folder_models(path) if path.is_dir() else [path]:
            key = model.resolve()
            if key not in seen:
                seen.add(key)
                models.append(model)
    return models


def plan_jobs(models: Sequence[Path], out_dir: Path) -> list[ModelJob]:
    """One job per model, named by the model's stem; when stems clash (``a/m.onnx``, ``b/m.onnx``)
    the first keeps ``m`` and the next get ``m-2``, ``m-3``, ... in input order. Names are compared
    case-insensitively, so the outputs do not clash on case-insensitive file systems either."""
    taken: set[str] = set()
    jobs = []
    for model in models:
        base = name = _stem(model)
        n = 1
        while name.casefold() in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name.casefold())
        jobs.append(ModelJob(model, name, out_dir))
    return jobs


def _error_line(log: Path) -> str:
    """The worker's one-line error (``error: ...`` / ``internal error: ...``), else ""."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
        if line.startswith("internal error: "):
            return line
    return ""


def _how_it_ended(returncode: int) -> tuple[int, str]:
    if returncode in KNOWN_EXITS:
        return returncode, ""
    if returncode < 0:
        try:
            return EXIT_INTERNAL, f"crashed ({signal.Signals(-returncode).name})"
        except ValueError:
            return EXIT_INTERNAL, f"crashed (signal {-returncode})"
    return EXIT_INTERNAL, f"crashed (exit {returncode})"


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a worker removes its staged files and exits 143), then SIGKILL the ones that do not."""
    alive = [p for p in procs if p.poll() is None]
    for proc in alive:
        proc.terminate()
    deadline = time.monotonic() + _STOP_GRACE_S
    for proc in alive:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class _Running:
    job: ModelJob
    proc: subprocess.Popen[bytes]
    started: float


def _start(job: ModelJob, argv: list[str], env: Mapping[str, str], now: float) -> _Running:
    for stale in (job.output, job.report):  # an earlier run's files must not pass for this run's
        with contextlib.suppress(OSError):  # not removable: the worker then fails writing it, and says so
            if stale.is_file():
                stale.unlink()
    with open(job.log, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=dict(env))
    return _Running(job, proc, now)


def _finished(run: _Running, timeout: float | None, now: float) -> Outcome | None:
    code = run.proc.poll()
    if code is None and timeout is not None and now - run.started > timeout:
        _stop(run.proc)  # its "error: terminated" is our doing, not the model's error
        return Outcome(run.job, EXIT_INTERNAL, f"timed out after {timeout:g} s", "", now - run.started)
    if code is None:
        return None
    exit_code, ended = _how_it_ended(code)
    return Outcome(run.job, exit_code, ended, _error_line(run.job.log), now - run.started)


def run_jobs(
    jobs: Iterable[ModelJob],
    command: Callable[[ModelJob], list[str]],
    *,
    parallel: int = 1,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    on_start: Callable[[ModelJob], None] = lambda _job: None,
    on_done: Callable[[Outcome], None] = lambda _outcome: None,
    clock: Callable[[], float] = time.monotonic,
    poll_s: float = 0.05,
) -> list[Outcome]:
    """Run ``command(job)`` for every job, ``parallel`` at a time, each killed after ``timeout``
    seconds; the outcomes in the jobs' order. However this returns or raises (Ctrl-C, SIGTERM),
    no worker is left running."""
    queue = deque(jobs)
    order = [j.name for j in queue]
    running: list[_Running] = []
    done: dict[str, Outcome] = {}
    try:
        while queue or running:
            while queue and len(running) < max(1, parallel):
                job = queue.popleft()
                running.append(_start(job, command(job), env if env is not None else os.environ, clock()))
                on_start(job)
            time.sleep(poll_s)
            for run in list(running):
                outcome = _finished(run, timeout, clock())
                if outcome is not None:
                    running.remove(run)
                    done[run.job.name] = outcome
                    on_done(outcome)
    finally:
        _stop(*(run.proc for run in running))
    return [done[name] for name in order]
