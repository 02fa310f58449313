"""Python's cyclic garbage collector, paused around work that allocates many objects and no cycles.

Each collection of the oldest generation walks every tracked object; a 50,000-node model's
graph, checks and region cut allocate hundreds of thousands of them (lists of names, graph
objects), and the collections their allocation triggered walked them again and again -- about
0.5 s of a 50,000-node run, for no garbage: those objects are freed by reference counting.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

__all__ = ["collector_paused"]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector off for the block (its previous state restored after). Use it only
    where what the block leaves behind is freed by reference counting (no reference cycles)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
