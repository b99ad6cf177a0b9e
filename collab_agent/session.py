"""One live collaboration: the two backends, the conversation and the settings of its calls.

The reasoner builds a `Session` per conversation and hangs it on `Trace.session`, so triggers that
must call a model (SpecReason's judge, a large-model surprise score) do so through it and have
their calls counted in the trace like every step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from collab_agent.backends.base import (
    Backend,
    GenerateRequest,
    Generation,
    Role,
    Sampling,
    stream_generation,
)
from collab_agent.prompting import ReasoningFormat

if TYPE_CHECKING:
    from collab_agent.trace import Trace


@dataclass
class Session:
    """The backends, conversation and call settings of one collaboration.

    Attributes:
        small: the small reasoning model's backend.
        large: the large reasoning model's backend.
        conversation_id: id shared by every call of this collaboration.
        messages: the conversation as sent to the models (format instruction included).
        format: the reasoning format.
        sampling: sampling settings of every step.
        tools: tools in OpenAI format, rendered into every prompt so prefixes stay shared.
        trace: the trace every call is recorded into.
    """

    small: Backend
    large: Backend
    conversation_id: str
    messages: list[dict[str, Any]]
    format: ReasoningFormat
    sampling: Sampling
    trace: Trace
    tools: Sequence[Mapping[str, Any]] | None = None

    @classmethod
    def open(
        cls,
        small: Backend,
        large: Backend,
        trace: Trace,
        conversation: Sequence[Mapping[str, Any]],
        format: ReasoningFormat,
        sampling: Sampling,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> Session:
        """The session of ``trace``'s conversation (the format's instruction added to the
        messages), attached to the trace so triggers can reach the models through it."""
        session = cls(
            small=small,
            large=large,
            conversation_id=trace.conversation_id,
            messages=format.messages(conversation),
            format=format,
            sampling=sampling,
            trace=trace,
            tools=tools,
        )
        trace.session = session
        return session

    def backend(self, role: Role) -> Backend:
        return self.small if role == "small" else self.large

    def request(
        self,
        reasoning: str,
        *,
        stop: Sequence[str] | None = None,
        max_tokens: int = 512,
        logprobs: bool = False,
        purpose: str = "step",
        sampling: Sampling | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> GenerateRequest:
        """A request that continues ``reasoning`` in this conversation."""
        return GenerateRequest(
            conversation_id=self.conversation_id,
            messages=list(messages) if messages is not None else self.messages,
            reasoning=reasoning,
            stop=tuple(stop) if stop is not None else (self.format.delimiter,),
            max_tokens=max_tokens,
            sampling=sampling or self.sampling,
            logprobs=logprobs,
            tools=self.tools,
            purpose=purpose,
        )

    async def generate(self, role: Role, request: GenerateRequest) -> Generation:
        """Call the ``role`` model and record the call's usage in the trace."""
        generation = await self.backend(role).generate(request)
        self.trace.record(role, generation)
        return generation

    async def stream(self, role: Role, request: GenerateRequest) -> AsyncIterator[str | Generation]:
        """Call the ``role`` model streaming: text deltas, then the `Generation` (recorded in the
        trace like `generate`'s)."""
        async for item in stream_generation(self.backend(role), request):
            if isinstance(item, Generation):
                self.trace.record(role, item)
            yield item
