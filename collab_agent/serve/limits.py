"""Admission: a bounded queue in front of a bounded number of conversations in flight.

`Admission.reserve` decides at once (429 when the queue or the key's share is full); the
`Ticket` it returns waits for a slot and gives everything back when closed, whatever happened.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import anyio

from collab_agent.serve.errors import APIError


@dataclass
class Admission:
    """Caps: ``max_in_flight`` at once, ``max_queued`` waiting, ``max_per_key`` of one key
    (in flight and waiting together). Without keys (``key=None``) only the server's caps hold:
    every caller would otherwise share one key's share."""

    max_in_flight: int
    max_queued: int
    max_per_key: int
    retry_after_s: int = 1
    in_flight: int = 0
    queued: int = 0
    per_key: Counter[str] = field(default_factory=Counter)
    _slots: anyio.Semaphore | None = None

    @property
    def slots(self) -> anyio.Semaphore:
        if self._slots is None:  # made in the server's event loop
            self._slots = anyio.Semaphore(self.max_in_flight)
        return self._slots

    def reserve(self, key: str | None) -> Ticket:
        """A place in line for ``key``, or `APIError` 429 with ``Retry-After``."""
        if key is not None and self.per_key[key] >= self.max_per_key:
            raise self._full(f"this API key already has {self.max_per_key} requests in flight")
        if self.in_flight + self.queued >= self.max_in_flight + self.max_queued:
            raise self._full(
                f"the server is busy ({self.in_flight} in flight, {self.queued} queued)"
            )
        if key is not None:
            self.per_key[key] += 1
        self.queued += 1
        return Ticket(self, key)

    def _full(self, why: str) -> APIError:
        return APIError(
            429,
            f"{why}; retry after {self.retry_after_s}s",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(self.retry_after_s)},
        )


@dataclass
class Ticket:
    """One request's place: `wait` for a slot, `close` (always) to give it back."""

    admission: Admission
    key: str | None
    state: str = "queued"

    async def wait(self) -> None:
        if self.state != "queued":
            return
        await self.admission.slots.acquire()
        self.admission.queued -= 1
        self.admission.in_flight += 1
        self.state = "running"

    def close(self) -> None:
        admission = self.admission
        if self.state == "queued":
            admission.queued -= 1
        elif self.state == "running":
            admission.in_flight -= 1
            admission.slots.release()
        else:
            return
        self.state = "closed"
        if self.key is not None:
            admission.per_key[self.key] -= 1
            if admission.per_key[self.key] <= 0:
                del admission.per_key[self.key]
