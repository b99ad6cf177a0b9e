"""Sync calls into async code without blocking (or needing) the caller's event loop.

LangChain's sync API (``invoke``, ``stream``, ``batch``) must work inside Jupyter, where an event
loop already runs in the calling thread, so ``asyncio.run`` is not an option. Each sync call opens
an anyio blocking portal: an event loop in a worker thread that lives exactly as long as the call
(structured: nothing is left running afterwards), and drives the coroutine or async iterator
there.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

T = TypeVar("T")

_DONE: Any = object()


async def _next(iterator: AsyncIterator[T]) -> T:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return _DONE  # type: ignore[no-any-return]


def run_sync(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``await func(*args)`` to completion on a fresh portal and return its result.

    Ctrl-C (or any exception raised in the calling thread) cancels the call on the portal and
    waits for it to unwind before the exception propagates."""
    with start_blocking_portal() as portal:
        return _call(portal, func, *args)


def _call(portal: BlockingPortal, func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``portal.call(func, *args)``, except that an exception in this thread while it waits
    (``KeyboardInterrupt``) cancels the task and waits for it to end, so that nothing still
    runs on the portal (e.g. an async generator's ``__anext__``) when the caller cleans up."""
    ended = threading.Event()

    async def tracked() -> T:
        try:
            return await func(*args)
        finally:
            ended.set()

    future = portal.start_task_soon(tracked)
    try:
        return future.result()
    except BaseException:
        if not future.done():
            future.cancel()  # the portal cancels the task's scope
            ended.wait(_UNWIND_S)
        raise


_UNWIND_S = 10.0
"""How long an interrupted sync call waits for its task to unwind on the portal."""


def iterate_sync(factory: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
    """Iterate the async iterator ``factory()`` from sync code, one item per portal call.

    The iterator is created, advanced and closed on the portal's loop; leaving the ``for`` loop
    early (``break``, an exception, Ctrl-C, garbage collection) closes it there, so its
    ``finally`` blocks (cache release) run before this function returns.
    """
    with start_blocking_portal() as portal:

        async def create() -> AsyncIterator[T]:
            return factory()

        iterator = portal.call(create)
        try:
            while True:
                item = _call(portal, _next, iterator)
                if item is _DONE:
                    return
                yield item
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                portal.call(aclose)
