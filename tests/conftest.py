"""Suite-wide fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_cache_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's default flow tunes and writes a decision cache under XDG_CACHE_HOME: keep tests
    (and the subprocesses they start) out of the real home folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


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
