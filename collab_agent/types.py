"""Plain types every layer shares: roles, chat messages, sampling, a backend request and its
generation, why a generation stopped, and an API price.

This module is the bottom layer: it imports nothing of ours but the argument checks (which import
only `collab_agent.errors`), so the trace, prompting, policies and evaluation can name these types
without importing the backends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from collab_agent import _checks

__all__ = [
    "GREEDY",
    "MAX_TEMPERATURE",
    "MAX_TOP_LOGPROBS",
    "GenerateRequest",
    "Generation",
    "Message",
    "Price",
    "Role",
    "Sampling",
    "StopReason",
]

Role = Literal["small", "large"]
"""Which model of the pair: the small reasoning model (SRM) or the large one (LRM)."""

StopReason = Literal["step", "answer", "length", "eos"]
"""Why a generation ended: a stop string (the step delimiter), an answer marker, the token
limit, or the model's end of turn."""

Message = Mapping[str, Any]
"""A chat message in OpenAI's format: ``{"role": "user", "content": "..."}``; assistant
messages may carry ``tool_calls``, tool messages ``tool_call_id``."""


MAX_TEMPERATURE = 2.0
"""The highest sampling temperature accepted (the OpenAI API's own limit)."""


@dataclass(frozen=True)
class Sampling:
    """Sampling settings. Defaults are TrigReason's (temperature 0.6, top-p 0.95).

    ``temperature == 0`` means greedy decoding.
    """

    temperature: float = 0.6
    top_p: float = 0.95
    seed: int | None = None

    def __post_init__(self) -> None:
        _checks.in_range("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _checks.in_range("top_p", self.top_p, 0.0, 1.0, low_open=True)


GREEDY = Sampling(temperature=0.0, top_p=1.0)

MAX_TOP_LOGPROBS = 20
"""The most alternatives per token a request may ask for (the OpenAI API's own limit)."""


@dataclass(frozen=True)
class GenerateRequest:
    """One call to a backend.

    Attributes:
        conversation_id: stable id of the conversation; local backends key their KV cache on it.
        messages: the chat so far in OpenAI format (system prompt included), never empty.
        reasoning: the assistant text written so far, by either model; the backend renders the
            chat with a generation prompt and continues this text verbatim.
        stop: stop strings; the returned text ends before the first one found.
        max_tokens: the most tokens to generate.
        sampling: temperature, top-p and seed.
        logprobs: whether the chosen-token logprob of every generated token is wanted.
        top_logprobs: how many most likely alternatives (token text -> logprob) to return for
            every generated token (0: none); SpecReason's expected score reads them.
        tools: tools in OpenAI format, rendered into the prompt (or sent natively).
        purpose: why the call is made (``"step"``, ``"answer"``, ``"judge"``, ``"score"``), for
            accounting and for backends that route answers through a chat endpoint.
        response_format: OpenAI's ``{"type": "json_object"}`` or ``{"type": "json_schema",
            "json_schema": {"name", "schema"}}``: the generation must be enforced to match it
            (constrained decoding); a backend that cannot raises `CapabilityError`.
    """

    conversation_id: str
    messages: Sequence[Message]
    reasoning: str = ""
    stop: Sequence[str] = ("\n\n",)
    max_tokens: int = 512
    sampling: Sampling = field(default_factory=Sampling)
    logprobs: bool = False
    top_logprobs: int = 0
    tools: Sequence[Mapping[str, Any]] | None = None
    purpose: str = "step"
    response_format: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.messages:
            raise _checks.ConfigError("messages", "must hold at least one message")
        _checks.positive_int("max_tokens", self.max_tokens)
        _checks.non_negative_int("top_logprobs", self.top_logprobs)
        if self.top_logprobs > MAX_TOP_LOGPROBS:
            raise _checks.ConfigError(
                "top_logprobs",
                f"at most {MAX_TOP_LOGPROBS} (OpenAI's limit), got {self.top_logprobs}",
            )


@dataclass
class Generation:
    """What a backend returns.

    Attributes:
        text: the generated text, without the stop string that ended it.
        stop_reason: ``"step"`` (a stop string), ``"eos"``, ``"length"`` or ``"answer"``.
        logprobs: the chosen-token logprob of each generated token, when requested.
        top_logprobs: per generated token, the most likely alternatives ``{token text: logprob}``
            when ``request.top_logprobs`` asked for them (``None`` when not asked or the server
            gave none).
        prompt_tokens: tokens of the prompt (conversation plus reasoning so far).
        cached_tokens: of those, how many were served from a cache, not recomputed.
        completion_tokens: tokens generated.
        seconds: wall time of the call.
        cost: price of the call in the backend's currency (0 for local models).
        tool_calls: native tool calls ``{"id", "name", "args"}`` when the server returned any.
        reasoning_text: reasoning a server returned apart from the text (``reasoning_content``).
        stop_string: the stop string that ended the text, if any.
        degraded: True when a fallback model wrote this instead of the one asked.
    """

    text: str
    stop_reason: StopReason
    logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cost: float = 0.0
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    reasoning_text: str = ""
    stop_string: str | None = None
    degraded: bool = False


@dataclass(frozen=True)
class Price:
    """API price in currency units per million tokens.

    Attributes:
        input: per million prompt tokens that are not served from the provider's cache.
        cached: per million prompt tokens served from the cache (``None``: same as ``input``).
        output: per million generated tokens.
    """

    input: float = 0.0
    cached: float | None = None
    output: float = 0.0

    def __post_init__(self) -> None:
        for name in ("input", "output"):
            _checks.in_range(name, getattr(self, name), 0.0, 1e9)
        if self.cached is not None:
            _checks.in_range("cached", self.cached, 0.0, 1e9)

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        """Price of one call; ``prompt_tokens`` includes the ``cached_tokens``."""
        cached_rate = self.input if self.cached is None else self.cached
        fresh = max(prompt_tokens - cached_tokens, 0)
        return (
            fresh * self.input + cached_tokens * cached_rate + completion_tokens * self.output
        ) / 1e6
