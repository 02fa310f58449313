"""Static checks: the engine and built-in rules type-check (STYLE: typed public API, py.typed); no
undefined names, unused imports or functions above McCabe 12 anywhere (ruff, configured in
pyproject.toml); the architecture's import contracts hold (import-linter, same file)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TREES = ["rewriter", "rules", "tests", "benchmarks", "examples", "build_backend"]


# mypy settings of the check: the project configures none in pyproject.toml (the tripwire below
# says when it does). torch is not followed: only onnx_ir's optional tensor adapters import it,
# rewriter/ and rules/ never do, and its ~1400 modules were two thirds of the check's time.
MYPY_CONFIG = """\
[mypy]
ignore_missing_imports = True

[mypy-torch.*]
follow_imports = skip
"""

# Checked with the code: proves in the same run that these settings still see the package's real
# types (a `rewriter` resolved to Any, or not found, would pass these lines silently).
MYPY_CANARY = """\
from rewriter import RewritePass, optimize

wrong_result: int = optimize("m.onnx")
wrong_class: str = RewritePass
"""


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed (test extra): would type-check rewriter/ and rules/")
def test_mypy_is_clean(tmp_path):
    """rewriter/ and rules/ type-check from scratch (a fresh cache), and a canary file of two
    deliberate errors against rewriter's public API is checked with them: its two errors, and no
    other, must be found."""
    assert "[tool.mypy" not in (REPO / "pyproject.toml").read_text(), \
        "pyproject.toml now configures mypy: make MYPY_CONFIG (which replaces it here) say the same"
    config = tmp_path / "mypy.ini"
    config.write_text(MYPY_CONFIG)
    canary = tmp_path / "canary.py"
    canary.write_text(MYPY_CANARY)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(tmp_path / "mypy-cache"), "rewriter", "rules", str(canary)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert [line.split(": error:")[0] for line in errors] == [f"{canary}:3", f"{canary}:4"], proc.stdout[-3000:]
    assert '"Result", variable has type "int"' in errors[0] and '"type[RewritePass]", variable has type "str"' in errors[1], errors
    assert proc.returncode == 1, proc.stdout[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff not installed (test extra): would check names, imports and complexity")
def test_ruff_checks_are_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *TREES], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_no_fmt_skip_markers():
    """No formatter is configured, so a marker telling one to skip a line is noise."""
    marker = "fmt: " + "skip"
    found = [f"{p.relative_to(REPO)}:{i}" for tree in TREES for p in (REPO / tree).rglob("*.py") if "build" not in p.parts
             for i, line in enumerate(p.read_text().splitlines(), 1) if marker in line]
    assert not found, found


@pytest.mark.skipif(shutil.which("lint-imports") is None and importlib.util.find_spec("importlinter") is None,
                    reason="import-linter not installed (test extra): would check the layer, rule and cycle contracts")
def test_import_contracts_hold(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())",
                           "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and " 0 broken" in proc.stdout, proc.stdout[-4000:]
