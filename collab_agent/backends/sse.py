"""Folding an OpenAI-style SSE stream back into the body the same request answers unstreamed.

A streamed completion arrives as chunks: each carries a piece of ``choices[0]``'s text (legacy
completions) or ``delta`` (chat), its logprobs entries, and, on the last ones, the finish reason
and usage. `StreamedBody` merges them into one non-streaming body, so the backend reads a streamed
answer with the same code (usage, stop reason, logprobs) as an unstreamed one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_CHOICE_TAGS = ("finish_reason", "stop_reason", "matched_stop")
"""Per-choice fields a later chunk settles (the last value sent wins)."""


class StreamedBody:
    """The chunks merged so far, as a non-streaming body (``data``) and its first choice.

    Args:
        chat: chunks carry ``choices[0].delta`` (chat) rather than ``choices[0].text``.
    """

    def __init__(self, *, chat: bool) -> None:
        self.chat = chat
        self.data: dict[str, Any] = {}
        self.choice: dict[str, Any] = {}
        self.text = ""
        self.reasoning_text = ""

    def add(self, chunk: Any) -> str:
        """Merge one chunk; return the text it added (reasoning text is kept apart)."""
        if not isinstance(chunk, Mapping):
            raise TypeError(f"a stream chunk is {type(chunk).__name__}, not an object")
        for key, value in chunk.items():
            if key != "choices" and value is not None:
                self.data[key] = value
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise TypeError("a stream chunk's choices is not a list")
        if not choices:
            return ""  # the usage-only chunk
        choice = choices[0]
        if not isinstance(choice, Mapping):
            raise TypeError("a stream chunk's choices[0] is not an object")
        for key in _CHOICE_TAGS:
            if choice.get(key) is not None:
                self.choice[key] = choice[key]
        self._add_logprobs(choice.get("logprobs"))
        if self.chat:
            delta = choice.get("delta") or {}
            if not isinstance(delta, Mapping):
                raise TypeError("a stream chunk's delta is not an object")
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            self.reasoning_text += _string(reasoning, "delta.reasoning_content")
            piece = _string(delta.get("content") or "", "delta.content")
        else:
            piece = _string(choice.get("text") or "", "choices[0].text")
        self.text += piece
        return piece

    def textless_tail(self) -> list[int]:
        """Token ids of the trailing logprobs entries that carry no text (``content`` format).

        Streaming, llama.cpp sends an entry for each token it holds back as part of a stop
        string, and one for the end-of-turn token, both without text; its unstreamed answer
        leaves the stop string's entries out. The caller tells the two apart by the ids."""
        logprobs = self.choice.get("logprobs")
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        ids: list[int] = []
        for entry in reversed(content or []):
            if not isinstance(entry, Mapping) or entry.get("token") or entry.get("bytes"):
                break
            if not isinstance(entry.get("id"), int):
                break
            ids.append(entry["id"])
        ids.reverse()
        return ids

    def restore_cut_token(self) -> None:
        """Give the last logprobs entry its token's whole text, where a stop string cut it.

        Streaming, llama.cpp sends the last token's text only up to a stop string inside it
        (``":"`` for the token ``":\\n\\n"`` with stop ``"\\n\\n"``), which hides that the answer
        ran into the stop; the entry's own ``top_logprobs`` still name the token whole (same
        id), as the unstreamed answer's entry does."""
        logprobs = self.choice.get("logprobs")
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        if not content or not isinstance(content[-1], dict):
            return
        last = content[-1]
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

    def drop_tail(self, count: int) -> None:
        """Forget the last ``count`` logprobs entries (tokens of a stop string left out)."""
        logprobs = self.choice.get("logprobs")
        if count and isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            del logprobs["content"][-count:]

    def _add_logprobs(self, logprobs: Any) -> None:
        if logprobs is None:
            return
        if not isinstance(logprobs, Mapping):
            raise TypeError("a stream chunk's logprobs is not an object")
        merged = self.choice.setdefault("logprobs", {})
        for key, value in logprobs.items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            elif value is not None:
                merged[key] = value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where} is {type(value).__name__}, not a string")
    return value


__all__ = ["StreamedBody"]
