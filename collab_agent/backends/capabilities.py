"""Optional capabilities a backend declares by having the method or attribute, read with
``isinstance(backend, Capability)`` instead of ``getattr``/``hasattr`` guesses.

`Backend` (``name`` and ``generate``) is the one thing every backend has (`backends.base`);
each protocol here is one optional extra, and the code that uses it says which it needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

from collab_agent.types import GenerateRequest


@runtime_checkable
class Scoring(Protocol):
    """Gives the logprob of each token of a given text after a prompt, with one prefill
    (`TransformersBackend.score`; an OpenAI-compatible server that echoes prompt logprobs)."""

    async def score(self, request: GenerateRequest, continuation: str) -> list[float]: ...


@runtime_checkable
class ScoreProbe(Protocol):
    """A `Scoring` backend whose engine may not support it: ``can_score`` is ``False`` where it
    cannot, ``None`` before it is known, ``True`` where it can."""

    @property
    def can_score(self) -> bool | None: ...


def can_score(backend: object) -> bool:
    """Whether ``backend`` can score a text: it is `Scoring` and does not say it cannot."""
    if not isinstance(backend, Scoring):
        return False
    return not (isinstance(backend, ScoreProbe) and backend.can_score is False)


@runtime_checkable
class Releasable(Protocol):
    """Holds per-conversation state (a KV cache) and can free it."""

    async def release(self, conversation_id: str) -> None:
        """Forget the conversation's cached state; a later request starts afresh."""
        ...


@runtime_checkable
class PrefillCounting(Protocol):
    """Renders a request to the token ids it feeds the model and counts the tokens it ran
    forward on, so a caller can tell what a call took from the cache."""

    processed_tokens: int

    def prompt_ids(self, request: GenerateRequest) -> list[int]: ...


@runtime_checkable
class Closable(Protocol):
    """Holds resources (an HTTP client, a server process, a model) to close."""

    async def aclose(self) -> None:
        """Free the backend's resources; it is not used afterwards."""
        ...


@runtime_checkable
class Degradable(Protocol):
    """Says what a reasoner does when it stays unreachable: ``"fail"`` or ``"degrade"`` (the
    small model writes the step instead)."""

    on_unavailable: Literal["fail", "degrade"]


@runtime_checkable
class ConstrainedBackend(Protocol):
    """Can constrain a generation to JSON (``GenerateRequest.response_format``) while decoding
    (llama.cpp's ``json_schema``, an OpenAI-compatible ``response_format``)."""

    def constrains(self, response_format: Mapping[str, Any]) -> bool:
        """Whether this backend enforces ``response_format`` while decoding."""
        ...


@runtime_checkable
class DeviceMemory(Protocol):
    """A KV cache that counts the bytes it keeps on the accelerator (a compressed cache keeps
    part of itself on the host)."""

    def device_bytes(self) -> int: ...


@runtime_checkable
class Compacting(Protocol):
    """A compressed KV cache that goes back within its budget between calls."""

    def compact(self) -> None: ...


__all__ = [
    "Closable",
    "Compacting",
    "ConstrainedBackend",
    "Degradable",
    "DeviceMemory",
    "PrefillCounting",
    "Releasable",
    "ScoreProbe",
    "Scoring",
    "can_score",
]
