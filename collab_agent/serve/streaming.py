"""Parts as OpenAI wire objects: ``chat.completion.chunk`` events for ``stream: true`` (reasoning
as ``delta.reasoning_content``, the answer as ``delta.content``, then the end with ``collab``
and, when ``stream_options.include_usage`` asks, a usage chunk), or one ``chat.completion``."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

from collab_agent.serve.engine import Part, arguments_text
from collab_agent.serve.errors import APIError


class CompletionWriter:
    """Renders the parts of one completion; ``model`` is the policy name the client asked."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    # ------------------------------------------------------------------ streaming
    def chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        body.update(extra)
        return json.dumps(body, ensure_ascii=False)

    @staticmethod
    def error_event(error: APIError) -> str:
        """An error after the stream began: OpenAI's error JSON as the last event."""
        return json.dumps(error.body(), ensure_ascii=False)

    def first(self) -> str:
        return self.chunk({"role": "assistant", "content": ""})

    def events(self, part: Part, include_usage: bool) -> Iterable[str]:
        """The SSE data of one part."""
        if part.kind == "reasoning":
            yield self.chunk({"reasoning_content": part.text})
        elif part.kind == "content":
            delta: dict[str, Any] = {}
            if part.text:
                delta["content"] = part.text
            if part.tool_calls:
                delta["tool_calls"] = [
                    {
                        "index": i,
                        "id": c["id"],
                        "type": "function",
                        "function": {
                            "name": c["name"],
                            "arguments": arguments_text(c["arguments"]),
                        },
                    }
                    for i, c in enumerate(part.tool_calls)
                ]
            if delta:
                yield self.chunk(delta)
        else:
            yield self.chunk({}, part.finish_reason, collab=part.collab)
            if include_usage:
                body = json.loads(self.chunk({}))
                body["choices"] = []
                body["usage"] = part.usage
                yield json.dumps(body, ensure_ascii=False)

    # ------------------------------------------------------------------ whole
    def completion(self, parts: list[Part]) -> dict[str, Any]:
        reasoning = "".join(p.text for p in parts if p.kind == "reasoning")
        content = "".join(p.text for p in parts if p.kind == "content")
        calls = [c for p in parts if p.kind == "content" for c in p.tool_calls]
        end = next((p for p in parts if p.kind == "end"), Part("end", finish_reason="stop"))
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content if content or not calls else None,
            "reasoning_content": reasoning,
        }
        if calls:
            message["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": arguments_text(c["arguments"])},
                }
                for c in calls
            ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": end.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": end.usage,
            "collab": end.collab,
        }
