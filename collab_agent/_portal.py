"""Sync calls into async code without blocking (or needing) the caller's event loop.

LangChain's sync API (``invoke``, ``stream``, ``batch``) must work inside Jupyter, where an event
loop already runs in the calling thread, so ``asyncio.run`` is not an option. Each sync call opens
an anyio blocking portal: an event loop in a worker thread that lives exactly as long as the call
(structured: nothing is left running afterwards), and drives the coroutine or async iterator
there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

from anyio.from_thread import start_blocking_portal

T = TypeVar("T")

_DONE: Any = object()


async def _next(iterator: AsyncIterator[T]) -> T:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return _DONE  # type: ignore[no-any-return]


def run_sync(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``await func(*args)`` to completion on a fresh portal and return its result."""
    with start_blocking_portal() as portal:
        return portal.call(func, *args)  # type: ignore[arg-type]


def iterate_sync(factory: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
    """Iterate the async iterator ``factory()`` from sync code, one item per portal call.

    The iterator is created, advanced and closed on the portal's loop; leaving the ``for`` loop
    early (``break``, an exception, garbage collection) closes it there, so its ``finally``
    blocks (cache release) run before this function returns.
    """
    with start_blocking_portal() as portal:

        async def create() -> AsyncIterator[T]:
            return factory()

        iterator = portal.call(create)
        try:
            while True:
                item = portal.call(_next, iterator)
                if item is _DONE:
                    return
                yield item
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                portal.call(aclose)
