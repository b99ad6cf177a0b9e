"""Structured output: ``with_structured_output(method="json_schema" | "json_mode")`` and the
``response_format`` call option, honoured by constrained decoding or refused.

The answer is generated under the engine's own constraint (llama.cpp's ``json_schema``, an
OpenAI-compatible ``response_format`` on vLLM or a hosted API). A backend without constrained
decoding raises `CapabilityError` naming the method and the backend before any model runs;
the method is never silently changed to a prompted tool call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from collab_agent.errors import CapabilityError, ConfigError

METHODS = ("function_calling", "json_schema", "json_mode")
"""The ``with_structured_output`` methods, as `ChatOpenAI` names them."""


@runtime_checkable
class ConstrainedBackend(Protocol):
    """A backend that can constrain a generation to JSON (``GenerateRequest.response_format``)."""

    def constrains(self, response_format: Mapping[str, Any]) -> bool:
        """Whether this backend enforces ``response_format`` while decoding."""
        ...


def schema_of(schema: Any) -> dict[str, Any]:
    """The JSON schema of a pydantic class, a TypedDict, a function or a JSON-schema dict."""
    if (isinstance(schema, Mapping) and "properties" in schema) or (
        isinstance(schema, Mapping) and (schema.get("type") == "object")
    ):
        return dict(schema)
    from langchain_core.utils.function_calling import convert_to_json_schema

    try:
        return dict(convert_to_json_schema(schema))
    except Exception as error:  # LangChain raises ValueError/TypeError
        raise ConfigError(
            "schema",
            f"cannot be turned into a JSON schema ({error}); give a pydantic class, "
            "a TypedDict or a JSON-schema dict",
        ) from error


def response_format_for(schema: Any, method: str, strict: bool | None) -> dict[str, Any]:
    """The OpenAI-style ``response_format`` of a ``with_structured_output`` call."""
    if method == "json_mode":
        return {"type": "json_object"}
    if method != "json_schema":
        raise ConfigError("method", f"must be one of {list(METHODS)}, got {method!r}")
    if schema is None:
        raise ConfigError("schema", "method='json_schema' needs a schema (or use 'json_mode')")
    body = schema_of(schema)
    name = str(body.get("title") or getattr(schema, "__name__", None) or "answer")
    if strict:
        body = closed(body)
    spec: dict[str, Any] = {"name": name, "schema": body}
    if strict is not None:
        spec["strict"] = bool(strict)
    return {"type": "json_schema", "json_schema": spec}


def closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object, as OpenAI's strict mode
    requires: a grammar built from it then admits no key the schema does not name."""
    if isinstance(schema, Mapping):
        out = {key: closed(value) for key, value in schema.items()}
        if out.get("type") == "object" or "properties" in out:
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    return schema


def check_response_format(value: Any) -> dict[str, Any] | None:
    """A call's ``response_format`` in OpenAI's shape; ``{"type": "text"}`` and ``None`` mean
    no constraint. A pydantic class or JSON schema is wrapped as ``json_schema``."""
    if value is None:
        return None
    if isinstance(value, Mapping) and value.get("type") in ("text", "json_object", "json_schema"):
        if value["type"] == "text":
            return None
        if value["type"] == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
                raise ConfigError(
                    "response_format",
                    "a json_schema format needs {'json_schema': {'name': ..., 'schema': {...}}}",
                )
        return dict(value)
    return response_format_for(value, "json_schema", None)


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
