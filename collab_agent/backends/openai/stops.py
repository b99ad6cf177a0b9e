"""Did an answer stop at a stop string (a reasoning step ended) or at the end of its turn?

The reasoner asks for a step with stop strings; the server ends the answer at one of them, at
its end-of-turn token, or at ``max_tokens``. Servers report it differently; `stop_reason` reads
every known report, in this order (the first rule that applies decides):

1. **A stop string left in the text** (some servers return it): cut there; a step.
2. ``finish_reason == "length"``: the budget ran out.
3. ``finish_reason == "tool_calls"``: the turn ended with tool calls.
4. **The server names it** (vLLM ``stop_reason``, SGLang ``matched_stop``): a string is the
   stop string met (a step); a token id (an int) is the end-of-turn token.
5. **No stop strings were asked for**: the end of the turn.
6. **llama.cpp, fewer logprobs entries than completion tokens**: it counts the stop string's
   tokens but sends logprobs only for the tokens before it; a step.
7. **The last token's text runs on into a stop string** (token ``":\\n"`` with stop ``"\\n"``):
   the server cut the text inside the token but sent its logprob; a step.
8. Otherwise the end of the turn.

A streamed llama.cpp answer reports the same facts another way; `settle_streamed` rewrites its
logprobs so that rules 6 and 7 read it as they read the unstreamed answer:

- the stop string's tokens come as trailing entries *without text*, as the end-of-turn token
  does: their ids are detokenized (one short call to the server) and, when they spell a stop
  string, dropped (rule 6 then applies); an end-of-turn token is kept (rule 8);
- a stop string inside the last token cuts that entry's ``token`` text (``":"`` for
  ``":\\n\\n"``): the entry's own ``top_logprobs`` name the token whole (same id), and the
  whole text is put back (rule 7 then applies).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from collab_agent.backends.detokenize import cut_at_stop
from collab_agent.types import StopReason

__all__ = ["cut_at_stop", "ran_into_stop", "settle_streamed", "stop_reason"]


def stop_reason(
    choice: Mapping[str, Any],
    text: str,
    stop: Sequence[str],
    *,
    completion_tokens: int,
    logprob_count: int | None,
) -> tuple[str, StopReason, str | None]:
    """``(text, reason, stop string)`` of an answer's first choice (rules 1-8 above).

    Args:
        choice: the answer's ``choices[0]`` (``finish_reason``, ``stop_reason``/``matched_stop``,
            ``logprobs``).
        text: its text (``text`` or ``message.content``).
        stop: the stop strings the request asked for.
        completion_tokens: the tokens the server says it generated.
        logprob_count: how many chosen-token logprobs it sent (``None``: none asked for).
    """
    text, left_in = cut_at_stop(text, stop)
    if left_in is not None:
        return text, "step", left_in
    finish = choice.get("finish_reason")
    if finish == "length":
        return text, "length", None
    if finish == "tool_calls":
        return text, "eos", None
    named = choice.get("stop_reason", choice.get("matched_stop"))
    if isinstance(named, str) and named:
        return text, "step", named
    if isinstance(named, int) or not stop:
        return text, "eos", None
    if (logprob_count is not None and completion_tokens > logprob_count) or ran_into_stop(
        choice.get("logprobs"), text, stop
    ):
        return text, "step", stop[0] if len(stop) == 1 else None
    return text, "eos", None


def ran_into_stop(logprobs: Any, text: str, stop: Sequence[str]) -> bool:
    """Whether the chosen tokens' own text runs past ``text`` into a stop string (rule 7)."""
    if not isinstance(logprobs, Mapping) or not stop:
        return False
    content = logprobs.get("content")
    if isinstance(content, list):
        pieces = [e.get("token") for e in content if isinstance(e, Mapping)]
    else:
        pieces = logprobs.get("tokens") or []
    if not isinstance(pieces, list) or not all(isinstance(p, str) for p in pieces):
        return False
    joined = "".join(str(p) for p in pieces)
    if len(joined) <= len(text) or not joined.startswith(text):
        return False
    rest = joined[len(text) :]
    return any(s and (rest.startswith(s) or s.startswith(rest)) for s in stop)


Detokenize = Callable[[list[int]], Awaitable[str | None]]
"""Token ids -> their text (``None``: the server cannot tell)."""


async def settle_streamed(
    choice: dict[str, Any], stop: Sequence[str], detokenize: Detokenize
) -> None:
    """Rewrite a merged streamed choice's logprobs so `stop_reason` reads it as the unstreamed
    answer (see the module docstring). Only a ``"stop"`` finish with stop strings is touched."""
    if not stop or choice.get("finish_reason") != "stop":
        return
    entries = _content(choice)
    held = _textless_tail(entries)
    if not held:
        _restore_cut_token(entries)
        return
    spelled = await detokenize(held)
    if isinstance(spelled, str) and any(s and s in spelled for s in stop):
        del entries[-len(held) :]


def _content(choice: Mapping[str, Any]) -> list[Any]:
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    return content if isinstance(content, list) else []


def _textless_tail(entries: list[Any]) -> list[int]:
    """Token ids of the trailing entries that carry no text."""
    ids: list[int] = []
    for entry in reversed(entries):
        if not isinstance(entry, Mapping) or entry.get("token") or entry.get("bytes"):
            break
        if not isinstance(entry.get("id"), int):
            break
        ids.append(entry["id"])
    ids.reverse()
    return ids


def _restore_cut_token(entries: list[Any]) -> None:
    """Give the last entry its token's whole text, as its ``top_logprobs`` name it."""
    if not entries or not isinstance(entries[-1], dict):
        return
    last = entries[-1]
    token = last.get("token")
    if not isinstance(token, str) or not isinstance(last.get("id"), int):
        return
    for other in last.get("top_logprobs") or []:
        whole = other.get("token") if isinstance(other, Mapping) else None
        if (
            other.get("id") == last["id"]
            and isinstance(whole, str)
            and len(whole) > len(token)
            and whole.startswith(token)
        ):
            last["token"] = whole
            return
