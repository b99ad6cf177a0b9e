"""The request body of ``POST /v1/chat/completions`` (the OpenAI wire format), as pydantic.

Unknown OpenAI fields (``user``, ``metadata``, ...) are accepted and ignored; a field this server
cannot honour (``n`` above 1, ``logprobs``, ``response_format`` of type ``json_object``) is a 400
naming it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with ``usage``."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """What a client may send; messages stay plain dicts and are checked by the reasoner's own
    validation (and LangChain's conversion) so the errors name the message at fault."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: Literal[False] | None = None

    @property
    def answer_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the current name) or the older ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
