"""A circuit breaker for the large model: stop paying timeouts to a server that is down.

With ``on_large_unavailable="degrade"`` each large step first waits out the backend's timeout and
retries before the small model writes it; on a stalled server that is minutes per step. After
``threshold`` consecutive unavailable errors the breaker *opens*: large steps degrade at once,
without a request, for ``cooldown_s`` seconds. Then one call may *probe* the server (half-open):
its success closes the breaker, its failure opens it for another cool-down.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from collab_agent import _checks

BreakerState = Literal["closed", "open", "half-open"]


@dataclass
class CircuitBreaker:
    """Degrade at once while the large model is known to be down; probe again after a pause.

    Thread-safe: one breaker is shared by every call of a chat model, from any thread or loop.

    Attributes:
        threshold: consecutive unavailable errors that open the breaker (default 3).
        cooldown_s: seconds it stays open before one probe call is let through (default 30).
        clock: the time source (``time.monotonic``; tests pass their own).
        opened: how many times it has opened (for traces and benchmarks).
    """

    threshold: int = 3
    cooldown_s: float = 30.0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    opened: int = 0
    _failures: int = field(default=0, init=False, repr=False)
    _open_until: float | None = field(default=None, init=False, repr=False)
    _probing: float | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        _checks.positive_int("threshold", self.threshold)
        _checks.in_range("cooldown_s", self.cooldown_s, 0.0, 86400.0)

    def __deepcopy__(self, memo: dict[int, object]) -> CircuitBreaker:
        """A copy has the same settings and starts closed (a copied chat model, a pickled one)."""
        return CircuitBreaker(self.threshold, self.cooldown_s, self.clock)

    def __reduce__(self) -> tuple[object, ...]:
        return (CircuitBreaker, (self.threshold, self.cooldown_s, self.clock))

    @property
    def state(self) -> BreakerState:
        """``closed`` (calls go through), ``open`` (calls degrade at once) or ``half-open``
        (the cool-down is over: the next call probes the server)."""
        with self._lock:
            return self._state()

    def _state(self) -> BreakerState:
        if self._open_until is None:
            return "closed"
        now = self.clock()
        if now < self._open_until:
            return "open"
        if self._probing is not None and now < self._probing + self.cooldown_s:
            return "open"  # a probe is out (one that never reports back frees it in time)
        return "half-open"

    def allow(self) -> bool:
        """Whether a call may go to the large model now (a half-open breaker lets one through)."""
        with self._lock:
            state = self._state()
            if state == "closed":
                return True
            if state == "half-open":
                self._probing = self.clock()
                return True
            return False

    def success(self) -> None:
        """The large model answered: close the breaker."""
        with self._lock:
            self._failures, self._open_until, self._probing = 0, None, None

    def failure(self) -> None:
        """The large model stayed unavailable: count it; open the breaker at the threshold (or
        at once when a probe failed)."""
        with self._lock:
            self._failures += 1
            probe_failed = self._probing is not None
            if probe_failed or self._failures >= self.threshold:
                if self._open_until is None or probe_failed:
                    self.opened += 1
                self._open_until = self.clock() + self.cooldown_s
                self._probing = None


__all__ = ["BreakerState", "CircuitBreaker"]
