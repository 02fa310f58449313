"""benchmarks/mutations.py stays able to run: each mutation's line is found exactly once in the
file it names (a refactor that moves the line must move the mutation with it). Running the
mutations themselves takes minutes: ``python benchmarks/mutations.py``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutations_script", REPO / "benchmarks" / "mutations.py")
assert _spec is not None and _spec.loader is not None
mutations = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mutations
_spec.loader.exec_module(mutations)


@pytest.mark.parametrize("mutation", mutations.MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_applies_once(mutation):
    assert (REPO / mutation.path).read_text().count(mutation.old) == 1, f"{mutation.name}: the line to change is not found once in {mutation.path}"
    assert mutation.new != mutation.old
    assert all((REPO / t.split("::")[0]).exists() for t in mutation.tests)
