"""Token counts from the models' own tokenizers, offline, without running a model.

`CollabChatModel.get_num_tokens*` and the context check before a call read them. A tokenizer
comes from a backend (`TokenizedBackend.local_tokenizer`) or, for a spec string, from the files
the spec names (no weights are loaded and no server is started).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from collab_agent.backends.base import GenerateRequest, TokenizedBackend
from collab_agent.backends.gguf import gguf_tokenizer
from collab_agent.errors import CapabilityError

__all__ = [
    "backend_tokenizer",
    "context_window",
    "gguf_tokenizer",
    "prompt_tokens",
    "spec_tokenizer",
    "text_tokens",
]


@functools.cache
def spec_tokenizer(spec: str) -> Any:
    """The tokenizer of the model a spec string names, read from local files only.

    Raises:
        CapabilityError: a kind whose tokenizer is not readable offline (``openai:``: the
            server's; pass an `OpenAIBackend` built with ``tokenizer=`` instead).
    """
    from collab_agent.backends.specs import parse_spec, spec_kind

    parsed = parse_spec(spec)
    read = spec_kind(parsed).tokenizer
    if read is None:
        raise CapabilityError(
            f"{spec}: the server's tokenizer cannot be read offline; pass "
            "OpenAIBackend(..., tokenizer=PATH_OR_BUNDLED_NAME) as the model to count tokens"
        )
    return read(parsed)


def backend_tokenizer(backend: Any) -> Any:
    """The tokenizer of a backend object or a spec string (``None`` when none is known)."""
    if isinstance(backend, str):
        return spec_tokenizer(backend)
    if isinstance(backend, TokenizedBackend):
        return backend.local_tokenizer()
    return None


def context_window(backend: Any) -> int | None:
    """A backend's context window in tokens (``None``: unknown)."""
    if isinstance(backend, TokenizedBackend):
        return backend.context_window
    return None


def text_tokens(tokenizer: Any, text: str) -> list[int]:
    """The token ids of plain text (no special tokens added)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_tokens(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> int:
    """Tokens of the chat rendered with the tokenizer's template and a generation prompt (the
    prompt a model reads before its first reasoning token)."""
    from collab_agent.backends.local import prompt_token_ids

    request = GenerateRequest(conversation_id="count", messages=list(messages), tools=tools)
    return len(prompt_token_ids(tokenizer, request))
