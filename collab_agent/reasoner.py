"""The step loop of trigger-based collaboration (TrigReason, Sec. 3).

Each step: the policy says who writes (``before_step``), that model continues the reasoning up to
the step delimiter, the policy may reject a small-model step (``after_step``) so the large model
rewrites it from the same prefix. Reasoning ends at an answer marker, the model's end of turn, the
token budget or the step cap; then the answering model writes the answer. One event per step.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import anyio

from collab_agent import _checks, defaults
from collab_agent.backends.base import (
    Backend,
    GenerateRequest,
    Generation,
    Role,
    Sampling,
    release_conversation,
)
from collab_agent.breaker import CircuitBreaker
from collab_agent.context import fit_budget
from collab_agent.errors import BackendUnavailableError, ConfigError
from collab_agent.policies.base import Policy
from collab_agent.policies.trigreason import TrigReason
from collab_agent.prompting import STEPWISE, ReasoningFormat, validate_messages
from collab_agent.session import Session
from collab_agent.structured import require_constraint
from collab_agent.trace import Firing, Step, Trace


@dataclass(frozen=True)
class StepEvent:
    """A reasoning step was written (after any rejection and rewrite)."""

    step: Step
    trace: Trace
    kind: Literal["step"] = "step"


@dataclass(frozen=True)
class AnswerEvent:
    """The answer, written after the reasoning; ``trace`` is complete."""

    text: str
    author: Role
    trace: Trace
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    raw_text: str = ""
    kind: Literal["answer"] = "answer"


Event = StepEvent | AnswerEvent


@dataclass
class Reasoner:
    """Runs one policy over a small and a large backend.

    Attributes:
        small: the small reasoning model (SRM).
        large: the large reasoning model (LRM).
        policy: who writes each step (default: `TrigReason()` with the paper's settings).
        format: how reasoning is laid out (`STEPWISE` for instruct models, `THINK` for ``<think>``).
        sampling: sampling of every call (default: `collab_agent.defaults`, greedy; paper:
            temperature 0.6, top-p 0.95).
        budget: most reasoning tokens of accepted steps (paper: 8192). ``None`` (default):
            `defaults.REASONING_BUDGET`, capped to what each model's context leaves after the
            prompt and the answer; an explicit budget that cannot fit raises
            `ContextLengthError` before any model runs.
        max_steps: most reasoning steps.
        step_max_tokens: most tokens of one step; a longer step continues in the next.
        answer_max_tokens: most tokens of the answer.
        on_large_unavailable: ``"fail"`` raises when the large model stays unreachable after its
            retries; ``"degrade"`` lets the small model write the step and marks it degraded.
            ``None`` (default) takes the large backend's own ``on_unavailable`` setting, else
            ``"fail"``.
        release_on_finish: free each backend's cached state for the conversation at the end.
        breaker: in degrade mode, the circuit breaker of the large model: after its threshold of
            consecutive unavailable errors, large steps degrade at once for its cool-down (share
            one across calls, as `CollabChatModel` does; default: one per reasoner).
        deadline: ``time.monotonic()`` by which the whole call must end (``None``: no limit). In
            degrade mode a large call may use at most half the time left, so the small model
            still has time to write the step.
        response_format: OpenAI's ``json_object`` / ``json_schema`` format: the answer is
            always generated (never kept from the reasoning) under the backend's constrained
            decoding; a backend without it raises `CapabilityError` here, before any call.
    """

    small: Backend
    large: Backend
    policy: Policy = field(default_factory=TrigReason)
    format: ReasoningFormat = STEPWISE
    sampling: Sampling = field(
        default_factory=lambda: Sampling(defaults.TEMPERATURE, defaults.TOP_P)
    )
    budget: int | None = None
    max_steps: int = defaults.MAX_STEPS
    step_max_tokens: int = defaults.STEP_MAX_TOKENS
    answer_max_tokens: int = defaults.ANSWER_MAX_TOKENS
    on_large_unavailable: Literal["fail", "degrade"] | None = None
    release_on_finish: bool = True
    breaker: CircuitBreaker | None = field(default_factory=CircuitBreaker)
    deadline: float | None = None
    response_format: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("budget", "max_steps", "step_max_tokens", "answer_max_tokens"):
            if name != "budget" or self.budget is not None:
                _checks.positive_int(name, getattr(self, name))
        if self.on_large_unavailable is None:
            self.on_large_unavailable = getattr(self.large, "on_unavailable", "fail")
        if self.on_large_unavailable not in ("fail", "degrade"):
            raise ConfigError(
                "on_large_unavailable",
                f"must be 'fail' or 'degrade', got {self.on_large_unavailable!r}",
            )
        for role in ("small", "large"):
            if not callable(getattr(getattr(self, role), "generate", None)):
                raise ConfigError(role, "must be a Backend with an async generate(request) method")
        if self.response_format is not None:  # before any model runs, not at the answer
            for role in ("small", "large"):
                require_constraint(getattr(self, role), self.response_format, role)
        for trigger in self.policy.triggers:
            check = getattr(trigger, "check", None)
            if callable(check):  # a trigger that needs a capability says so now, not mid-run
                check(self.small, self.large)

    async def run(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        conversation_id: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> Trace:
        """Reason to the end and return the complete trace."""
        trace: Trace | None = None
        async for event in self.stream(messages, conversation_id=conversation_id, tools=tools):
            trace = event.trace
        assert trace is not None
        return trace

    async def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        conversation_id: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> AsyncIterator[Event]:
        """Yield a `StepEvent` per step, then one `AnswerEvent`. Cancelling the consumer
        cancels the call in flight; closing the iterator frees the conversation's caches."""
        conversation = validate_messages(messages)
        budget = await anyio.to_thread.run_sync(
            lambda: fit_budget(
                {"small": self.small, "large": self.large},
                self.format.messages(conversation),
                tools,
                budget=self.budget,
                answer_max_tokens=self.answer_max_tokens,
            )
        )
        trace = Trace(conversation_id=conversation_id or uuid.uuid4().hex, policy=self.policy.name)
        session = Session.open(
            self.small, self.large, trace, conversation, self.format, self.sampling, tools
        )
        started = time.perf_counter()
        try:
            handoff_left, handoff_trigger = 0, None
            while trace.stop_reason is None:
                remaining = budget - trace.reasoning_tokens
                if len(trace.steps) >= self.max_steps:
                    trace.stop_reason = "max_steps"
                    break
                if remaining <= 0:
                    trace.stop_reason = "budget"
                    break
                if handoff_left == 0:
                    handoff = await self.policy.before_step(trace)
                    if handoff is not None:
                        trace.firings.append(
                            Firing(len(trace.steps), handoff.trigger, "handoff", handoff.detail)
                        )
                        handoff_left, handoff_trigger = handoff.steps, handoff.trigger
                author: Role = self.policy.default_author
                trigger = None
                if handoff_left > 0:
                    author, trigger = "large", handoff_trigger
                    handoff_left -= 1
                step = await self._step(
                    session, author, trigger, min(remaining, self.step_max_tokens)
                )
                trace.seconds = time.perf_counter() - started
                if self._finish_step(trace, step):
                    yield StepEvent(step, trace)
                elif step.degraded:  # it held only the answer: the answer says it was degraded
                    trace.answer_degraded_reason = step.degraded_reason
            answer = await self._answer(session)
            trace.seconds = time.perf_counter() - started
            yield answer
        finally:
            trace.seconds = time.perf_counter() - started
            trace.session = None
            if self.release_on_finish:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    for backend in {
                        id(self.small): self.small,
                        id(self.large): self.large,
                    }.values():
                        await release_conversation(backend, trace.conversation_id)

    # ------------------------------------------------------------------ one step
    async def _step(
        self, session: Session, author: Role, trigger: str | None, max_tokens: int
    ) -> Step:
        """Write one step with ``author``; a small-model step may be rejected and rewritten."""
        trace = session.trace
        index = len(trace.steps)
        prefix = self._prefix(trace)
        started = time.perf_counter()
        generation, author, why = await self._generate(session, author, prefix, max_tokens)
        step = _make_step(index, author, trigger, generation, why)
        if author == "small" and why is None:
            reject = await self.policy.after_step(trace, step)
            if reject is not None:
                trace.firings.append(Firing(index, reject.trigger, "reject", reject.detail))
                request = session.request(prefix, max_tokens=max_tokens, logprobs=True)
                rewrite, why = await self._large(session, request)
                if rewrite is not None:
                    rejected = step
                    step = _make_step(index, "large", reject.trigger, rewrite, None)
                    step.rejected_text, step.rejected_tokens = rejected.text, rejected.tokens
                else:  # the large model was unreachable: keep the small model's step
                    step.degraded, step.degraded_reason = True, why
        step.seconds = time.perf_counter() - started
        if step.degraded:
            trace.degraded_steps += 1
        return step

    async def _generate(
        self, session: Session, role: Role, prefix: str, max_tokens: int
    ) -> tuple[Generation, Role, str | None]:
        """Generate one step; in degrade mode an unreachable large model hands it to the small.
        Returns the generation, who wrote it, and why it was degraded (``None``: it was not)."""
        request = session.request(prefix, max_tokens=max_tokens, logprobs=True)
        return await self._generate_request(session, role, request)

    async def _generate_request(
        self, session: Session, role: Role, request: GenerateRequest
    ) -> tuple[Generation, Role, str | None]:
        if role == "small":
            return await session.generate("small", request), "small", None
        generation, why = await self._large(session, request)
        if generation is not None:
            return generation, "large", None
        return await session.generate("small", request), "small", why

    async def _large(
        self, session: Session, request: GenerateRequest
    ) -> tuple[Generation | None, str | None]:
        """Call the large model. In fail mode its errors propagate; in degrade mode an
        unavailable large model (or an open breaker, or too little time left) gives
        ``(None, why)`` so the caller lets the small model write instead."""
        if self.on_large_unavailable != "degrade":
            return await session.generate("large", request), None
        breaker = self.breaker
        if breaker is not None and not breaker.allow():
            return None, "circuit open: the large model was unavailable repeatedly; not called"
        allowance = None
        if self.deadline is not None:
            allowance = max(0.0, (self.deadline - time.monotonic()) / 2)
        try:
            with anyio.move_on_after(allowance):
                generation = await session.generate("large", request)
                if breaker is not None:
                    breaker.success()
                return generation, None
            why = f"no answer within {allowance or 0.0:.1f}s, half of the call's time left"
        except BackendUnavailableError as error:
            why = f"{type(error).__name__}: {str(error)[:300]}"
        if breaker is not None:
            breaker.failure()
        return None, why

    def _finish_step(self, trace: Trace, step: Step) -> bool:
        """Cut the step at the end of reasoning, note why reasoning stopped, and append it
        unless it held only the answer. Returns whether it was appended."""
        end = self.format.end_of_reasoning(step.text)
        if end is not None:
            trace.stop_reason = "answer"
            trace.answer_truncated = step.stop_reason == "length"
            trace.answer = self.format.extract_answer(step.text[end:])
            trace.answer_author = step.author
            step.text = step.text[:end].rstrip()
            step.stop_reason = "answer"
        elif step.stop_reason == "eos":
            trace.stop_reason = "eos"
        if step.text or end is None:
            trace.steps.append(step)
            return True
        return False  # a step that held only the answer: its tokens count as the answer's

    def _prefix(self, trace: Trace) -> str:
        return self.format.reasoning_prefix(
            [(s.text, s.stop_reason == "step") for s in trace.steps]
        )

    # ------------------------------------------------------------------ the answer
    async def _answer(self, session: Session) -> AnswerEvent:
        """Keep the answer the reasoning ended with, or have the answering model write it."""
        trace = session.trace
        last_author = trace.steps[-1].author if trace.steps else self.policy.default_author
        role: Role = self.policy.answer_by or trace.answer_author or last_author
        keep = (
            trace.stop_reason == "answer"
            and trace.answer_author == role
            and bool(trace.answer)
            and not trace.answer_truncated  # cut off by the step's token limit: write it whole
            and not self.format.close  # a <think> model's answer follows in further paragraphs
        )
        if keep and self.response_format is None:  # a constrained answer is always generated
            return AnswerEvent(trace.answer, role, trace, raw_text=trace.answer)
        reasoning = self._prefix(trace)
        if trace.stop_reason == "answer" and self.format.close and trace.answer_author == role:
            prefix = self.format.answer_prefix(reasoning) + trace.answer
        else:
            prefix = self.format.answer_prefix(reasoning)
        request = session.request(
            prefix, stop=(), max_tokens=self.answer_max_tokens, purpose="answer"
        )
        if self.response_format is not None:
            request = replace(request, response_format=self.response_format)
        generation, role, why = await self._generate_request(session, role, request)
        if why is not None:
            trace.degraded_steps += 1
            trace.answer_degraded_reason = why
        text = generation.text
        if trace.stop_reason == "answer" and self.format.close and trace.answer_author == role:
            text = trace.answer + text
        trace.answer = text.strip()
        trace.answer_author = role
        return AnswerEvent(
            trace.answer, role, trace, tool_calls=generation.tool_calls, raw_text=text
        )


def _make_step(
    index: int, author: Role, trigger: str | None, generation: Generation, why: str | None
) -> Step:
    return Step(
        index=index,
        author=author,
        text=generation.text,
        tokens=generation.completion_tokens,
        logprobs=generation.logprobs,
        trigger=trigger,
        seconds=generation.seconds,
        stop_reason=generation.stop_reason,
        degraded=why is not None,
        degraded_reason=why,
    )
