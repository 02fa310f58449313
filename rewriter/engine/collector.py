"""Python's cyclic garbage collector, paused around work that allocates many objects and no
cycles; and the freeing of a rewrite's graph, now or -- in a process about to end -- never.

Each collection of the oldest generation walks every tracked object; a 50,000-node model's
graph, checks and region cut allocate hundreds of thousands of them (lists of names, graph
objects), and the collections their allocation triggered walked them again and again -- about
0.5 s of a 50,000-node run, for no garbage: those objects are freed by reference counting.

A rewrite's graph is the exception: every onnx-graphsurgeon node and tensor is a reference
cycle, so it is taken apart to be freed (about 0.5 s at 50,000 nodes). The command line ends
its process without the interpreter's teardown (:func:`rewriter.cli.main`); there
:func:`defer_freeing` holds each graph until the next rewrite starts and the last one until
the process ends, kept out of the collector's walks.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterator

__all__ = ["collector_paused", "defer_freeing", "free_retired", "retire"]

_deferring = False
_retired: list[Callable[[], None]] = []


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


def defer_freeing(on: bool = True) -> None:
    """From now on :func:`retire` holds what it is given until :func:`free_retired` (the next
    rewrite) instead of freeing it. Only for a process that ends with ``os._exit``: the last
    graph is never freed, and every object alive when a graph is retired is frozen out of the
    collector for good (``gc.freeze``). ``on=False`` frees what is held and stops deferring."""
    global _deferring
    _deferring = on
    if not on:
        free_retired()


def retire(free: Callable[[], None]) -> None:
    """``free()`` takes a graph apart: call it now, or, while deferring, hold it (the graph
    stays alive, frozen out of the collector's walks) until :func:`free_retired`."""
    if not _deferring:
        free()
        return
    free_retired()
    _retired.append(free)
    gc.freeze()  # the held graph is not garbage: no collection need walk it


def free_retired() -> None:
    """Free the graph :func:`retire` holds, if any (before a new one is built: one at a time)."""
    while _retired:
        _retired.pop()()
