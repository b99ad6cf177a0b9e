"""From an OpenAI request to the collaboration and back: one `CollabChatModel` per served
policy, all sharing the same loaded (small, large) pair.

`Engine.prepare` checks everything before any model runs (so a bad request is a 400, never a
broken stream); `Engine.stream` yields `Part`s: reasoning steps, the answer, then the end.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import BaseMessage, convert_to_messages

from collab_agent.backends.base import Backend
from collab_agent.chat_model import CollabChatModel
from collab_agent.core.formats import validate_messages
from collab_agent.serve.config import ServeConfig
from collab_agent.serve.errors import APIError
from collab_agent.serve.schema import ChatCompletionRequest


@dataclass
class Part:
    """A piece of the answer: ``reasoning`` text of one step, ``content`` of the answer with
    its ``tool_calls``, or the ``end`` (``finish_reason``, ``usage``, ``collab``)."""

    kind: str
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    collab: dict[str, Any] | None = None


@dataclass
class PreparedCall:
    """A checked request, ready to run."""

    model: CollabChatModel
    messages: list[BaseMessage]
    stop: list[str] | None
    options: dict[str, Any]
    schema_tool: str | None = None
    """With ``response_format`` of type ``json_schema``: the forced tool whose arguments are
    the answer (as ``with_structured_output`` does); ``None`` otherwise."""


class Engine:
    """The served policies over one model pair."""

    def __init__(self, small: Backend, large: Backend, config: ServeConfig) -> None:
        self.small, self.large = small, large
        self.models = {
            name: CollabChatModel(
                small=small,
                large=large,
                policy=policy,
                temperature=config.temperature,
                reasoning_budget=config.reasoning_budget,
                timeout=config.timeout_s,
                on_large_unavailable=config.on_large_unavailable,
                max_concurrency=None,
            )
            for name, policy in config.policies.items()
        }

    def prepare(self, request: ChatCompletionRequest) -> PreparedCall:
        """Check the request against the model pair; `APIError` or a typed error if wrong."""
        model = self.models.get(request.model)
        if model is None:
            raise APIError(
                404,
                f"model {request.model!r} is not served here; GET /v1/models lists "
                f"{sorted(self.models)}",
                param="model",
                code="model_not_found",
            )
        if request.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        messages = _messages(request.messages)
        options: dict[str, Any] = {}
        for name in ("temperature", "top_p", "seed", "parallel_tool_calls"):
            value = getattr(request, name)
            if value is not None:
                options[name] = value
        if request.answer_max_tokens is not None:
            options["max_tokens"] = request.answer_max_tokens
        schema_tool = None
        if request.response_format is not None:
            schema_tool = _schema_tool(request, options)
        elif request.tools:
            options["tools"] = request.tools
            if request.tool_choice is not None:
                options["tool_choice"] = request.tool_choice
        elif request.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        prepared = model._prepare(messages, request.stop_list, options)  # typed errors -> 400
        validate_messages(prepared.messages)
        return PreparedCall(model, messages, request.stop_list, options, schema_tool)

    async def stream(self, call: PreparedCall) -> AsyncIterator[Part]:
        """The collaboration as parts; cancelling the consumer cancels the reasoning."""
        chunks = call.model._astream(call.messages, call.stop, **call.options)
        try:
            async for chunk in chunks:
                message = chunk.message
                reasoning = message.additional_kwargs.get("reasoning_content")
                if reasoning:
                    yield Part("reasoning", reasoning)
                    continue
                metadata = message.response_metadata
                if "collab" in metadata:
                    yield _end(call, metadata, getattr(message, "usage_metadata", None))
                    continue
                calls = [
                    {"id": c.get("id"), "name": c.get("name"), "arguments": c.get("args") or "{}"}
                    for c in getattr(message, "tool_call_chunks", [])
                ]
                if call.schema_tool is not None:
                    text = calls[0]["arguments"] if calls else str(message.content)
                    yield Part("content", text)
                else:
                    yield Part("content", str(message.content), tool_calls=calls)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]


def _messages(raw: list[dict[str, Any]]) -> list[BaseMessage]:
    messages: list[BaseMessage] = []
    for i, message in enumerate(raw):
        try:
            messages.extend(convert_to_messages([message]))
        except (ValueError, TypeError, KeyError) as error:
            first_line = str(error).splitlines()[0]
            raise APIError(400, f"messages[{i}]: {first_line}", param=f"messages[{i}]") from None
    return messages


def _schema_tool(request: ChatCompletionRequest, options: dict[str, Any]) -> str | None:
    """``response_format``: ``text`` is the default; ``json_schema`` becomes a forced tool."""
    kind = request.response_format.get("type") if request.response_format else None
    if kind == "text":
        return None
    if kind != "json_schema":
        raise APIError(
            400,
            f"response_format.type {kind!r} is not supported; use 'text' or 'json_schema'",
            param="response_format.type",
        )
    if request.tools:
        raise APIError(
            400, "give either tools or a json_schema response_format, not both", param="tools"
        )
    spec = request.response_format.get("json_schema") if request.response_format else None
    if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
        raise APIError(
            400,
            "response_format.json_schema must hold a 'name' and a 'schema' object",
            param="response_format.json_schema",
        )
    name = str(spec.get("name") or "answer")
    options["tools"] = [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": str(spec.get("description") or "Give the answer in this form."),
                "parameters": dict(spec["schema"]),
            },
        }
    ]
    options["tool_choice"] = name
    options["parallel_tool_calls"] = False
    return name


def _end(call: PreparedCall, metadata: Mapping[str, Any], usage: Any) -> Part:
    finish = metadata.get("finish_reason") or "stop"
    if call.schema_tool is not None:
        finish = "stop"
    out = None
    if usage:
        reasoning = (usage.get("output_token_details") or {}).get("reasoning", 0)
        cached = (usage.get("input_token_details") or {}).get("cache_read", 0)
        out = {
            "prompt_tokens": usage["input_tokens"],
            "completion_tokens": usage["output_tokens"],
            "total_tokens": usage["total_tokens"],
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }
    return Part("end", finish_reason=finish, usage=out, collab=dict(metadata["collab"]))


def arguments_text(arguments: Any) -> str:
    """Tool-call arguments as the JSON text the wire format carries."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments)
