"""Helpers for tests, ours and users': a backend that replays a script.

`ScriptedBackend` is a real `Backend`: the reasoner calls, counts and times it like any other,
so every trigger can be driven deterministically and the exact trace asserted.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel

from collab_agent.backends.base import GenerateRequest, Generation, StopReason
from collab_agent.backends.detokenize import cut_at_stop
from collab_agent.errors import BackendError, ConfigError


@dataclass(frozen=True)
class ScriptedStep:
    """One scripted generation.

    Attributes:
        text: the text the backend returns.
        logprobs: chosen-token logprob per token; ``None`` gives each whitespace-separated word
            one token with logprob -1.0.
        stop_reason: what the generation reports (``"step"``, ``"eos"``, ``"length"``).
        tool_calls: native tool calls to return, ``{"id", "name", "args"}``.
        top_logprobs: alternatives per token ``{token: logprob}``, returned when a request asks
            for top logprobs.
    """

    text: str
    logprobs: Sequence[float] | None = None
    stop_reason: StopReason = "step"
    tool_calls: Sequence[dict[str, Any]] = ()
    top_logprobs: Sequence[dict[str, float]] | None = None

    def token_logprobs(self) -> list[float]:
        if self.logprobs is not None:
            return [float(x) for x in self.logprobs]
        return [-1.0] * len(self.text.split())


class ScriptExhaustedError(BackendError):
    """A `ScriptedBackend` was called more often than its script has steps."""


ScriptItem = str | tuple[str, Sequence[float]] | ScriptedStep


class ScriptedBackend:
    """A backend that replays ``steps`` in order, one per `generate` call.

    Each item is a string (each whitespace-separated word one token with logprob -1.0), a
    ``(text, logprobs)`` pair, or a `ScriptedStep`. Every request is kept in ``requests`` so
    tests can check the prefix each call continued.

    Args:
        steps: the script.
        name: the model name shown in traces.
        delay: seconds each call sleeps (to test cancellation and timing).
    """

    def __init__(
        self, steps: Iterable[ScriptItem], *, name: str = "scripted", delay: float = 0.0
    ) -> None:
        self.script: list[ScriptedStep] = [_coerce(i, item) for i, item in enumerate(steps)]
        self.name = name
        self.delay = delay
        self.requests: list[GenerateRequest] = []
        self.released: list[str] = []
        self.cancelled = 0

    @property
    def calls(self) -> int:
        return len(self.requests)

    @property
    def remaining(self) -> int:
        return len(self.script) - len(self.requests)

    def constrains(self, response_format: Any) -> bool:
        """A script stands in for a constraining engine: it returns the scripted text for any
        ``response_format`` (script JSON to test structured output)."""
        return True

    async def generate(self, request: GenerateRequest) -> Generation:
        index = len(self.requests)
        self.requests.append(request)
        if index >= len(self.script):
            raise ScriptExhaustedError(
                f"{self.name}: call {index + 1} but the script has only {len(self.script)} step(s)"
            )
        item = self.script[index]
        started = time.perf_counter()
        if self.delay:
            try:
                await anyio.sleep(self.delay)
            except anyio.get_cancelled_exc_class():
                self.cancelled += 1
                raise
        logprobs = item.token_logprobs()
        text = item.text
        if item.stop_reason == "step" and request.stop:
            # Honour the request's stop strings as a real backend would.
            text, _ = cut_at_stop(text, request.stop)
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in request.messages)
        prompt_tokens += len(request.reasoning.split())
        return Generation(
            text=text,
            stop_reason=item.stop_reason,
            logprobs=logprobs if request.logprobs else None,
            top_logprobs=(
                [dict(t) for t in item.top_logprobs]
                if request.top_logprobs and item.top_logprobs is not None
                else None
            ),
            prompt_tokens=prompt_tokens,
            completion_tokens=len(logprobs),
            seconds=time.perf_counter() - started,
            tool_calls=[dict(c) for c in item.tool_calls],
        )

    async def stream(self, request: GenerateRequest) -> AsyncIterator[str | Generation]:
        """`generate`, then its text word by word (each word with the whitespace before it,
        as a tokenizer's pieces would come), then the `Generation`."""
        generation = await self.generate(request)
        for piece in _PIECES.findall(generation.text):
            await anyio.lowlevel.checkpoint()
            yield piece
        yield generation

    async def release(self, conversation_id: str) -> None:
        self.released.append(conversation_id)

    def __repr__(self) -> str:
        return f"ScriptedBackend(name={self.name!r}, steps={len(self.script)}, calls={self.calls})"


_PIECES = re.compile(r"\s*\S+|\s+")


def _coerce(index: int, item: ScriptItem) -> ScriptedStep:
    if isinstance(item, ScriptedStep):
        return item
    if isinstance(item, str):
        return ScriptedStep(item)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return ScriptedStep(item[0], tuple(item[1]))
    raise ConfigError(
        f"steps[{index}]",
        f"must be a string, a (text, logprobs) pair or a ScriptedStep, got {item!r}",
    )
