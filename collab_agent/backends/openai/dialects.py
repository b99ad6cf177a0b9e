"""What kind of server answers: the facts a probe (``GET /models``) learns about it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ServerInfo", "server_info"]


@dataclass(frozen=True)
class ServerInfo:
    """What a probe learned about the server.

    Attributes:
        dialect: ``"llama.cpp"``, ``"llama-cpp-python"``, ``"vllm"``, ``"sglang"``,
            ``"deepseek"`` or ``"unknown"``.
        model_ids: the ids ``GET /models`` listed.
        continues_assistant: whether a trailing assistant message is continued by the chat
            endpoint (``False`` for llama-cpp-python, which starts a new turn).
        template_endpoint: whether the server renders chat templates (llama.cpp
            ``/apply-template``).
        names_stop_string: whether a response says which stop string ended it (vLLM's
            ``stop_reason``, SGLang's ``matched_stop``); otherwise it is inferred.
        echoes_prompt_logprobs: whether completions with ``echo`` return the prompt tokens'
            logprobs (vLLM, llama-cpp-python), which `OpenAIBackend.score` needs; llama.cpp's
            own server ignores ``echo``.
    """

    dialect: str
    model_ids: tuple[str, ...] = ()
    continues_assistant: bool = False
    template_endpoint: bool = False
    names_stop_string: bool = False
    echoes_prompt_logprobs: bool = True


DIALECTS: dict[str, ServerInfo] = {
    "llama.cpp": ServerInfo(
        "llama.cpp", continues_assistant=True, template_endpoint=True, echoes_prompt_logprobs=False
    ),
    "llama-cpp-python": ServerInfo("llama-cpp-python"),
    "vllm": ServerInfo("vllm", continues_assistant=True, names_stop_string=True),
    "sglang": ServerInfo("sglang", continues_assistant=True, names_stop_string=True),
    "deepseek": ServerInfo("deepseek", continues_assistant=True, echoes_prompt_logprobs=False),
    "unknown": ServerInfo("unknown"),
}
_OWNERS = {"llamacpp": "llama.cpp", "me": "llama-cpp-python", "vllm": "vllm", "sglang": "sglang"}
"""``owned_by`` of a listed model -> the server's dialect."""


def server_info(base_url: str, models: Any) -> ServerInfo:
    """The facts of the server at ``base_url`` that listed ``models`` (``None``: no listing)."""
    data = models.get("data") if isinstance(models, Mapping) else None
    ids = (
        tuple(str(m.get("id")) for m in data if isinstance(m, Mapping))
        if isinstance(data, list)
        else ()
    )
    return replace(DIALECTS[_dialect_of(base_url, data)], model_ids=ids)


def _dialect_of(base_url: str, data: Any) -> str:
    if "deepseek.com" in (urlsplit(base_url).hostname or ""):
        return "deepseek"
    if isinstance(data, list) and data and isinstance(data[0], Mapping):
        owner = str(data[0].get("owned_by", ""))
        return _OWNERS.get(owner, "unknown")
    return "unknown"
