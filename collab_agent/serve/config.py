"""What one server serves and how many at once: the policies by name, keys, caps and limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from collab_agent import _checks, defaults
from collab_agent.errors import ConfigError
from collab_agent.policies.base import Policy

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass
class ServeConfig:
    """Settings of one server.

    Attributes:
        policies: the policies a request's ``model`` field may name (``GET /v1/models`` lists
            them); never code from a request.
        api_keys: bearer keys a request must present (empty: no auth, loopback only).
        host: the address bound; no keys are allowed only on a loopback address.
        max_in_flight: conversations reasoning at once (default 64).
        max_queued: requests waiting for a slot beyond those; past it, 429 (default 256).
        max_per_key: a key's requests in flight or waiting; past it, 429 (default 32; no cap
            without keys, where every caller would share one share).
        max_body_bytes: the largest request body; past it, 413 (default 1 MiB).
        retry_after_s: the ``Retry-After`` of a 429, in seconds.
        grace_s: on SIGTERM, how long in-flight requests may finish before they are cancelled.
        temperature: sampling temperature when a request sets none (paper: 0.6).
        reasoning_budget: most reasoning tokens of one request.
        timeout_s: seconds one request may take in all (``None``: no limit).
        on_large_unavailable: ``"degrade"`` lets the small model write when the large one is
            down; ``"fail"`` answers 503.
        health_ttl_s: how long a ``GET /health`` probe of the models is reused.
    """

    policies: Mapping[str, Policy]
    api_keys: frozenset[str] = field(default_factory=frozenset)
    host: str = "127.0.0.1"
    max_in_flight: int = 64
    max_queued: int = 256
    max_per_key: int = 32
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1
    grace_s: float = 30.0
    temperature: float = defaults.TEMPERATURE
    reasoning_budget: int = defaults.REASONING_BUDGET
    timeout_s: float | None = 600.0
    on_large_unavailable: Literal["fail", "degrade"] | None = None
    health_ttl_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.policies:
            raise ConfigError("policies", "serve at least one policy")
        for name in ("max_in_flight", "max_per_key", "max_body_bytes", "reasoning_budget"):
            _checks.positive_int(name, getattr(self, name))
        _checks.non_negative_int("max_queued", self.max_queued)
        if not self.api_keys and self.host not in LOOPBACK_HOSTS:
            raise ConfigError(
                "--api-keys-file / --api-keys-env",
                f"serving on {self.host!r} without API keys would let anyone on the network in; "
                "give keys, or bind to 127.0.0.1",
            )
