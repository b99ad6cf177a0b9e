"""Bounded fan-out for many conversations at once: `map_limited`.

Apps call the model from many requests at once (``abatch``, concurrent ``ainvoke``, LangGraph
fan-out). `map_limited` runs ``abatch`` of 1,000 inputs with ``max_concurrency`` workers pulling
from the inputs, so at most that many conversations (and their KV caches) are alive at once.
A backend's own calls are bounded by `collab_agent.backends.limited` (`FairLimiter`,
`LimitedBackend`, re-exported here), and the local batched backend
(`collab_agent.backends.batching`) bounds its own batch and caches.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, TypeVar, overload

import anyio

from collab_agent import _checks
from collab_agent.backends.limited import FairLimiter, LimitedBackend
from collab_agent.errors import OverloadedError

T = TypeVar("T")
R = TypeVar("R")


@overload
async def map_limited(
    func: Callable[[T], Awaitable[R]],
    items: Iterable[T],
    *,
    max_concurrency: int,
    return_exceptions: Literal[False] = False,
) -> list[R]: ...


@overload
async def map_limited(
    func: Callable[[T], Awaitable[R]],
    items: Iterable[T],
    *,
    max_concurrency: int,
    return_exceptions: Literal[True],
) -> list[R | Exception]: ...


async def map_limited(
    func: Callable[[T], Awaitable[R]],
    items: Iterable[T],
    *,
    max_concurrency: int,
    return_exceptions: bool = False,
) -> list[R] | list[R | Exception]:
    """``[await func(x) for x in items]`` with at most ``max_concurrency`` calls at once.

    ``max_concurrency`` workers pull from ``items`` in order, so 1,000 inputs never start 1,000
    conversations (nor hold 1,000 KV caches) at once. Results keep the input order.

    Args:
        func: the coroutine function (e.g. a chat model's ``ainvoke``).
        items: the inputs; consumed lazily.
        max_concurrency: most calls in flight.
        return_exceptions: put each failure in its place in the result (LangChain's
            ``abatch(return_exceptions=True)``) instead of cancelling the rest and raising it.
    """
    _checks.positive_int("max_concurrency", max_concurrency)
    source = enumerate(items)
    results: dict[int, Any] = {}

    async def worker() -> None:
        for index, item in source:  # workers share one iterator: each item is taken once
            try:
                results[index] = await func(item)
            except Exception as exc:
                if not return_exceptions:
                    raise
                results[index] = exc

    try:
        async with anyio.create_task_group() as group:
            for _ in range(max_concurrency):
                group.start_soon(worker)
    except BaseExceptionGroup as group_exc:
        first = _first_leaf(group_exc)
        if first is not None:
            raise first from group_exc
        raise
    return [results[i] for i in range(len(results))]


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException | None:
    """The first non-cancellation exception inside (nested) groups."""
    cancelled = anyio.get_cancelled_exc_class()
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaf = _first_leaf(exc)
            if leaf is not None:
                return leaf
        elif not isinstance(exc, cancelled):
            return exc
    return None


__all__ = ["FairLimiter", "LimitedBackend", "OverloadedError", "map_limited"]
