"""The backend contract: one async call that turns a request into a generation.

A backend knows nothing of policies, traces or LangChain. It is stateless to its caller: every
request carries the whole conversation and the assistant text written so far (by either model).
A local backend may keep each conversation's KV cache and reuse the longest common token prefix;
that is an optimisation invisible to the caller.

The plain types of the contract (`GenerateRequest`, `Generation`, `Sampling`, `Role`...) live in
`collab_agent.types`; they are re-exported here so older imports keep working.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

import anyio

from collab_agent.backends.capabilities import Closable, Releasable
from collab_agent.types import (
    GREEDY,
    MAX_TEMPERATURE,
    MAX_TOP_LOGPROBS,
    GenerateRequest,
    Generation,
    Message,
    Role,
    Sampling,
    StopReason,
)

__all__ = [
    "GREEDY",
    "MAX_TEMPERATURE",
    "MAX_TOP_LOGPROBS",
    "RELEASE_TIMEOUT_S",
    "Backend",
    "ClosableBackend",
    "GenerateRequest",
    "Generation",
    "Message",
    "ReleasableBackend",
    "Role",
    "Sampling",
    "StopReason",
    "StreamingBackend",
    "TokenizedBackend",
    "close_backends",
    "release_conversation",
    "release_shielded",
    "stream_generation",
]


@runtime_checkable
class Backend(Protocol):
    """Where tokens come from. ``name`` identifies the model (shown in traces and LangSmith)."""

    name: str

    async def generate(self, request: GenerateRequest) -> Generation:
        """Continue ``request.reasoning`` for ``request.messages``."""
        ...


@runtime_checkable
class StreamingBackend(Backend, Protocol):
    """A backend that can hand out text as it is decoded."""

    def stream(self, request: GenerateRequest) -> AsyncIterator[str | Generation]:
        """Yield text deltas as tokens are decoded (never any of the stop string), then the
        whole `Generation`, whose ``text`` is the deltas joined."""
        ...


async def stream_generation(
    backend: Backend, request: GenerateRequest
) -> AsyncIterator[str | Generation]:
    """Text deltas then the `Generation`: token by token from a `StreamingBackend`, otherwise
    the whole text as one delta once ``generate`` returns."""
    if isinstance(backend, StreamingBackend):
        async for item in backend.stream(request):
            yield item
        return
    generation = await backend.generate(request)
    if generation.text:
        yield generation.text
    yield generation


@runtime_checkable
class ReleasableBackend(Backend, Releasable, Protocol):
    """A backend that holds per-conversation state (a KV cache) and can free it."""


@runtime_checkable
class TokenizedBackend(Backend, Protocol):
    """A backend that knows its tokenizer and context window without calling the model: token
    counts (``get_num_tokens``) and the context check before a call read them, offline."""

    @property
    def context_window(self) -> int | None:
        """Most tokens of prompt plus generation the model takes (``None``: unknown)."""
        ...

    def local_tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer, loaded offline (``None``: none known here)."""
        ...


async def release_conversation(backend: Backend, conversation_id: str) -> None:
    """Free a conversation's state on ``backend`` when it keeps any."""
    if isinstance(backend, Releasable):
        await backend.release(conversation_id)


RELEASE_TIMEOUT_S = 10.0
"""Most seconds the release of a conversation's state may take once its call has ended (or was
cancelled): a backend that hangs then must not hold up the caller."""


async def release_shielded(*backends: Backend, conversation_id: str) -> None:
    """Free ``conversation_id`` on each backend (the same object given twice once), shielded
    from the caller's cancellation and bounded by `RELEASE_TIMEOUT_S`. For ``finally`` blocks."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT_S):
        for backend in {id(b): b for b in backends}.values():
            await release_conversation(backend, conversation_id)


ClosableBackend = Closable
"""The `Closable` capability under its older name."""


async def close_backends(*backends: object) -> None:
    """Close each backend that can be closed, once (the same object given twice is closed once);
    ``None`` and backends with nothing to close are skipped. For the end of a command."""
    seen: set[int] = set()
    for backend in backends:
        if id(backend) in seen or not isinstance(backend, Closable):
            continue
        seen.add(id(backend))
        await backend.aclose()
