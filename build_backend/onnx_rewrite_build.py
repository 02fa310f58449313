"""The project's build backend: setuptools' own, plus one file in editable installs.

With ``rewriter.rules`` in ``rules/`` (``package-dir`` in pyproject.toml), setuptools installs
this project in editable mode (``pip install -e .``) through an import hook, and type checkers
and IDEs (mypy, pyright, Pylance) run no import hooks: they would not find ``rewriter`` at all
(``Cannot find implementation or library stub for module named "rewriter"``). So the editable
wheel gets one more file, ``onnx_rewrite_source.pth``, naming a static folder that holds only
``rewriter`` (a link to the project's ``rewriter/``, made in ``build/typed/``), where type
checkers find it and its ``py.typed``. The project folder itself is not put on the path: that
would make its ``rules/`` and ``tests/`` importable as top-level modules (``rules`` would shadow
the PyPI package of that name). Python finds ``rewriter`` there too (the same files);
``rewriter.rules`` still comes through setuptools' hook. Where no link can be made (Windows
without the privilege), the wheel is setuptools' own. Every other hook (wheel, sdist, metadata)
is setuptools' own, unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook as setuptools defines it; build_editable below)

PTH = "onnx_rewrite_source.pth"


def build_editable(wheel_directory: str, config_settings: dict[str, Any] | None = None, metadata_directory: str | None = None) -> str:
    name: str = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    typed = typed_folder(Path.cwd())  # PEP 517 runs the hooks in the project folder
    if typed is not None:
        add_path_file(Path(wheel_directory) / name, typed)
    return name


def typed_folder(project: Path) -> Path | None:
    """``project/build/typed``, holding one link, ``rewriter`` -> ``project/rewriter``; None when
    the link cannot be made."""
    folder = project.resolve() / "build" / "typed"
    link = folder / "rewriter"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..", "..", "rewriter"), target_is_directory=True)
    except OSError:
        return None
    return folder


def add_path_file(wheel: Path, folder: Path) -> None:
    """Add :data:`PTH`, holding ``folder``, to ``wheel`` and to its RECORD (rewritten last)."""
    line = f"{folder.resolve()}\n".encode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(line).digest()).rstrip(b"=").decode()
    staged = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(staged, "w", zipfile.ZIP_DEFLATED) as dst:
        record = next(i for i in src.infolist() if i.filename.endswith(".dist-info/RECORD"))
        for item in src.infolist():
            if item is not record:
                dst.writestr(item, src.read(item))
        dst.writestr(PTH, line)
        rows = src.read(record).decode().rstrip("\n")
        dst.writestr(record, f"{rows}\n{PTH},sha256={digest},{len(line)}\n")
    os.replace(staged, wheel)
