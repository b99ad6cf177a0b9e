"""Tool calls written as text: parse them out of a model's answer.

Servers return native ``tool_calls`` only when their chat template parser recognises the model's
format; llama.cpp and llama-cpp-python give none for the bundled Qwen2.5-Coder models, which write
either Qwen's (Hermes-style) block::

    <tool_call>
    {"name": "add", "arguments": {"a": 1, "b": 2}}
    </tool_call>

or a bare JSON object (often fenced as ```json), or a JSON list of such objects. `parse_tool_calls`
finds them, returns the calls in the ``{"id", "name", "args"}`` shape of `Generation.tool_calls`
(LangChain's ``ToolCall``) and the remaining text as content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ParsedToolCalls", "parse_tool_calls", "tool_names"]

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCED = re.compile(r"```(?:json|JSON|tool_call)?\s*\n(.*?)\n?\s*```", re.DOTALL)
_ARG_KEYS = ("arguments", "parameters", "args", "input")


@dataclass
class ParsedToolCalls:
    """What `parse_tool_calls` found.

    Attributes:
        content: the text with every recognised tool-call block removed and stripped.
        tool_calls: valid calls, ``{"id": str, "name": str, "args": dict, "type": "tool_call"}``.
        invalid_tool_calls: blocks that looked like tool calls but did not parse, in LangChain's
            ``InvalidToolCall`` shape ``{"id", "name", "args" (raw text), "error", "type"}``.
    """

    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    invalid_tool_calls: list[dict[str, Any]] = field(default_factory=list)


def tool_names(tools: Iterable[Mapping[str, Any]] | None) -> set[str]:
    """Names of tools given in OpenAI format (``{"type": "function", "function": {...}}``) or
    as plain ``{"name": ...}`` mappings."""
    names: set[str] = set()
    for tool in tools or ():
        function = tool.get("function")
        name = function.get("name") if isinstance(function, Mapping) else tool.get("name")
        if isinstance(name, str):
            names.add(name)
    return names


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _as_call(obj: Any, allowed: set[str] | None) -> dict[str, Any] | None:
    """A tool call from one decoded JSON object, or ``None`` when it is not one."""
    if not isinstance(obj, Mapping):
        return None
    if isinstance(
        obj.get("function"), Mapping
    ):  # OpenAI shape {"type": "function", "function": ...}
        call_id = obj.get("id")
        obj = obj["function"]
    else:
        call_id = obj.get("id")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    if allowed is not None and name not in allowed:
        return None
    args: Any = {}
    for key in _ARG_KEYS:
        if key in obj:
            args = obj[key]
            break
    else:
        if set(obj) - {"name", "id", "type"}:
            return None  # other keys but no arguments: some other JSON, not a call
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(args, Mapping):
        return None
    return {
        "id": call_id if isinstance(call_id, str) and call_id else _new_id(),
        "name": name,
        "args": dict(args),
        "type": "tool_call",
    }


def _calls_in(payload: Any, allowed: set[str] | None) -> list[dict[str, Any]] | None:
    """All calls in a decoded JSON value (an object or a list of objects), or ``None``."""
    items = payload if isinstance(payload, list) else [payload]
    calls = [_as_call(item, allowed) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def _json_spans(text: str) -> list[tuple[int, int, Any]]:
    """Top-level JSON objects and lists in free text, as ``(start, end, value)``."""
    decoder = json.JSONDecoder()
    spans: list[tuple[int, int, Any]] = []
    i = 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                i += 1
                continue
            spans.append((i, end, value))
            i = end
        else:
            i += 1
    return spans


def _first_json(text: str) -> Any:
    """The first JSON value in ``text``, ignoring what follows it (a stray code fence)."""
    value, _ = json.JSONDecoder().raw_decode(text.strip())
    return value


def parse_tool_calls(
    text: str, tools: Sequence[Mapping[str, Any]] | None = None
) -> ParsedToolCalls:
    """Find tool calls written as text.

    Args:
        text: the model's answer.
        tools: the tools offered, in OpenAI format. When given, only calls to these names are
            accepted, so a JSON answer that merely has a ``"name"`` key stays content.

    Returns:
        The calls, the blocks that failed to parse, and the remaining content.

    ``<tool_call>`` blocks win; without any, fenced JSON blocks, then bare JSON objects or lists
    whose every item has a ``name`` and ``arguments`` (or ``parameters``/``args``/``input``).
    """
    allowed = tool_names(tools) if tools else None
    tagged = list(_TAGGED.finditer(text))
    if tagged:
        calls: list[dict[str, Any]] = []
        invalid: list[dict[str, Any]] = []
        for match in tagged:
            body = match.group(1).strip()
            try:
                found = _calls_in(_first_json(body), allowed)
            except json.JSONDecodeError as error:
                found, problem = None, f"not valid JSON: {error.msg} at {error.pos}"
            else:
                problem = "not a call to an offered tool with a name and object arguments"
            if found is None:
                invalid.append(
                    {
                        "id": _new_id(),
                        "name": None,
                        "args": body,
                        "error": problem,
                        "type": "invalid_tool_call",
                    }
                )
            else:
                calls.extend(found)
        content = _TAGGED.sub("", text).strip()
        return ParsedToolCalls(content=content, tool_calls=calls, invalid_tool_calls=invalid)

    for match in _FENCED.finditer(text):
        try:
            found = _calls_in(_first_json(match.group(1)), allowed)
        except json.JSONDecodeError:
            continue
        if found:
            content = (text[: match.start()] + text[match.end() :]).strip()
            return ParsedToolCalls(content=content, tool_calls=found)

    calls = []
    pieces: list[str] = []
    last = 0
    for start, end, value in _json_spans(text):
        found = _calls_in(value, allowed)
        if found:
            calls.extend(found)
            pieces.append(text[last:start])
            last = end
    if not calls:
        return ParsedToolCalls(content=text.strip())
    pieces.append(text[last:])
    return ParsedToolCalls(content="".join(pieces).strip(), tool_calls=calls)
