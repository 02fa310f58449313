"""Suite-wide fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_cache_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's default flow tunes and writes a decision cache under XDG_CACHE_HOME: keep tests
    (and the subprocesses they start) out of the real home folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


def pytest_configure(config: pytest.Config) -> None:
    """Hypothesis keeps its example database and a cache of the source's constants (written while
    tests are collected) in ``.hypothesis/`` of the working folder, the checkout: in a temporary
    folder of this run instead, removed at its end, so that a test run writes nothing into the
    source tree (each run starts with an empty database, as on CI)."""
    import shutil
    import tempfile

    from hypothesis.configuration import set_hypothesis_home_dir

    home = tempfile.mkdtemp(prefix="onnx-rewrite-tests-hypothesis-")
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
    set_hypothesis_home_dir(home)


def _refuse_constant(name: str) -> object:
    raise AssertionError(f"a report holds {name}, which strict JSON parsers (JavaScript, json.loads(parse_constant=...)) refuse")


@pytest.fixture(autouse=True)
def _every_report_is_strict_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every report any test makes (rewriter.Report.to_json) is parsed as strict JSON: no
    Infinity or NaN (a non-finite figure is null with a reason beside it)."""
    import json

    from rewriter.report import Report

    made = Report.to_json

    def to_json(self: Report) -> object:
        data = made(self)
        json.loads(json.dumps(data), parse_constant=_refuse_constant)
        return data

    monkeypatch.setattr(Report, "to_json", to_json)
