"""LangChain messages <-> collab-agent's OpenAI-format message dicts and chunks.

In: `convert_messages` turns LangChain messages into dicts (text only: image, audio, file and
video blocks are refused before any model runs), tool calls included. Out: `chunk` builds the
answer and reasoning chunks, `aggregate` one `ChatResult` from them, `usage_metadata` LangChain's
usage from a `Trace`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    UsageMetadata,
)
from langchain_core.messages.utils import message_chunk_to_message
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from collab_agent.core.trace import Trace
from collab_agent.errors import InvalidMessagesError

__all__ = ["aggregate", "chunk", "convert_messages", "usage_metadata"]

_TEXT_BLOCKS = {"text", "input_text", "output_text"}
_SKIPPED_BLOCKS = {
    "reasoning",
    "thinking",
    "redacted_thinking",
    "tool_use",
    "tool_call",
    "tool_call_chunk",
    "function_call",
    "server_tool_call",
    "server_tool_result",
}
"""Assistant content blocks that are not sent back: reasoning (models do not read earlier
reasoning) and tool-call blocks (sent from ``AIMessage.tool_calls`` instead)."""

_CHAT_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "tool": "tool",
}


def _text_of(content: str | list[Any], where: str, role: str) -> str:
    """The text of a message's content; non-text blocks raise `InvalidMessagesError`."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for j, block in enumerate(content):
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind in _TEXT_BLOCKS and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif kind in _SKIPPED_BLOCKS and role == "assistant":
            continue
        else:
            raise InvalidMessagesError(
                f"{where}.content[{j}]: {kind or type(block).__name__!r} blocks are not "
                "supported; collab-agent's models read text only (give text blocks or a string)"
            )
    return "".join(parts)


def convert_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as OpenAI-format dicts; raise `InvalidMessagesError` on anything a
    text chat model cannot read (before any model runs)."""
    if not messages:
        raise InvalidMessagesError(
            "messages: the conversation is empty; give at least one user message"
        )
    converted: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if isinstance(message, SystemMessage):
            role = "system"
        elif isinstance(message, HumanMessage):
            role = "user"
        elif isinstance(message, AIMessage):
            role = "assistant"
        elif isinstance(message, ToolMessage):
            role = "tool"
        elif isinstance(message, ChatMessage) and message.role in _CHAT_ROLES:
            role = _CHAT_ROLES[message.role]
        else:
            raise InvalidMessagesError(
                f"{where}: {type(message).__name__}"
                f"{f' with role {message.role!r}' if isinstance(message, ChatMessage) else ''}"
                " is not supported; use SystemMessage, HumanMessage, AIMessage or ToolMessage"
            )
        entry: dict[str, Any] = {"role": role, "content": _text_of(message.content, where, role)}
        if isinstance(message, AIMessage) and message.tool_calls:
            call_ids.update(
                call.get("id") or f"call_{i}_{k}" for k, call in enumerate(message.tool_calls)
            )
            entry["tool_calls"] = [
                {
                    "id": call.get("id") or f"call_{i}_{k}",
                    "type": "function",
                    "function": {
                        "name": call["name"],
                        "arguments": json.dumps(call["args"], ensure_ascii=False),
                    },
                }
                for k, call in enumerate(message.tool_calls)
            ]
        if isinstance(message, ToolMessage):
            if message.tool_call_id not in call_ids:
                raise InvalidMessagesError(
                    f"{where}: ToolMessage answers tool_call_id {message.tool_call_id!r}, which "
                    "no earlier AIMessage.tool_calls holds; give each tool result after the "
                    "AIMessage that called the tool, with the call's id"
                )
            entry["tool_call_id"] = message.tool_call_id
        if message.name and role in ("user", "tool"):
            entry["name"] = message.name
        converted.append(entry)
    return converted


# ============================================================================ chunks -> LangChain
def chunk(*, content: str = "", reasoning: str | None = None) -> ChatGenerationChunk:
    """A chunk of answer text or (``reasoning``) of reasoning content."""
    kwargs = {} if reasoning is None else {"reasoning_content": reasoning}
    return ChatGenerationChunk(message=AIMessageChunk(content=content, additional_kwargs=kwargs))


def aggregate(chunks: Sequence[ChatGenerationChunk]) -> ChatResult:
    """One `ChatResult` from the chunks of a call."""
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    message = message_chunk_to_message(merged.message)
    assert isinstance(message, AIMessage)
    return ChatResult(
        generations=[ChatGeneration(message=message, generation_info=merged.generation_info)]
    )


def usage_metadata(trace: Trace) -> UsageMetadata:
    """LangChain usage over every call of both models; reasoning = tokens of all steps,
    rejected attempts included."""
    prompt = sum(u.prompt_tokens for u in trace.usage.values())
    cached = sum(u.cached_tokens for u in trace.usage.values())
    output = sum(u.completion_tokens for u in trace.usage.values())
    reasoning = sum(s.tokens + s.rejected_tokens for s in trace.steps)
    return UsageMetadata(
        input_tokens=prompt,
        output_tokens=output,
        total_tokens=prompt + output,
        input_token_details={"cache_read": cached},
        output_token_details={"reasoning": min(reasoning, output)},
    )
