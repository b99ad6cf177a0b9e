"""Edge-cloud simulation: latency and price of a link between a local SRM and a remote LRM.

TrigReason's edge-cloud experiment (Zhao, Peng, Nguyen et al., 2026, Sec. "Edge-cloud
collaboration") runs the small model on the device and calls the large one through an API; it
reports latency and API cost of each policy. `SimulatedLink` wraps any `Backend` so that one
machine can reproduce that comparison: every call pays a round trip, the transfer of its request
and response over a given bandwidth, a time to first token and a per-token decode time, and, when
a `Price` is given, the API price of its tokens.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace

from collab_agent import _checks
from collab_agent.backends.base import (
    Backend,
    GenerateRequest,
    Generation,
    close_backends,
    release_conversation,
)
from collab_agent.errors import ConfigError
from collab_agent.types import Price

__all__ = ["Price", "SimulatedLink"]


DEEPSEEK_R1_PRICE = Price(input=0.55, cached=0.14, output=2.19)
"""DeepSeek-R1 API list price (USD per million tokens, cache miss / hit / output), the kind of
hosted LRM the paper's edge-cloud setting prices."""


def _request_bytes(request: GenerateRequest) -> int:
    payload = {"messages": list(request.messages), "reasoning": request.reasoning}
    if request.tools:
        payload["tools"] = list(request.tools)
    return len(json.dumps(payload, default=str).encode())


@dataclass
class SimulatedLink:
    """Wrap a backend as if it sat behind a network link (TrigReason's edge-cloud setting).

    Each call adds ``rtt_s + request_bytes / bandwidth + ttft_s + per_token_s * completion_tokens
    + response_bytes / bandwidth`` seconds to `Generation.seconds` and, with ``sleep=True``, really
    waits that long (after the wrapped call returns), so wall-clock latency of whole policies can
    be compared. With a ``price`` the call's cost is recomputed from its tokens.

    Attributes:
        backend: the wrapped backend (usually the large model).
        rtt_s: round-trip time per call, seconds (default 0.1, the paper's 100 ms).
        bandwidth_bytes_s: link bandwidth in bytes per second (default 1.25e6, i.e. 10 Mbit/s);
            request and response bodies are sized as JSON text.
        ttft_s: extra time to first token per call (queueing and prefill at the provider).
        per_token_s: extra time per generated token (the provider's decode speed).
        price: API price applied to each call's tokens (``None`` keeps the backend's own cost).
        sleep: whether to really wait; ``False`` only accounts the delay in ``seconds``.
        name: shown in traces; defaults to ``"<backend name> via link"``.
        delay_total_s: running total of simulated delay over all calls (read-only use).
    """

    backend: Backend
    rtt_s: float = 0.1
    bandwidth_bytes_s: float = 1.25e6
    ttft_s: float = 0.0
    per_token_s: float = 0.0
    price: Price | None = None
    sleep: bool = True
    name: str = ""
    delay_total_s: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.backend, Backend):
            raise ConfigError(
                "backend", f"must implement Backend.generate, got {type(self.backend).__name__}"
            )
        _checks.in_range("rtt_s", self.rtt_s, 0.0, 3600.0)
        _checks.in_range("bandwidth_bytes_s", self.bandwidth_bytes_s, 0.0, 1e15, low_open=True)
        _checks.in_range("ttft_s", self.ttft_s, 0.0, 3600.0)
        _checks.in_range("per_token_s", self.per_token_s, 0.0, 60.0)
        if not self.name:
            self.name = f"{getattr(self.backend, 'name', type(self.backend).__name__)} via link"

    def delay(self, request: GenerateRequest, generation: Generation) -> float:
        """Simulated link delay of one call, seconds."""
        response_bytes = len(generation.text.encode()) + len(generation.reasoning_text.encode())
        if generation.logprobs:
            response_bytes += 24 * len(generation.logprobs)
        transfer = (_request_bytes(request) + response_bytes) / self.bandwidth_bytes_s
        return self.rtt_s + transfer + self.ttft_s + self.per_token_s * generation.completion_tokens

    async def generate(self, request: GenerateRequest) -> Generation:
        generation = await self.backend.generate(request)
        delay = self.delay(request, generation)
        if self.sleep and delay > 0:
            await asyncio.sleep(delay)
        self.delay_total_s += delay
        cost = generation.cost
        if self.price is not None:
            cost = self.price.cost(
                generation.prompt_tokens, generation.cached_tokens, generation.completion_tokens
            )
        return replace(generation, seconds=generation.seconds + delay, cost=cost)

    async def release(self, conversation_id: str) -> None:
        await release_conversation(self.backend, conversation_id)

    async def aclose(self) -> None:
        """Close the wrapped backend when it has ``aclose``."""
        await close_backends(self.backend)
