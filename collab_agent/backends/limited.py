"""A backend with bounded, fair concurrency: `FairLimiter` and `LimitedBackend`.

- `FairLimiter`: at most ``capacity`` calls in flight; waiting calls are served round-robin
  across conversations (FIFO within one), so one busy conversation cannot starve the others;
  at most ``max_waiting`` callers wait, further ones get `OverloadedError` at once
  (backpressure instead of an unbounded queue).
- `LimitedBackend`: any `Backend` behind a `FairLimiter` keyed on the conversation id: a remote
  backend never opens more than ``capacity`` connections, and the server batches those.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from collab_agent import _checks
from collab_agent.backends.base import Backend, GenerateRequest, Generation, release_conversation
from collab_agent.errors import BackendError, ConfigError, OverloadedError

__all__ = ["FairLimiter", "LimitedBackend"]


@dataclass(eq=False)
class _Waiter:
    """One caller waiting for a slot, woken on its own event loop (which may run in another
    thread than the caller of `FairLimiter.release`)."""

    loop: asyncio.AbstractEventLoop
    event: asyncio.Event
    granted: bool = False

    def wake(self) -> bool:
        """Set the event on the waiter's loop; False when that loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:  # the loop is closed: nobody will take the slot
            return False
        return True


class FairLimiter:
    """At most ``capacity`` holders at once; waiters served round-robin across keys.

    Keys are usually conversation ids. A waiter that is cancelled leaves the queue (or passes
    its slot on, if it was granted one meanwhile), so cancellation never leaks capacity.

    One limiter may be shared by every thread and event loop of the process (sync ``invoke``
    from 20 threads, ``batch``, ``asyncio.run`` per request): its state is guarded by a
    thread lock, and a waiter is woken on its own loop. ``capacity`` is thus a process-wide cap.

    Args:
        capacity: most holders at once (e.g. concurrent requests to one server).
        max_waiting: most callers waiting for a slot; one more raises `OverloadedError`
            (``None``: unbounded).

    Attributes:
        in_use: slots held now.
        peak_in_use: the most slots ever held at once (for tests and benchmarks).
    """

    def __init__(self, capacity: int, *, max_waiting: int | None = None) -> None:
        _checks.positive_int("capacity", capacity)
        if max_waiting is not None:
            _checks.non_negative_int("max_waiting", max_waiting)
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.in_use = 0
        self.peak_in_use = 0
        self._queues: OrderedDict[Hashable, deque[_Waiter]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot."""
        with self._lock:
            return self._waiting()

    def _waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def acquire(self, key: Hashable = None) -> None:
        """Wait for a slot (round-robin across keys).

        Raises:
            OverloadedError: ``max_waiting`` callers already wait.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        with self._lock:
            if self.in_use < self.capacity and not self._queues:
                self._take()
                return
            waiting = self._waiting()
            if self.max_waiting is not None and waiting >= self.max_waiting:
                raise OverloadedError(
                    f"{waiting} calls already wait for one of {self.capacity} slots "
                    f"(max_waiting={self.max_waiting}); retry later or raise max_waiting"
                )
            waiter = _Waiter(asyncio.get_running_loop(), asyncio.Event())
            self._queues.setdefault(key, deque()).append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            with self._lock:
                granted = waiter.granted
                if not granted:
                    queue = self._queues.get(key)
                    if queue is not None and waiter in queue:
                        queue.remove(waiter)
                        if not queue:
                            del self._queues[key]
            if granted:
                self.release()  # granted while being cancelled: pass the slot on
            raise

    def release(self) -> None:
        """Give a slot back; the next key in round-robin order gets it (on any thread)."""
        while True:
            with self._lock:
                if self.in_use <= 0:
                    raise BackendError("FairLimiter.release() called more often than acquire()")
                self.in_use -= 1
                if not self._queues:
                    return
                key, queue = next(iter(self._queues.items()))
                waiter = queue.popleft()
                del self._queues[key]
                if queue:
                    self._queues[key] = queue  # the key goes to the back of the round
                self._take()
                waiter.granted = True
            if waiter.wake():
                return
            # that waiter's loop is gone: give the slot to the next one

    @asynccontextmanager
    async def slot(self, key: Hashable = None) -> AsyncIterator[None]:
        """``async with limiter.slot(conversation_id): ...`` holds one slot."""
        await self.acquire(key)
        try:
            yield
        finally:
            self.release()

    def _take(self) -> None:
        self.in_use += 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)


@dataclass
class LimitedBackend:
    """Any `Backend` with at most ``capacity`` calls in flight, served fairly across
    conversations, and bounded waiting (backpressure).

    Use it around remote backends (`OpenAIBackend`): ``abatch`` of 1,000 inputs opens at most
    ``capacity`` connections and the server batches them. Other attributes (``score``, ...)
    are those of the wrapped backend.

    Attributes:
        backend: the wrapped backend.
        capacity: most concurrent ``generate`` calls (default 16).
        max_waiting: most calls waiting for a slot before `OverloadedError` (default unbounded).
        limiter: the `FairLimiter` (built from the two fields above).
    """

    backend: Backend
    capacity: int = 16
    max_waiting: int | None = None
    limiter: FairLimiter = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.backend, Backend):
            raise ConfigError("backend", "must be a Backend with a name and an async generate()")
        self.limiter = FairLimiter(self.capacity, max_waiting=self.max_waiting)

    @property
    def name(self) -> str:
        return self.backend.name

    async def generate(self, request: GenerateRequest) -> Generation:
        """``backend.generate(request)`` once a slot is free."""
        async with self.limiter.slot(request.conversation_id):
            return await self.backend.generate(request)

    async def release(self, conversation_id: str) -> None:
        """Free the conversation's state on the wrapped backend (not limited)."""
        await release_conversation(self.backend, conversation_id)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("backend", "limiter"):
            raise AttributeError(name)
        return getattr(self.backend, name)
