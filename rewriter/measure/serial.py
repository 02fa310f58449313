"""Measuring one process at a time: timings taken while another process measures are not worth having.

When ``$ONNX_REWRITE_MEASURE_LOCK`` names a file, every measuring step of a run (choosing the
workload shape, per-site tuning, the benchmark and acceptance check) holds an exclusive lock on
it (:mod:`rewriter.engine.filelock`), so runs that share the file take turns to measure while
their other steps (rewriting, verification) go on in parallel. ``onnx-rewrite`` batch mode sets
it for its workers when it runs more than one at a time; anyone starting runs in parallel can.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

from rewriter.engine.filelock import exclusive_lock

__all__ = ["MEASURE_LOCK_ENV", "measuring"]

MEASURE_LOCK_ENV = "ONNX_REWRITE_MEASURE_LOCK"


@contextlib.contextmanager
def measuring(progress: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the measuring lock named by ``$ONNX_REWRITE_MEASURE_LOCK`` (nothing when unset)."""
    path = os.environ.get(MEASURE_LOCK_ENV)
    if not path:
        yield
        return
    say = progress or (lambda _msg: None)
    with exclusive_lock(path, on_wait=lambda: say("waiting for another run to finish measuring")):
        yield
