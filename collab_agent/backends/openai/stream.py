"""Reading an OpenAI-style SSE answer: chunks merged back into the body the same request
answers unstreamed.

A streamed completion arrives as chunks: each carries a piece of ``choices[0]``'s text (legacy
completions) or ``delta`` (chat), its logprobs entries, and, on the last ones, the finish reason
and usage. `StreamedBody` merges them into one non-streaming body, so the backend reads a
streamed answer with the same code (usage, stop reason, logprobs) as an unstreamed one.
`OpenStream` reads the chunks of one attempt within its deadline, with typed errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
import openai

from collab_agent.backends.openai.client import HttpClient
from collab_agent.backends.openai.errors import BackendConnectionError
from collab_agent.errors import BackendError

__all__ = ["OpenStream", "StreamedBody"]

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


@dataclass
class OpenStream:
    """An SSE answer being read: the chunks merged so far and the attempt's deadline
    (``anyio.current_time()`` seconds); ``what`` names the request in errors."""

    http: HttpClient
    sse: openai.AsyncStream[object]
    merged: StreamedBody
    deadline: float
    what: str

    async def read(self) -> bool:
        """Merge the next chunk; False at the end of the stream. Typed errors, raised outside
        the ``except`` block (the SDK's exception holds the request's headers)."""
        http = self.http
        typed: BackendError
        try:
            with anyio.fail_after(max(0.0, self.deadline - anyio.current_time())):
                chunk = await self.sse.__anext__()
        except StopAsyncIteration:
            return False
        except (openai.OpenAIError, TimeoutError) as error:
            typed = http.typed(error, self.what)
        except httpx2.HTTPError as error:  # the connection broke mid-stream
            typed = BackendConnectionError(
                http.scrub(f"{http.name} ({self.what} at {http.base_url}): the stream "
                           f"broke ({type(error).__name__}: {error})")
            )  # fmt: skip
        except ValueError as error:  # a chunk that is not JSON
            typed = http.malformed(None, f"a stream chunk is not JSON ({error})")
        else:
            try:
                self.merged.add(chunk)
                return True
            except TypeError as error:
                typed = http.malformed(chunk, str(error))
        raise typed

    async def close(self) -> None:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self.sse.close()


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where} is {type(value).__name__}, not a string")
    return value
