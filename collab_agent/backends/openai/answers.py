"""Reading the fields of an answer body: its first choice, logprobs, usage, native tool calls
and echoed prompt logprobs. A field of the wrong type raises `TypeError`/`ValueError`, which
the backend reports as a malformed answer."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from collab_agent.backends.toolcalls import parse_tool_calls

LOGPROB_SLACK = 1e-6
"""How far above 0 a logprob may be (rounding on the server) before it is rejected."""


def first_choice(data: Any, what: str) -> Mapping[str, Any]:
    """``data["choices"][0]``; `TypeError` naming what is missing."""
    if not isinstance(data, Mapping):
        raise TypeError(f"the {what} body is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise TypeError("the answer has no choices")
    if not isinstance(choices[0], Mapping):
        raise TypeError("choices[0] is not an object")
    return choices[0]


def text_field(value: Any, where: str) -> str:
    """A text field (``None`` reads as ``""``); `TypeError` when it is not a string."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{where} is {type(value).__name__}, not a string")
    return value


def logprob(value: Any) -> float:
    """A logprob as the server must send it: a JSON number, at most 0 (``-inf`` allowed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a logprob is {type(value).__name__} {value!r}, not a number")
    if math.isnan(value) or value > LOGPROB_SLACK:
        raise ValueError(f"a logprob is {value!r}, not a number <= 0")
    return float(value)


def chosen_logprobs(logprobs: Any) -> list[float] | None:
    """Chosen-token logprobs from either dialect: ``{"content": [{"logprob": x}, ...]}``
    (OpenAI chat, llama.cpp completions) or legacy ``{"token_logprobs": [x, ...]}``."""
    if not isinstance(logprobs, Mapping):
        return None
    content = logprobs.get("content")
    if isinstance(content, list):
        return [
            logprob(e["logprob"])
            for e in content
            if isinstance(e, Mapping) and e.get("logprob") is not None
        ]
    legacy = logprobs.get("token_logprobs")
    if isinstance(legacy, list):
        return [logprob(x) for x in legacy if x is not None]
    return None


def top_logprobs(logprobs: Any) -> list[dict[str, float]] | None:
    """Per generated token, ``{token: logprob}`` of the alternatives, from either dialect."""
    if not isinstance(logprobs, Mapping):
        return None
    content = logprobs.get("content")
    if isinstance(content, list):
        return [
            {str(t.get("token")): logprob(t["logprob"]) for t in e.get("top_logprobs") or []
             if isinstance(t, Mapping) and t.get("logprob") is not None}
            for e in content if isinstance(e, Mapping)
        ]  # fmt: skip
    legacy = logprobs.get("top_logprobs")
    if isinstance(legacy, list):
        return [{str(k): logprob(v) for k, v in (e or {}).items()} for e in legacy]
    return None


def usage(data: Mapping[str, Any]) -> tuple[int, int, int]:
    """(prompt, cached, completion) tokens; prompt includes cached."""
    found = data.get("usage") or {}
    if not isinstance(found, Mapping):
        raise TypeError(f"usage is {type(found).__name__}, not an object")
    prompt = int(found.get("prompt_tokens") or 0)
    completion = int(found.get("completion_tokens") or 0)
    details = found.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    if cached is None:
        timings = data.get("timings") or {}
        cached = timings.get("cache_n", data.get("tokens_cached"))
    cached = int(cached or 0)
    if not prompt:
        timings = data.get("timings") or {}
        prompt = int(timings.get("prompt_n") or 0) + cached
    return prompt, min(cached, prompt) if prompt else cached, completion


def native_call(call: Any) -> dict[str, Any] | None:
    """A server's native tool call (``{"id", "function": {"name", "arguments"}}``) as
    ``{"id", "name", "args", "type"}``; ``None`` when its arguments are not a JSON object."""
    if not isinstance(call, Mapping):
        return None
    parsed = parse_tool_calls(json.dumps([call]))
    return parsed.tool_calls[0] if parsed.tool_calls else None


def completion_tokens(data: Any) -> int:
    """Tokens the server generated after the echoed prompt (``usage``; 1 when it says nothing,
    as a ``max_tokens=1`` call generates one)."""
    found = data.get("usage") if isinstance(data, Mapping) else None
    count = found.get("completion_tokens") if isinstance(found, Mapping) else None
    return count if isinstance(count, int) and count >= 0 else 1


def suffix_logprobs(
    tokens: Sequence[Any], values: Sequence[Any], continuation: str, generated: int
) -> list[float]:
    """The logprobs of the echoed prompt tokens that spell ``continuation``, the prompt's end.

    Walks back from the last prompt token (the ``generated`` ones after it dropped) while the
    token texts fit in the continuation. Token texts, not ``text_offset``: llama-cpp-python
    counts offsets in the text with special tokens removed, vLLM in the full prompt."""
    pairs = list(zip(tokens, values, strict=False))
    pairs = pairs[: max(0, len(pairs) - generated)]
    picked: list[float] = []
    covered = 0
    for token, value in reversed(pairs):
        width = len(str(token))
        if covered + width > len(continuation) or value is None:
            break
        covered += width
        picked.append(float(value))
    picked.reverse()
    return picked
