"""Static checks: the engine and built-in rules type-check (STYLE: typed public API, py.typed), and no
undefined names or unused imports anywhere (pyflakes rules via ruff)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed (test extra): would type-check rewriter/ and rules/")
def test_mypy_is_clean(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "rewriter", "rules", "--ignore-missing-imports", "--cache-dir", str(tmp_path / "mypy-cache")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff not installed (test extra): would check for undefined names and unused imports")
def test_pyflakes_checks_are_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "F", "--no-cache", "rewriter", "rules", "tests", "benchmarks", "examples"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
