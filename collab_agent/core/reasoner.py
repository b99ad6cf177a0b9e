"""The step loop of trigger-based collaboration (TrigReason, Sec. 3).

Each step: the policy says who writes (``before_step``), that model continues the reasoning up to
the step delimiter, the policy may reject a small-model step (``after_step``) so the large model
rewrites it from the same prefix. Where a step ends is the format's splitter (a too-short step is
continued by the same model and merged). Reasoning ends at an answer marker, the model's end of turn, the
token budget or the step cap; then the answering model writes the answer. One event per step.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import anyio

from collab_agent.backends.base import (
    Backend,
    GenerateRequest,
    Generation,
    Role,
    Sampling,
    release_shielded,
)
from collab_agent.backends.capabilities import Degradable
from collab_agent.backends.constraints import require_constraint
from collab_agent.breaker import CircuitBreaker
from collab_agent.core.config import ReasoningConfig
from collab_agent.core.context import fit_budget
from collab_agent.core.formats import (
    ReasoningFormat,
    StepSplitter,
    choose_splitter,
    merge,
    validate_messages,
)
from collab_agent.core.session import Session
from collab_agent.core.streaming import StepReveal
from collab_agent.core.trace import Firing, Step, Trace
from collab_agent.errors import BackendUnavailableError, ConfigError
from collab_agent.policies.base import Policy
from collab_agent.policies.trigreason import TrigReason


@dataclass(frozen=True)
class TokenEvent:
    """Text being decoded that may be shown now (only with ``Reasoner(stream_tokens=True)``).

    Reasoning deltas of one step joined are a prefix of that step's final text (its
    `StepEvent.streamed`); answer deltas are raw (the answer is stripped at the end). A small
    step that the policy may reject is never streamed, only its accepted `StepEvent`.
    """

    text: str
    part: Literal["reasoning", "answer"]
    step_index: int
    author: Role
    trace: Trace
    kind: Literal["token"] = "token"


@dataclass(frozen=True)
class StepEvent:
    """A reasoning step was written (after any rejection and rewrite)."""

    step: Step
    trace: Trace
    streamed: str = ""
    """The start of ``step.text`` already sent as `TokenEvent` deltas."""
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


Event = StepEvent | AnswerEvent | TokenEvent


@dataclass
class Reasoner:
    """Runs one policy over a small and a large backend.

    Attributes:
        small: the small reasoning model (SRM).
        large: the large reasoning model (LRM).
        policy: who writes each step (default: `TrigReason()` with the paper's settings).
        format, splitter, sampling, budget, max_steps, step_max_tokens, answer_max_tokens:
            each overrides that setting of ``config`` when given (``sampling`` sets
            temperature, top-p and seed); see `ReasoningConfig`. After construction they hold
            the settings the reasoner runs with (``format`` with the chosen splitter).
        on_large_unavailable: ``"fail"`` raises when the large model stays unreachable after its
            retries; ``"degrade"`` lets the small model write the step and marks it degraded.
            ``None`` (default) takes the large backend's own ``on_unavailable`` setting, else
            ``"fail"``.
        stream_tokens: also yield `TokenEvent` deltas as steps and the answer are decoded
            (large steps, small steps the policy cannot reject, the answer); in degrade mode
            large calls are not streamed.
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
        config: the reasoning settings (default `ReasoningConfig()`, from
            `collab_agent.defaults`); after construction, those the reasoner runs with.
    """

    small: Backend
    large: Backend
    policy: Policy = field(default_factory=TrigReason)
    format: ReasoningFormat | None = None
    splitter: StepSplitter | str | None = None
    sampling: Sampling | None = None
    budget: int | None = None
    max_steps: int | None = None
    step_max_tokens: int | None = None
    answer_max_tokens: int | None = None
    on_large_unavailable: Literal["fail", "degrade"] | None = None
    release_on_finish: bool = True
    breaker: CircuitBreaker | None = field(default_factory=CircuitBreaker)
    deadline: float | None = None
    response_format: Mapping[str, Any] | None = None
    stream_tokens: bool = False
    config: ReasoningConfig | None = None

    def __post_init__(self) -> None:
        for role in ("small", "large"):
            if not isinstance(getattr(self, role), Backend):
                raise ConfigError(
                    role, "must be a Backend with a name and an async generate(request) method"
                )
        config = (self.config or ReasoningConfig()).override(
            format=self.format,
            splitter=self.splitter,
            sampling=self.sampling,
            budget=self.budget,
            max_steps=self.max_steps,
            step_max_tokens=self.step_max_tokens,
            answer_max_tokens=self.answer_max_tokens,
        )
        fmt = replace(
            config.format,
            splitter=choose_splitter(
                config.splitter,
                str(self.small.name),
                str(self.large.name),
                config.format.splitter,
                think=bool(config.format.close),
            ),
        )
        self.config = replace(config, format=fmt, splitter=fmt.splitter)
        self.format, self.splitter, self.sampling = fmt, fmt.splitter, config.sampling
        self.budget, self.max_steps = config.budget, config.max_steps
        self.step_max_tokens, self.answer_max_tokens = (
            config.step_max_tokens,
            config.answer_max_tokens,
        )
        if self.on_large_unavailable is None:
            self.on_large_unavailable = (
                self.large.on_unavailable if isinstance(self.large, Degradable) else "fail"
            )
        if self.on_large_unavailable not in ("fail", "degrade"):
            raise ConfigError(
                "on_large_unavailable",
                f"must be 'fail' or 'degrade', got {self.on_large_unavailable!r}",
            )
        if self.response_format is not None:  # before any model runs, not at the answer
            for role in ("small", "large"):
                require_constraint(getattr(self, role), self.response_format, role)
        for trigger in self.policy.triggers:  # a missing capability fails now, not mid-run
            trigger.check(self.small, self.large)

    @property
    def settings(self) -> ReasoningConfig:
        """The settings this reasoner runs with: ``config`` with the keyword arguments applied
        and the splitter chosen."""
        assert self.config is not None  # set in __post_init__
        return self.config

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
                self.settings.format.messages(conversation),
                tools,
                budget=self.settings.budget,
                answer_max_tokens=self.settings.answer_max_tokens,
            )
        )
        trace = Trace(
            conversation_id=conversation_id or uuid.uuid4().hex,
            policy=self.policy.name,
            splitter=self.settings.format.splitter.name,
        )
        session = Session.open(
            self.small,
            self.large,
            trace,
            conversation,
            self.settings.format,
            self.settings.sampling,
            tools,
        )
        started = time.perf_counter()
        try:
            handoff_left, handoff_trigger = 0, None
            while trace.stop_reason is None:
                remaining = budget - trace.reasoning_tokens
                if len(trace.steps) >= self.settings.max_steps:
                    trace.stop_reason = "max_steps"
                    break
                if remaining <= 0:
                    trace.stop_reason = "budget"
                    break
                if handoff_left == 0:
                    handoff = await self.policy.before_step(trace, session)
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
                written = _Written()
                async for token in self._step(
                    session, author, trigger, min(remaining, self.settings.step_max_tokens), written
                ):
                    yield token
                step = written.step
                trace.seconds = time.perf_counter() - started
                if self._finish_step(trace, step):
                    streamed = written.shown if step.text.startswith(written.shown) else ""
                    yield StepEvent(step, trace, streamed)
                elif step.degraded:  # it held only the answer: the answer says it was degraded
                    trace.answer_degraded_reason = step.degraded_reason
            written = _Written()
            async for token in self._answer(session, written):
                yield token
            assert written.answer is not None
            answer = written.answer
            trace.seconds = time.perf_counter() - started
            yield answer
        finally:
            trace.seconds = time.perf_counter() - started
            if self.release_on_finish:
                await release_shielded(
                    self.small, self.large, conversation_id=trace.conversation_id
                )

    # ------------------------------------------------------------------ one step
    async def _step(
        self, session: Session, author: Role, trigger: str | None, max_tokens: int, out: _Written
    ) -> AsyncIterator[TokenEvent]:
        """Write one step with ``author`` into ``out.step``; a small-model step may be rejected
        and rewritten. Yields the deltas that may be shown (large steps, unrejectable small)."""
        trace = session.trace
        index = len(trace.steps)
        prefix = session.prefix()
        started = time.perf_counter()
        show = self.stream_tokens and (author == "large" or not self.policy.can_reject)
        async for token in self._write(session, author, prefix, max_tokens, out, show, index):
            yield token
        assert out.generation is not None
        author, why = out.author, out.why
        step = _make_step(index, author, trigger, out.generation, why)
        if author == "small" and why is None:
            reject = await self.policy.after_step(trace, step, session)
            if reject is not None:
                trace.firings.append(Firing(index, reject.trigger, "reject", reject.detail))
                rewrite = _Written()
                async for token in self._write(
                    session,
                    "large",
                    prefix,
                    max_tokens,
                    rewrite,
                    self.stream_tokens,
                    index,
                    fallback=False,
                ):
                    yield token
                if rewrite.generation is not None:
                    rejected = step
                    step = _make_step(index, "large", reject.trigger, rewrite.generation, None)
                    step.rejected_text, step.rejected_tokens = rejected.text, rejected.tokens
                    out.shown = rewrite.shown
                else:  # the large model was unreachable: keep the small model's step
                    step.degraded, step.degraded_reason = True, rewrite.why
        step.seconds = time.perf_counter() - started
        if step.degraded:
            trace.degraded_steps += 1
        out.step = step

    async def _write(
        self,
        session: Session,
        role: Role,
        prefix: str,
        max_tokens: int,
        out: _Written,
        show: bool,
        index: int,
        *,
        fallback: bool = True,
    ) -> AsyncIterator[TokenEvent]:
        """``role`` writes a step from ``prefix`` into ``out`` (generation, author, why it was
        degraded), continued past the delimiter while the splitter finds it too short.
        With ``fallback``, an unreachable large model (degrade mode) hands it to the small one;
        without, ``out.generation`` stays ``None``."""
        splitter = self.settings.format.splitter
        reveal = StepReveal(self.settings.format) if show else None
        generation: Generation | None = None
        while generation is None or (
            splitter.needs_more(generation)
            and generation.completion_tokens < max_tokens
            and self.settings.format.end_of_reasoning(generation.text) is None
        ):
            so_far = "" if generation is None else generation.text + splitter.delimiter
            request = session.request(
                prefix + so_far,
                max_tokens=max_tokens - (generation.completion_tokens if generation else 0),
                logprobs=True,
            )
            part: Generation | None = None
            if role == "large" and self.on_large_unavailable == "degrade":
                part, why = await self._large(session, request)
                if part is None:
                    if generation is not None:
                        break  # keep the step written so far
                    if not fallback:
                        out.why = why
                        return
                    part, role, out.why = await session.generate("small", request), "small", why
            else:
                if reveal is not None and generation is not None:
                    reveal.feed(splitter.delimiter)
                async for item in session.stream(role, request):
                    if isinstance(item, Generation):
                        part = item
                    elif reveal is not None and (new := reveal.feed(item)):
                        yield TokenEvent(new, "reasoning", index, role, session.trace)
            assert part is not None
            if part.completion_tokens == 0:
                # nothing decoded: a continuation leaves the step ended at its delimiter
                generation = generation or part
                break
            generation = part if generation is None else merge(generation, part, splitter.delimiter)
        out.generation, out.author = generation, role
        if reveal is not None:
            out.shown = reveal.shown

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
        end = self.settings.format.end_of_reasoning(step.text)
        if end is not None:
            trace.stop_reason = "answer"
            trace.answer_truncated = step.stop_reason == "length"
            trace.answer = self.settings.format.extract_answer(step.text[end:])
            trace.answer_author = step.author
            step.text = step.text[:end].rstrip()
            step.stop_reason = "answer"
        elif step.stop_reason == "eos":
            trace.stop_reason = "eos"
        if step.text or end is None:
            trace.steps.append(step)
            return True
        return False  # a step that held only the answer: its tokens count as the answer's

    # ------------------------------------------------------------------ the answer
    async def _answer(self, session: Session, out: _Written) -> AsyncIterator[TokenEvent]:
        """Keep the answer the reasoning ended with, or have the answering model write it;
        the `AnswerEvent` goes into ``out.answer``, the answer's deltas are yielded."""
        trace = session.trace
        last_author = trace.steps[-1].author if trace.steps else self.policy.default_author
        role: Role = self.policy.answer_by or trace.answer_author or last_author
        keep = (
            trace.stop_reason == "answer"
            and trace.answer_author == role
            and bool(trace.answer)
            and not trace.answer_truncated  # cut off by the step's token limit: write it whole
            and not self.settings.format.close  # a <think> model's answer follows in further paragraphs
        )
        if keep and self.response_format is None:  # a constrained answer is always generated
            out.answer = AnswerEvent(trace.answer, role, trace, raw_text=trace.answer)
            return
        reasoning = session.prefix()
        begun = (
            trace.stop_reason == "answer"
            and self.settings.format.close
            and trace.answer_author == role
        )
        prefix = self.settings.format.answer_prefix(reasoning) + (trace.answer if begun else "")
        request = session.request(
            prefix, stop=(), max_tokens=self.settings.answer_max_tokens, purpose="answer"
        )
        if self.response_format is not None:
            request = replace(request, response_format=self.response_format)
        index = len(trace.steps)
        why = None
        if (
            self.stream_tokens
            and self.response_format is None
            and (role == "small" or self.on_large_unavailable != "degrade")
        ):
            if begun and trace.answer:
                yield TokenEvent(trace.answer, "answer", index, role, trace)
            generation: Generation | None = None
            async for item in session.stream(role, request):
                if isinstance(item, Generation):
                    generation = item
                elif item:
                    yield TokenEvent(item, "answer", index, role, trace)
            assert generation is not None
        else:
            generation, role, why = await self._generate_request(session, role, request)
        if why is not None:
            trace.degraded_steps += 1
            trace.answer_degraded_reason = why
        text = (trace.answer if begun else "") + generation.text
        trace.answer = text.strip()
        trace.answer_author = role
        out.answer = AnswerEvent(
            trace.answer, role, trace, tool_calls=generation.tool_calls, raw_text=text
        )


@dataclass
class _Written:
    """What a step or answer call produced, filled in by the async generators that stream it."""

    generation: Generation | None = None
    author: Role = "small"
    why: str | None = None
    shown: str = ""
    step: Step = field(default_factory=lambda: Step(index=0, author="small", text=""))
    answer: AnswerEvent | None = None


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
