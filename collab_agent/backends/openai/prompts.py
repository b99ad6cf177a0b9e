"""The prompt of the ``completions`` mode: the chat template applied to a request's messages
with a generation prompt, plus the reasoning so far. Rendered by a local Hugging Face tokenizer
(given, or loaded offline from a path or ``bundled:NAME``) or by llama.cpp's ``/apply-template``
(``"server"``; each rendering kept for the next step of the same conversation)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from collab_agent._hf import IMPORT_LOCK
from collab_agent.errors import CapabilityError
from collab_agent.types import GenerateRequest

__all__ = ["TEMPLATE_CACHE_SIZE", "Prompts"]

TEMPLATE_CACHE_SIZE = 256
"""Chat templates rendered by the server kept per backend (oldest dropped first)."""

Post = Callable[[str, dict[str, Any], str], Awaitable[Any]]
"""POST (url, body, what) -> the answer body."""


class Prompts:
    """Renders prompts for one backend.

    Args:
        source: a tokenizer, its path or ``bundled:NAME``, ``"server"``, or ``None`` (not known
            yet: ``auto`` mode chooses after probing the server).
        backend: the backend's name, for messages.
    """

    def __init__(self, source: Any, backend: str) -> None:
        self.source: str | None = source if isinstance(source, str) or source is None else "given"
        self.backend = backend
        self._tokenizer: Any = None if isinstance(source, str) else source
        self._templates: dict[str, str] = {}

    def local_tokenizer(self) -> Any:
        """The tokenizer given or named (loaded offline), else ``None``."""
        if self._tokenizer is None and self.source in (None, "server"):
            return None
        if self._tokenizer is None:
            source = str(self.source)
            if source.startswith("bundled:"):
                from collab_agent.backends import bundled

                self._tokenizer = bundled.load_tokenizer(source.removeprefix("bundled:"))
            else:
                with IMPORT_LOCK:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(source)
        return self._tokenizer

    async def render(self, request: GenerateRequest, post: Post, root_url: str) -> str:
        """The chat template applied to the messages with a generation prompt, plus reasoning
        (``post`` reaches the server's ``/apply-template`` when the source is ``"server"``)."""
        messages = [dict(m) for m in request.messages]
        tools = [dict(t) for t in request.tools] if request.tools else None
        if self.source != "server":
            kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
            if tools:
                kwargs["tools"] = tools
            rendered = self.local_tokenizer().apply_chat_template(messages, **kwargs)
            return str(rendered) + request.reasoning
        body: dict[str, Any] = {"messages": messages}
        if tools:
            body["tools"] = tools
        key = json.dumps(body, sort_keys=True, default=str)
        cached = self._templates.get(key)
        if cached is None:
            data = await post(f"{root_url}/apply-template", body, "apply-template")
            if not isinstance(data, Mapping) or not isinstance(data.get("prompt"), str):
                raise CapabilityError(
                    f"{self.backend}: the server has no /apply-template endpoint; pass tokenizer= "
                    "(a Hugging Face tokenizer or its path) to render the chat template locally"
                )
            cached = data["prompt"]
            if len(self._templates) >= TEMPLATE_CACHE_SIZE:
                self._templates.pop(next(iter(self._templates)))
            self._templates[key] = cached
        return cached + request.reasoning
