"""The README's install, as type checkers see it: ``pip install -e .`` (setuptools' import hook,
since ``rewriter.rules`` lives in ``rules/``) plus the static path the project's build backend
adds (build_backend/onnx_rewrite_build.py), so that mypy finds ``rewriter`` and its py.typed;
and the extras the README names."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _backend():
    spec = importlib.util.spec_from_file_location("onnx_rewrite_build", REPO / "build_backend" / "onnx_rewrite_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_project(dest: Path) -> Path:
    """What an editable build reads, copied (a build writes egg-info and build/ into the project
    folder: never into this source tree)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("rewriter", "rules", "build_backend"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _build_editable(project: Path, out: Path) -> Path:
    """The editable wheel pip builds for `pip install -e .`, built by the project's backend."""
    code = ("import sys; sys.path.insert(0, 'build_backend'); import onnx_rewrite_build as b; "
            f"print(b.build_editable({str(out)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / proc.stdout.strip().splitlines()[-1]


def test_pyproject_names_the_backend_and_the_extras():
    tomllib = pytest.importorskip("tomllib", reason="Python < 3.11: would read pyproject.toml's build backend and extras")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["build-system"]["build-backend"] == "onnx_rewrite_build"
    assert meta["build-system"]["backend-path"] == ["build_backend"]
    extras = meta["project"]["optional-dependencies"]
    assert any(r.startswith("onnx-ir") for r in extras["ir"])
    assert any(r.startswith("onnx-ir") for r in extras["test"]), "the test extra must bring the [ir] extra's onnx-ir"
    assert "build_backend/onnx_rewrite_build.py" in (REPO / "MANIFEST.in").read_text()  # an sdist builds too


def test_path_file_is_added_with_its_record_entry(tmp_path):
    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("x.pth", "import finder\n")
        z.writestr("x-1.0.dist-info/RECORD", "x.pth,sha256=abc,14\nx-1.0.dist-info/RECORD,,\n")
    _backend().add_path_file(wheel, tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        line = z.read("onnx_rewrite_source.pth")
        record = z.read("x-1.0.dist-info/RECORD").decode().splitlines()
    assert line == f"{tmp_path.resolve()}\n".encode()
    assert names[-1] == "x-1.0.dist-info/RECORD"
    digest = base64.urlsafe_b64encode(hashlib.sha256(line).digest()).rstrip(b"=").decode()
    assert record[-1] == f"onnx_rewrite_source.pth,sha256={digest},{len(line)}"
    assert record[:2] == ["x.pth,sha256=abc,14", "x-1.0.dist-info/RECORD,,"]


def test_the_typed_folder_holds_only_rewriter(tmp_path):
    (tmp_path / "rewriter").mkdir()
    (tmp_path / "rules").mkdir()
    folder = _backend().typed_folder(tmp_path)
    assert folder == tmp_path.resolve() / "build" / "typed"
    assert [p.name for p in folder.iterdir()] == ["rewriter"]
    assert (folder / "rewriter").resolve() == (tmp_path / "rewriter").resolve()
    assert _backend().typed_folder(tmp_path) == folder  # a second build replaces the link


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed (test extra): would type-check a file importing rewriter after an editable install")
def test_mypy_finds_rewriter_after_an_editable_install(tmp_path):
    """The editable wheel installed into a fresh environment (a wheel's files land in
    site-packages as they are): mypy, run for that interpreter, resolves `import rewriter` and
    its types (it used to say: Cannot find implementation or library stub for module named "rewriter")."""
    project = _copy_project(tmp_path / "project")
    wheel = _build_editable(project, tmp_path / "dist")
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    typed = Path((site / "onnx_rewrite_source.pth").read_text().strip())
    assert typed == (project / "build" / "typed").resolve()
    assert sorted(p.name for p in typed.iterdir()) == ["rewriter"]  # no top-level `rules` or `tests` on the path
    assert (typed / "rewriter").resolve() == (project / "rewriter").resolve()
    found = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('rules'), u.find_spec('rewriter').origin)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()
    assert found[0] == "None" and Path(found[1]).resolve() == (project / "rewriter" / "__init__.py").resolve()
    probe = tmp_path / "two.py"
    probe.write_text("import rewriter\nresult: rewriter.Result = rewriter.optimize('m.onnx', verify=False)\n")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--python-executable", str(python), "--cache-dir", str(tmp_path / "cache"),
                           "--no-incremental", str(probe)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0 and "Success" in proc.stdout, proc.stdout[-3000:]
    typo = tmp_path / "typo.py"
    typo.write_text("import rewriter\nrewriter.optimize('m.onnx', verfy=False)\n")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--python-executable", str(python), "--cache-dir", str(tmp_path / "cache"),
                           "--no-incremental", str(typo)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 1 and 'Unexpected keyword argument "verfy"' in proc.stdout, proc.stdout[-3000:]
