"""Running a function over items on a few threads, in order, with a bounded window.

Shared by the chunk pipeline (ckptstore/chunkio.py), the manifest readers and gc's mark, so
it lives in the bottom layer: it imports nothing of the package.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """`fn` over `items` on `threads` threads, at most 2x`threads` in flight; results in order."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    window = 2 * threads
    with cf.ThreadPoolExecutor(threads, thread_name_prefix="ckptstore-io") as pool:
        pending: list[cf.Future[R]] = []
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for future in pending:
                future.cancel()
