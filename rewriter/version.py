"""The installed onnx-rewrite version (a module of its own so every layer can read it without
importing the package's public API)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("onnx-rewrite")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
