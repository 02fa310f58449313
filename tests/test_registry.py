"""Rule discovery: entry points, --plugin files and modules, broken plugins, duplicate ids."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from rewriter.errors import InputError, PluginError
from rewriter.engine import registry
from rewriter.engine.registry import discover

REPO = Path(__file__).resolve().parents[1]

PLUGIN = '''
from rewriter import Rule

class NegNegToIdentity(Rule):
    """Neg(Neg(x)) -> x"""
    id = "plugin-neg-neg"
    default = False
    def pattern(self, p):
        return p.op("Neg", p.op("Neg", p.var("x")))
    def rewrite(self, b, m):
        return m["x"]
'''


def test_builtins_come_through_the_entry_point():
    reg = discover()
    assert reg.rules, "no built-in rule found: is the package installed (pip install -e .)?"
    assert {i.source for i in reg.rules.values()} == {"built-in"}
    assert not reg.unavailable


def test_plugin_file(tmp_path):
    f = tmp_path / "my_rules.py"
    f.write_text(PLUGIN)
    reg = discover([str(f)])
    assert reg.rules["plugin-neg-neg"].source == f"plugin file {f}"
    assert [r.id for r in reg.select(["plugin-neg-neg"])] == ["plugin-neg-neg"]


def test_plugin_module(tmp_path, monkeypatch):
    (tmp_path / "pkg_rules_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = discover(["pkg_rules_mod"])
    assert reg.rules["plugin-neg-neg"].source == "plugin module pkg_rules_mod"


def test_broken_plugin_is_listed_unavailable_or_fatal_when_strict(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("import does_not_exist_anywhere\n")
    reg = discover([str(f)])
    assert len(reg.unavailable) == 1
    assert reg.unavailable[0].error == "ModuleNotFoundError: No module named 'does_not_exist_anywhere'"
    assert reg.rules  # the built-ins still load
    with pytest.raises(PluginError, match="failed to load: ModuleNotFoundError"):
        discover([str(f)], strict=True)


def test_missing_plugin_module_is_unavailable():
    reg = discover(["no_such_plugin_module_xyz"])
    assert reg.unavailable[0].source == "plugin module no_such_plugin_module_xyz"


def test_duplicate_ids_name_both_sources(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(PLUGIN)
    b.write_text(PLUGIN)
    with pytest.raises(PluginError, match=r"duplicate rule id 'plugin-neg-neg': defined by plugin file .*a\.py and by plugin file .*b\.py"):
        discover([str(a), str(b)])


def test_plugin_path_that_is_not_a_file_is_an_error(tmp_path):
    with pytest.raises(PluginError, match="plugin file not found: .*missing_rules.py"):
        discover([str(tmp_path / "missing_rules.py")])
    with pytest.raises(PluginError, match="plugin file not found"):
        discover([str(tmp_path)])  # an existing folder is a path too, not a module name


def test_plugin_raising_plugin_error_or_interrupt_is_not_swallowed(tmp_path):
    f = tmp_path / "refuses.py"
    f.write_text("from rewriter.errors import PluginError\nraise PluginError('this plugin needs a newer onnx-rewrite')\n")
    with pytest.raises(PluginError, match="^this plugin needs a newer onnx-rewrite$"):
        discover([str(f)])
    f.write_text("raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        discover([str(f)])
    f.write_text("raise SystemExit(3)\n")  # any other BaseException: the plugin is unavailable
    assert [(u.source, u.error) for u in discover([str(f)]).unavailable] == [(f"plugin file {f}", "SystemExit: 3")]


def test_entry_points_may_name_a_rule_class_a_list_or_a_module_built_in_first(tmp_path, monkeypatch):
    (tmp_path / "ep_rules_mod.py").write_text(PLUGIN + "\nALL = [NegNegToIdentity]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    group = "onnx_rewrite.rules.test"
    found = [
        EntryPoint("listed", "ep_rules_mod:ALL", group),
        EntryPoint("builtin", "rewriter.rules", group),
        EntryPoint("a_class", "ep_rules_mod:NegNegToIdentity", group),
        EntryPoint("module", "ep_rules_mod", group),
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep for ep in found if ep.group == group])
    reg = discover(entry_point_group=group)
    # One rule from three plugins (the same class: no duplicate); the built-ins load first.
    first = next(iter(reg.rules.values()))
    assert first.source == "built-in"
    assert reg.rules["plugin-neg-neg"].source == "plugin ? (a_class)"
    assert not reg.unavailable
    found[2] = EntryPoint("a_class", "ep_rules_mod:NoSuchName", group)
    reg = discover(entry_point_group=group)
    assert [u.source for u in reg.unavailable] == ["plugin ? (a_class)"]
    assert reg.rules["plugin-neg-neg"].source == "plugin ? (listed)"


def test_unknown_rule_id_is_input_error():
    with pytest.raises(InputError, match="unknown rule id"):
        discover().select(["no-such-rule"])


def test_selection_by_direction():
    reg = discover()
    default = {r.id for r in reg.select()}
    assert default == {i.id for i in reg.rules.values() if i.rule.default}
    to_conv = reg.select(direction="to-conv")
    assert all(r.direction in ("to-conv", "cleanup") for r in to_conv)
    assert {r.id for r in reg.select(exclude=sorted(default)[:1])} == default - set(sorted(default)[:1])


def test_example_plugin_package_installs_and_runs(tmp_path):
    """pip-installs examples/plugin_package into a private target and uses it through its entry point.
    pip builds a copy of the package (setuptools writes build/ and *.egg-info/ beside the sources it
    builds: never into the checkout)."""
    package = tmp_path / "plugin_package"
    shutil.copytree(REPO / "examples" / "plugin_package", package, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(package)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    listing = subprocess.run([sys.executable, "-m", "rewriter", "rules"], env=env, capture_output=True, text=True, check=True)
    assert "example-double-relu" in listing.stdout
    assert "plugin onnx-rewrite-example (example)" in listing.stdout
    script = textwrap.dedent(
        """
        import numpy as np, onnx
        from onnx import helper, TensorProto
        import rewriter
        g = helper.make_graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
        r = rewriter.optimize(m, rules=["example-double-relu"])
        print([(x.rule, x.status) for x in r.report.rewrites], [n.op_type for n in r.model.graph.node])
        """
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[('example-double-relu', 'applied')] ['Relu']"


# --- issue 23: plugin authors ---------------------------------------------------------------------

DEFAULT_ON = PLUGIN.replace("    default = False\n", "")  # a plugin rule that does not say default = False


def test_a_named_rule_whose_plugin_failed_to_import_reports_that_plugins_error(tmp_path, capsys):
    from helpers import cli

    f = tmp_path / "broken.py"
    f.write_text(PLUGIN.replace("def pattern(self, p):", "def pattern(self, p)"))  # a SyntaxError
    with pytest.raises(PluginError, match=r"unknown rule id\(s\): plugin-neg-neg, and plugin file .*broken.py failed to load: SyntaxError"):
        discover([str(f)]).select(["plugin-neg-neg"])
    code, _, err = cli(capsys, REPO / "tests/fixtures/torch/method1_ts.onnx", "--plugin", f, "--rules", "plugin-neg-neg", "--dry-run")
    assert code == 3 and "SyntaxError" in err and "broken.py failed to load" in err
    with pytest.raises(InputError, match="unknown rule id"):  # nothing failed to load: an unknown id is a usage error
        discover().select(["plugin-neg-neg"])


def test_plugin_rules_are_opt_in(tmp_path):
    """A plugin rule joins no policy by itself (default, --direction, tuning): installing a plugin
    package changes no run; --rules names it; a source with JOIN_DEFAULT_POLICY = True joins."""
    f = tmp_path / "plugin_on.py"
    f.write_text(DEFAULT_ON)
    reg = discover([str(f)])
    info = reg.rules["plugin-neg-neg"]
    assert info.rule.default is True and info.opt_in and not info.default
    for direction in ("default", "to-matmul"):
        assert "plugin-neg-neg" not in {r.id for r in reg.select(direction=direction)}
    assert [r.id for r in reg.select(["plugin-neg-neg"])] == ["plugin-neg-neg"]
    assert all(not i.opt_in for i in reg.rules.values() if i.source == "built-in")
    joined = tmp_path / "plugin_joined.py"
    joined.write_text(DEFAULT_ON.replace("class NegNeg", "JOIN_DEFAULT_POLICY = True\n\nclass NegNeg"))
    reg = discover([str(joined)])
    assert not reg.rules["plugin-neg-neg"].opt_in and "plugin-neg-neg" in {r.id for r in reg.select()}


def test_rules_listing_says_opt_in(tmp_path, capsys):
    from helpers import cli

    f = tmp_path / "plugin_on.py"
    f.write_text(DEFAULT_ON)
    code, out, err = cli(capsys, "rules", "--plugin", f)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("plugin-neg-neg "))
    assert line.split()[1:4] == ["plugin-neg-neg", "to-matmul", "opt-in"]


PATTERN_TYPO = '''
from rewriter import Rule

class MulTypo(Rule):
    """Mull(x, c) -> x"""
    id = "plugin-mul-typo"
    def pattern(self, p):
        return p.op("Mull", p.var("x"), p.const("c"))
    def rewrite(self, b, m):
        return m["x"]

class ReluTwoInputs(Rule):
    """Relu(x, y) -> x"""
    id = "plugin-relu-two"
    def pattern(self, p):
        return p.op("Relu", p.var("x"), p.var("y"))
    def rewrite(self, b, m):
        return m["x"]
'''


def test_a_pattern_that_can_never_match_is_warned_at_load(tmp_path, capsys):
    from helpers import cli

    from rewriter.errors import RuleWarning

    f = tmp_path / "typo.py"
    f.write_text(PATTERN_TYPO)
    with pytest.warns(RuleWarning) as caught:
        reg = discover([str(f)])
    texts = [str(w.message) for w in caught]
    assert any("rule 'plugin-mul-typo': pattern op 'Mull' is no ONNX operator (did you mean 'Mul'?)" in t for t in texts), texts
    assert any("rule 'plugin-relu-two': pattern requires 2 inputs of 'Relu'; it takes at most 1: it matches nothing" in t for t in texts), texts
    assert set(reg.rules) >= {"plugin-mul-typo", "plugin-relu-two"} and len(reg.warnings) == 2  # they load all the same
    code, _, err = cli(capsys, REPO / "tests/fixtures/torch/method1_ts.onnx", "--plugin", f, "--rules", "plugin-mul-typo", "--dry-run")
    assert code == 0 and "warning: plugin file" in err and "'Mull' is no ONNX operator" in err, err


def test_builtin_patterns_raise_no_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg = discover()
    assert reg.warnings == []
