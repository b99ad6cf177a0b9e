"""One live collaboration: the two backends, the conversation and the settings of its calls.

The reasoner builds a `Session` per conversation and passes it to the policy's hooks as their
`StepContext`, so triggers that must call a model (SpecReason's judge, a large-model surprise
score) do so through it and have their calls counted in the trace like every step.
"""

from __future__ import annotations

import time
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
from collab_agent.backends.capabilities import PrefillCounting, Scoring, can_score
from collab_agent.core.formats import ReasoningFormat
from collab_agent.errors import CapabilityError

if TYPE_CHECKING:
    from collab_agent.core.trace import Step, Trace


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
        messages)."""
        return cls(
            small=small,
            large=large,
            conversation_id=trace.conversation_id,
            messages=format.messages(conversation),
            format=format,
            sampling=sampling,
            trace=trace,
            tools=tools,
        )

    def backend(self, role: Role) -> Backend:
        return self.small if role == "small" else self.large

    def prefix(self, then: Step | None = None) -> str:
        """The reasoning written so far (the trace's steps), then ``then`` as a finished step."""
        steps = [(s.text, s.stop_reason == "step") for s in self.trace.steps]
        if then is not None:
            steps.append((then.text, True))
        return self.format.reasoning_prefix(steps)

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

    async def score(self, step: Step) -> list[float]:
        """The large model's logprob of each token of ``step`` (and the delimiter after it when
        it ended at one) after the reasoning so far: one prefill, recorded in the trace as a
        large-model call with ``purpose="score"``.

        Raises:
            CapabilityError: the large backend cannot score a given text.
        """
        large = self.large
        if not can_score(large) or not isinstance(large, Scoring):
            raise CapabilityError(
                f"the large backend {large.name!r} ({type(large).__name__}) cannot score a "
                "given text (no async score(request, continuation), or a server that returns "
                "no prompt logprobs)"
            )
        continuation = step.text + (self.format.delimiter if step.stop_reason == "step" else "")
        request = self.request(self.prefix(), purpose="score", max_tokens=1)
        processed_before = large.processed_tokens if isinstance(large, PrefillCounting) else 0
        started = time.perf_counter()
        logprobs = list(await large.score(request, continuation))
        seconds = time.perf_counter() - started
        prompt_tokens = len(logprobs)
        cached = 0
        if isinstance(large, PrefillCounting):
            # what the backend did not recompute; approximate when other conversations use
            # the backend at the same time
            prompt_tokens += len(large.prompt_ids(request))
            processed = large.processed_tokens - processed_before
            cached = min(prompt_tokens, max(0, prompt_tokens - processed))
        self.trace.record(
            "large",
            Generation(
                text="",
                stop_reason="length",
                logprobs=logprobs,
                prompt_tokens=prompt_tokens,
                cached_tokens=cached,
                completion_tokens=0,
                seconds=seconds,
            ),
        )
        return logprobs
