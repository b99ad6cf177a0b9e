"""Tool calling: tools converted to OpenAI format, ``tool_choice`` normalised, the reasoning
format with tools bound, and the answer's tool calls parsed.

With tools bound, the tools are rendered into every prompt (the chat template's own tool
section) and the reasoning format lets the model end its reasoning with a ``<tool_call>`` block
(or the fenced JSON call coder models write) instead of ``Final answer:``;
``tool_choice="any"`` / ``"required"`` / a tool name forces a call by prefilling
``<tool_call>\\n{"name": "`` (or the named tool's opening) after the reasoning, and asks once
more when a kept answer holds no valid call (`force_tool_call`). With ``tool_choice="auto"``,
reasoning that ends without a call before the turn has any tool result (a small model tends to
guess the value a tool would give) is followed by one plain tool turn (`offer_tools`): the
answering model gets the conversation and the tools with no reasoning prefix (natively on
llama.cpp's chat endpoint), and a call it makes replaces the reasoning's answer. Calls written
as text are parsed by `collab_agent.backends.toolcalls.parse_tool_calls`; native ``tool_calls``
from OpenAI-compatible servers pass through.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from langchain_core.utils.function_calling import convert_to_openai_tool

from collab_agent.backends.base import GenerateRequest, Generation, release_shielded
from collab_agent.backends.toolcalls import parse_tool_calls
from collab_agent.core.formats import STEPWISE_INSTRUCTION, ReasoningFormat
from collab_agent.core.reasoner import AnswerEvent, Reasoner
from collab_agent.errors import ConfigError
from collab_agent.types import Role

__all__ = [
    "FORCED_TOOL_INSTRUCTION",
    "TOOLS_INSTRUCTION",
    "TOOL_CALL_MARKERS",
    "TOOL_CALL_OPEN",
    "Answer",
    "ToolChoice",
    "convert_tools",
    "force_tool_call",
    "offer_tools",
    "parse_answer",
    "parse_tool_choice",
    "tool_format",
]

TOOLS_INSTRUCTION = (
    "Think step by step. Write your reasoning as short steps separated by a blank line. "
    "Never guess or invent a value that one of the tools can give (a rate, a price, a current "
    "fact): plan in a few short steps, then call the tool in a <tool_call></tool_call> block as "
    "described in the tools section and stop. When no tool is needed, or the tool results are "
    "already in the conversation, write a last line of the form 'Final answer: <answer>'."
)
"""Reasoning instruction when tools are bound and the model may call one (``tool_choice`` auto)."""

TOOL_TURN_NOTE = (
    "When one of the tools can give a value the answer needs (a rate, a price, a current "
    "fact), call it; never estimate that value yourself."
)
"""Closes the system message of the offered tool turn (see `offer_tools`)."""

FORCED_TOOL_INSTRUCTION = (
    "Think step by step. Write your reasoning as short steps separated by a blank line. "
    "When you are done, call {which} in a <tool_call></tool_call> block as described in the tools section."
)
"""Reasoning instruction when a tool call is required (``tool_choice`` any or a tool's name)."""

TOOL_CALL_OPEN = "<tool_call>"

TOOL_CALL_MARKERS = (TOOL_CALL_OPEN, '```json\n{"name"', "```json\n{\n")
"""Text that ends reasoning with a tool call: Qwen's tag, or the fenced JSON call the bundled
coder models often write instead (seen with the 0.5B)."""


def convert_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """Tools in OpenAI format; `ConfigError` naming the tool that cannot be converted."""
    formatted: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        try:
            spec = convert_to_openai_tool(tool)
        except Exception as error:  # LangChain raises ValueError/TypeError/SchemaError
            raise ConfigError(
                f"tools[{i}]",
                f"cannot be converted to an OpenAI function tool ({error}); give a BaseTool, a "
                "typed function with a docstring, a pydantic model, a TypedDict or an OpenAI "
                "tool dict",
            ) from error
        function = spec.get("function") if isinstance(spec, Mapping) else None
        if (
            spec.get("type") != "function"
            or not isinstance(function, Mapping)
            or not function.get("name")
        ):
            raise ConfigError(
                f"tools[{i}]",
                f"must be a function tool with a name, got {spec!r} (provider built-in tools "
                "such as web search are not available to local models)",
            )
        formatted.append(dict(spec))
    return formatted


# ============================================================================ tool choice
@dataclass(frozen=True)
class ToolChoice:
    """``tool_choice`` normalised: ``mode`` auto, none, any, or one tool by ``name``."""

    mode: Literal["auto", "none", "any", "named"] = "auto"
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in ("any", "named")

    @property
    def lead(self) -> str:
        """Assistant text that forces a call: the opening of a ``<tool_call>`` block. It ends
        where the model's own tokens would (``":`` and `` "``), never on a bare space, which
        would force an unnatural tokenization (seen: the 0.5B then wrote ``"arguments": 1``)."""
        if self.mode == "named":
            return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(self.name)}, "arguments":'
        return f'{TOOL_CALL_OPEN}\n{{"name": "'

    def as_kwarg(self) -> str | dict[str, Any]:
        if self.mode == "named":
            return {"type": "function", "function": {"name": self.name}}
        return self.mode


def parse_tool_choice(choice: Any, tools: Sequence[Mapping[str, Any]]) -> ToolChoice:
    """Normalise LangChain/OpenAI ``tool_choice`` values against the bound tools."""
    names = [t["function"]["name"] for t in tools]
    if choice is None or choice == "auto" or choice is False:
        return ToolChoice("auto")
    if choice == "none":
        return ToolChoice("none")
    if choice in ("any", "required") or choice is True:
        if len(names) == 1:  # one tool: forcing "any" call is forcing that one
            return ToolChoice("named", names[0])
        return ToolChoice("any")
    name: Any = None
    if isinstance(choice, str):
        name = choice
    elif isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
    if isinstance(name, str) and name in names:
        return ToolChoice("named", name)
    raise ConfigError(
        "tool_choice",
        f"must be 'auto', 'none', 'any', 'required' or the name of a bound tool {names}, "
        f"got {choice!r}",
    )


def tool_format(base: ReasoningFormat, choice: ToolChoice) -> ReasoningFormat:
    """The reasoning format with tools bound: reasoning may end in a ``<tool_call>`` block, and
    a forced choice prefills the opening of one after the reasoning. ``<think>`` formats are
    kept: their answer after ``</think>`` is where the chat template puts tool calls."""
    if base.close or choice.mode == "none":
        return base
    if choice.forced:
        which = "one of the tools" if choice.mode == "any" else f"the tool {choice.name!r}"
        return replace(
            base,
            name=f"{base.name}+tool-call",
            instruction=FORCED_TOOL_INSTRUCTION.format(which=which),
            answer_markers=TOOL_CALL_MARKERS,
            answer_lead=choice.lead,
        )
    instruction = base.instruction
    if instruction == STEPWISE_INSTRUCTION:
        instruction = TOOLS_INSTRUCTION
    return replace(
        base,
        name=f"{base.name}+tools",
        instruction=instruction,
        answer_markers=(*base.answer_markers, *TOOL_CALL_MARKERS),
        answer_lead="",
    )


@dataclass
class Answer:
    """The answer after tool-call parsing."""

    content: str
    tool_calls: list[dict[str, Any]]
    invalid_tool_calls: list[dict[str, Any]]


# ============================================================================ the answer
async def parse_answer(
    reasoner: Reasoner,
    answer: AnswerEvent,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    choice: ToolChoice,
    parallel_tool_calls: bool,
) -> Answer:
    """Content and tool calls of the answer; a forced call the answer lacks is asked for once
    more with the ``<tool_call>`` opening prefilled, and with ``tool_choice="auto"`` a turn
    awaiting tools is offered them once."""
    if not tools:
        return Answer(answer.text, [], [])
    calls = [{**c, "type": "tool_call"} for c in answer.tool_calls]
    raw = answer.raw_text or answer.text
    prefilled = choice.forced and reasoner.settings.format.answer_lead == choice.lead
    generated_with_lead = prefilled and not raw.lstrip().startswith(TOOL_CALL_MARKERS)
    text = _forced_call(choice.lead + raw) if generated_with_lead else raw
    allowed = tools
    if choice.mode == "named":
        allowed = [t for t in tools if t["function"]["name"] == choice.name]
    parsed = parse_tool_calls(text, allowed)
    calls.extend(parsed.tool_calls)
    if choice.forced and not calls and not generated_with_lead:
        generation = await force_tool_call(reasoner, answer, messages, tools, choice)
        calls = [{**c, "type": "tool_call"} for c in generation.tool_calls]
        parsed = parse_tool_calls(_forced_call(choice.lead + generation.text), allowed)
        calls.extend(parsed.tool_calls)
    elif choice.mode == "auto" and not calls and _awaits_tools(messages):
        generation = await offer_tools(reasoner, answer, messages, tools)
        offered = parse_tool_calls(generation.text, allowed)
        found = [{**c, "type": "tool_call"} for c in generation.tool_calls]
        found.extend(offered.tool_calls)
        if found:  # the call replaces an answer the reasoning reached without the tool
            calls, parsed = found, offered
    content = parsed.content
    if not calls:
        content = _final_answer(reasoner.settings.format, content)
    if not parallel_tool_calls:
        calls = calls[:1]
    return Answer(content, calls, parsed.invalid_tool_calls)


async def force_tool_call(
    reasoner: Reasoner,
    answer: AnswerEvent,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    choice: ToolChoice,
) -> Generation:
    """One more answer by the answering model, its text opened with a ``<tool_call>`` block;
    recorded in the trace like every call."""
    trace = answer.trace
    fmt = reasoner.settings.format
    reasoning = fmt.reasoning_prefix([(s.text, s.stop_reason == "step") for s in trace.steps])
    prefix = fmt.answer_prefix(reasoning)
    if not prefix.endswith(choice.lead):
        prefix += choice.lead
    return await _ask_answerer(
        reasoner,
        answer,
        conversation_id=trace.conversation_id,
        messages=fmt.messages(messages),
        reasoning=prefix,
        stop=("</tool_call>",),
        tools=tools,
    )


async def offer_tools(
    reasoner: Reasoner,
    answer: AnswerEvent,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
) -> Generation:
    """The large model offered the tools as a plain tool turn: the conversation and tools
    alone, no reasoning prefix, so the engine's own tool calling (llama.cpp's chat endpoint
    with its template's call parser) decides between a call and an answer. Asked when
    reasoning ended without a call before any tool result of this turn, as a small model's
    reasoning often guesses the value a tool would give; the large model decides, whoever
    wrote the answer, since a missed call is the costliest error of the turn. Recorded in the
    trace like every call."""
    return await _ask_answerer(
        reasoner,
        answer,
        role="large",
        conversation_id=f"{answer.trace.conversation_id}:tools",
        messages=_with_system_note(messages, TOOL_TURN_NOTE),
        reasoning="",
        stop=(),
        tools=tools,
    )


async def _ask_answerer(
    reasoner: Reasoner,
    answer: AnswerEvent,
    *,
    role: Role | None = None,
    conversation_id: str,
    messages: list[dict[str, Any]],
    reasoning: str,
    stop: tuple[str, ...],
    tools: list[dict[str, Any]],
) -> Generation:
    """One more answer by ``role`` (default: the model that wrote ``answer``), with the
    answer's sampling and length, recorded in its trace; the conversation's cache is freed
    afterwards."""
    request = GenerateRequest(
        conversation_id=conversation_id,
        messages=messages,
        reasoning=reasoning,
        stop=stop,
        max_tokens=reasoner.settings.answer_max_tokens,
        sampling=reasoner.settings.sampling,
        tools=tools,
        purpose="answer",
    )
    role = role or answer.author
    backend = reasoner.small if role == "small" else reasoner.large
    try:
        generation = await backend.generate(request)
    finally:
        await release_shielded(backend, conversation_id=request.conversation_id)
    answer.trace.record(role, generation)
    return generation


def _with_system_note(messages: list[dict[str, Any]], note: str) -> list[dict[str, Any]]:
    """``messages`` with ``note`` closing the system message (one is added when there is none)."""
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0]["content"] = f"{out[0]['content']}\n\n{note}"
    else:
        out.insert(0, {"role": "system", "content": note})
    return out


def _forced_call(text: str) -> str:
    """A prefilled call cut to its first complete JSON object and closed with its tag: models
    end it with ``</tool_call>``, a stray code fence or nothing at all."""
    start = text.find("{")
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except (json.JSONDecodeError, ValueError):
        return text  # left to the parser, which reports it as an invalid call
    return f"{text[:end]}\n</tool_call>"


def _final_answer(fmt: ReasoningFormat, text: str) -> str:
    """The answer part of a tool-format answer that holds a ``Final answer:`` line."""
    if fmt.end_of_reasoning(text) is not None:
        return fmt.extract_answer(text)
    return text.strip()


def _awaits_tools(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether this turn has no tool result yet: the last message is the user's."""
    return bool(messages) and messages[-1].get("role") == "user"
