"""Structured output: ``with_structured_output(method="json_schema" | "json_mode")`` and the
``response_format`` call option, honoured by constrained decoding or refused.

The answer is generated under the engine's own constraint (llama.cpp's ``json_schema``, an
OpenAI-compatible ``response_format`` on vLLM or a hosted API). A backend without constrained
decoding raises `CapabilityError` naming the method and the backend before any model runs
(`collab_agent.backends.constraints`); the method is never silently changed to a prompted tool
call. This module turns LangChain's schemas (pydantic classes, TypedDicts) into
``response_format``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.utils.function_calling import convert_to_json_schema

from collab_agent.errors import ConfigError

__all__ = ["METHODS", "check_response_format", "closed", "response_format_for", "schema_of"]

METHODS = ("function_calling", "json_schema", "json_mode")
"""The ``with_structured_output`` methods, as `ChatOpenAI` names them."""


def schema_of(schema: Any) -> dict[str, Any]:
    """The JSON schema of a pydantic class, a TypedDict, a function or a JSON-schema dict."""
    if (isinstance(schema, Mapping) and "properties" in schema) or (
        isinstance(schema, Mapping) and (schema.get("type") == "object")
    ):
        return dict(schema)
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
