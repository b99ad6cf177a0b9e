"""One call of the chat model: its options checked and mapped to a `Reasoner` before any model
runs (`prepare`), then run as LangChain chunks (`stream_chunks`).

`stream_chunks` is the one core of LangChain's four entry points: ``_astream`` yields its chunks,
``_agenerate`` aggregates them (`generate`), and the sync ``_stream`` / ``_generate`` run the same
two on a portal (`collab_agent._portal`).

`stream_chunks` yields the reasoning in ``additional_kwargs["reasoning_content"]`` (so
``content_blocks`` shows a reasoning block): with ``stream_granularity="token"`` (default) token
by token for large-model steps and small-model steps the policy cannot reject, and a step the
policy may reject once it is accepted; with ``"step"`` one chunk per step. Then the answer as
text (token by token at ``"token"`` when no tools are bound and no stop strings cut it) (with
``tool_call_chunks`` when it calls tools), then a last chunk with ``usage_metadata``
(``output_token_details.reasoning``) and ``response_metadata`` (``model_name``,
``finish_reason`` and ``collab``: `Trace.summary`, the per-step record of who wrote what and
why). ``invoke`` aggregates the same chunks.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult

from collab_agent import _checks, defaults
from collab_agent.backends.detokenize import cut_at_stop
from collab_agent.core.config import ReasoningConfig
from collab_agent.core.reasoner import AnswerEvent, Reasoner, StepEvent, TokenEvent
from collab_agent.core.streaming import AnswerReveal
from collab_agent.errors import CallTimeoutError, ConfigError
from collab_agent.langchain.callbacks import notify, traced
from collab_agent.langchain.errors import langchain_typed
from collab_agent.langchain.messages import aggregate, chunk, convert_messages, usage_metadata
from collab_agent.langchain.structured import check_response_format
from collab_agent.langchain.tools import (
    ToolChoice,
    convert_tools,
    parse_answer,
    parse_tool_choice,
    tool_format,
)
from collab_agent.policies.base import Policy

if TYPE_CHECKING:
    from collab_agent.langchain.chat_model import CollabChatModel

__all__ = ["CALL_OPTIONS", "Call", "check_policy", "generate", "prepare", "stream_chunks"]

CALL_OPTIONS = {
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "temperature",
    "top_p",
    "seed",
    "max_tokens",
    "policy",
    "conversation_id",
    "stream",
    "ls_structured_output_format",
    "response_format",
    "max_completion_tokens",
    "strict",
    "logprobs",
    "top_logprobs",
}
"""Keyword arguments a call (``invoke(..., **kwargs)`` or ``bind(...)``) may carry: ours and
those of `ChatOpenAI` that mean something here (``max_completion_tokens`` is ``max_tokens``;
``strict`` is accepted, as every tool call is checked against its schema anyway;
``response_format`` constrains the answer's decoding; ``logprobs`` only when false)."""


@dataclass
class Call:
    """Everything one call needs, checked before any model runs."""

    messages: list[dict[str, Any]]
    reasoner_fields: dict[str, Any]
    tools: list[dict[str, Any]] | None
    choice: ToolChoice
    parallel_tool_calls: bool
    stop: list[str]
    conversation_id: str | None


def check_policy(value: Any, allow_code: bool) -> Policy | None:
    """A `Policy`, ``None``, or a name resolved by the registry (code only when allowed)."""
    if value is None or isinstance(value, Policy):
        return value
    if isinstance(value, str):
        from collab_agent.policies.registry import resolve_policy

        return resolve_policy(value, allow_code=allow_code)
    raise ConfigError("policy", f"must be a Policy or a policy name, got {type(value).__name__}")


def prepare(
    model: CollabChatModel,
    messages: Sequence[BaseMessage],
    stop: list[str] | None,
    kwargs: Mapping[str, Any],
) -> Call:
    """Check the call and map the model's fields to a reasoner (before any model runs)."""
    if "model" in kwargs:
        raise ConfigError(
            "model",
            "CollabChatModel runs a pair of models; choose them with small=... and "
            "large=..., not a per-call model",
        )
    for key in kwargs:
        if key not in CALL_OPTIONS:
            raise ConfigError(
                key,
                f"is not a call option of CollabChatModel; use one of {sorted(CALL_OPTIONS)}",
            )
    converted = convert_messages(messages)
    tools = convert_tools(kwargs["tools"]) if kwargs.get("tools") else None
    choice = parse_tool_choice(kwargs.get("tool_choice"), tools) if tools else ToolChoice("none")
    reasoning_format = model.reasoning_format
    if tools:
        reasoning_format = tool_format(reasoning_format, choice)
    policy = check_policy(kwargs.get("policy", model.policy), model.allow_code_policies)
    temperature = kwargs.get("temperature", model.temperature)
    top_p = kwargs.get("top_p", model.top_p)
    seed = kwargs.get("seed", model.seed)
    max_tokens = kwargs.get("max_tokens", model.max_tokens)
    if kwargs.get("max_completion_tokens") is not None:
        if kwargs.get("max_tokens") not in (None, kwargs["max_completion_tokens"]):
            raise ConfigError("max_completion_tokens", "and max_tokens disagree; give one of them")
        max_tokens = kwargs["max_completion_tokens"]
    if kwargs.get("logprobs") or kwargs.get("top_logprobs"):
        raise ConfigError(
            "logprobs",
            "the answer's token logprobs are not returned (two models write the text); "
            "each step's logprob summary is in response_metadata['collab']['steps']",
        )
    if kwargs.get("strict") is not None and not isinstance(kwargs["strict"], bool):
        raise ConfigError("strict", f"must be True, False or None, got {kwargs['strict']!r}")
    if max_tokens is None:
        max_tokens = defaults.ANSWER_MAX_TOKENS
    _checks.positive_int("max_tokens", max_tokens)
    reasoner_fields: dict[str, Any] = {
        "policy": policy if policy is not None else model._policy(),
        "config": ReasoningConfig(
            format=reasoning_format,
            splitter=model.splitter,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            budget=model.reasoning_budget,
            max_steps=model.max_steps,
            step_max_tokens=model.step_max_tokens,
            answer_max_tokens=max_tokens,
        ),
        "stream_tokens": model.stream_granularity == "token",
        "on_large_unavailable": model.on_large_unavailable,
        "breaker": model.circuit_breaker,
        "response_format": check_response_format(kwargs.get("response_format")),
    }
    return Call(
        messages=converted,
        reasoner_fields=reasoner_fields,
        tools=tools if tools and choice.mode != "none" else None,
        choice=choice,
        parallel_tool_calls=kwargs.get("parallel_tool_calls") is not False,
        stop=list(stop if stop is not None else model.stop or []),
        conversation_id=kwargs.get("conversation_id"),
    )


@langchain_typed
async def stream_chunks(
    model: CollabChatModel,
    messages: list[BaseMessage],
    stop: list[str] | None,
    kwargs: Mapping[str, Any],
    run_manager: Any = None,
) -> AsyncIterator[ChatGenerationChunk]:
    """The whole call as chunks: one per reasoning step, the answer, then the metadata.
    With a ``run_manager``, every model call is a child run of this call's run."""
    call = prepare(model, messages, stop, kwargs)
    deadline = None if model.timeout is None else time.monotonic() + model.timeout
    small, large = await anyio.to_thread.run_sync(
        lambda: (model._backend("small"), model._backend("large"))
    )
    small, large = traced(small, "small", run_manager), traced(large, "large", run_manager)
    reasoner = Reasoner(small=small, large=large, deadline=deadline, **call.reasoner_fields)
    events = reasoner.stream(call.messages, conversation_id=call.conversation_id, tools=call.tools)
    answer: AnswerEvent | None = None
    answer_tokens = not call.tools and not call.stop  # else the answer is parsed first
    shown_answer = AnswerReveal()
    streaming_step = -1
    try:
        while answer is None:
            with anyio.move_on_after(_left(deadline)) as scope:
                event = await events.__anext__()
            if scope.cancelled_caught:
                raise _timed_out(model.timeout)
            if isinstance(event, TokenEvent):
                if event.part == "answer":
                    if answer_tokens and (new := shown_answer.feed(event.text)):
                        yield chunk(content=new)
                    continue
                text = event.text
                if event.step_index != streaming_step:
                    streaming_step = event.step_index
                    if event.step_index > 0:
                        text = reasoner.settings.format.delimiter + text
                yield chunk(reasoning=text)
            elif isinstance(event, StepEvent):
                text = event.step.text[len(event.streamed) :]
                if not event.streamed and event.step.index > 0:
                    text = reasoner.settings.format.delimiter + text
                if text or not event.streamed:
                    yield chunk(reasoning=text)
            else:
                answer = event
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()  # type: ignore[attr-defined]
    with anyio.move_on_after(_left(deadline)) as scope:
        parsed = await parse_answer(
            reasoner,
            answer,
            call.messages,
            call.tools,
            call.choice,
            call.parallel_tool_calls,
        )
    if scope.cancelled_caught:
        raise _timed_out(model.timeout)
    content, _ = cut_at_stop(parsed.content, call.stop)
    if shown_answer.shown and content.startswith(shown_answer.shown):
        content = content[len(shown_answer.shown) :]
    yield ChatGenerationChunk(
        message=AIMessageChunk(
            content=content,
            tool_call_chunks=[
                {
                    "name": c["name"],
                    "args": json.dumps(c["args"], ensure_ascii=False),
                    "id": c["id"],
                    "index": i,
                    "type": "tool_call_chunk",
                }
                for i, c in enumerate(parsed.tool_calls)
            ],
        )
    )
    trace = answer.trace
    finish = "tool_calls" if parsed.tool_calls else "stop"
    summary = trace.summary()
    summary["models"] = {"small": small.name, "large": large.name}
    summary["invalid_tool_calls"] = parsed.invalid_tool_calls
    yield ChatGenerationChunk(
        message=AIMessageChunk(
            content="",
            usage_metadata=usage_metadata(trace),
            response_metadata={
                "model_name": model.model_name,
                "finish_reason": finish,
                "collab": summary,
            },
            chunk_position="last",
        ),
        generation_info={"finish_reason": finish},
    )


async def generate(
    model: CollabChatModel,
    messages: list[BaseMessage],
    stop: list[str] | None,
    kwargs: Mapping[str, Any],
    run_manager: Any = None,
) -> ChatResult:
    """The whole call as one result (``invoke``): `stream_chunks` aggregated, each chunk
    reported to ``run_manager`` (sync or async) as a new token. Cancelled, it closes the chunks
    (and with them the reasoner, which frees the conversation's state) before it ends."""
    chunks: list[ChatGenerationChunk] = []
    async with contextlib.aclosing(
        stream_chunks(model, messages, stop, kwargs, run_manager)  # type: ignore[type-var]
    ) as stream:
        async for item in stream:
            if run_manager:
                await notify(run_manager.on_llm_new_token, item.text, chunk=item)
            chunks.append(item)
    return aggregate(chunks)


def _timed_out(timeout: float | None) -> CallTimeoutError:
    return CallTimeoutError(
        f"timeout: the call took longer than timeout={timeout}s; raise timeout, lower "
        "reasoning_budget, or let the small model answer (on_large_unavailable='degrade')"
    )


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
