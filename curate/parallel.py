"""Work over a stream of batches on a few threads, results in input order.

The stages' batch work is Polars, Arrow and numpy calls that release the GIL, with a little Python glue
between them: on threads, two batches keep two cores busy. Items are pulled from the input only as
slots free up, so at most `workers + 1` batches are in memory at once, whatever the input's length."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_map(function: Callable[[Item], Result], items: Iterable[Item], workers: int, name: str) -> Iterator[Result]:
    """`function(item)` for each item, `workers` at a time on threads named `name`, yielded in input
    order. The input is read on the caller's thread (it may be a generator doing I/O); an exception in
    `function` reaches the caller when its result is due, and the items not yet started are never run."""
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        in_flight: deque = deque()
        try:
            for item in items:
                in_flight.append(pool.submit(function, item))
                del item  # the future holds it until done; nothing else should
                if len(in_flight) > workers:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:  # a failure or an abandoned generator: queued work is not started
                future.cancel()
