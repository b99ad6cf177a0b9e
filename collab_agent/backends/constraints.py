"""Constrained decoding at the backend level: whether a backend can honour a request's
``response_format``, and how it says it cannot.

A ``response_format`` is OpenAI's shape (``{"type": "json_object"}`` or ``{"type":
"json_schema", "json_schema": {"name": ..., "schema": {...}}}``); turning a pydantic class or a
TypedDict into one is the LangChain layer's job (`collab_agent.langchain.structured`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from collab_agent.backends.capabilities import ConstrainedBackend
from collab_agent.errors import CapabilityError

__all__ = ["llamacpp_schema", "missing_constraint", "require_constraint"]


def require_constraint(backend: Any, response_format: Mapping[str, Any], role: str) -> None:
    """Raise `CapabilityError` unless ``backend`` enforces ``response_format`` while decoding."""
    if isinstance(backend, ConstrainedBackend) and backend.constrains(response_format):
        return
    method = "json_mode" if response_format.get("type") == "json_object" else "json_schema"
    raise CapabilityError(
        f"with_structured_output(method={method!r}) / response_format: the {role} model "
        f"{getattr(backend, 'name', type(backend).__name__)} ({type(backend).__name__}) has no "
        "constrained decoding here; serve it with llama.cpp (llamacpp: specs) or vLLM "
        "(openai: specs), or use method='function_calling'"
    )


def llamacpp_schema(response_format: Mapping[str, Any]) -> dict[str, Any]:
    """llama.cpp's ``json_schema`` field for an OpenAI ``response_format``."""
    if response_format.get("type") == "json_object":
        return {"type": "object"}
    return dict(response_format["json_schema"]["schema"])


def missing_constraint(name: str, response_format: Mapping[str, Any]) -> CapabilityError:
    """The error a backend raises when asked for a constraint it cannot enforce."""
    return CapabilityError(
        f"{name}: cannot constrain decoding to {response_format.get('type')!r}; use a llama.cpp "
        "or vLLM server, or method='function_calling'"
    )
