"""Errors as OpenAI's error JSON ``{"error": {"message", "type", "param", "code"}}``.

`APIError` carries the status; `error_response` renders any exception: typed collab-agent errors
map to 400 / 503 / 504, anything else to a 500 whose body names no file, line or traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse

from collab_agent.errors import (
    BackendUnavailableError,
    CallTimeoutError,
    CapabilityError,
    ConfigError,
    InvalidMessagesError,
)

log = logging.getLogger("collab_agent.serve")


class APIError(Exception):
    """An error the server answers with ``status`` and OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def to_api_error(error: BaseException) -> APIError:
    """The `APIError` an exception becomes (unexpected ones are logged here, with traceback)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, RequestValidationError):
        return _validation_error(error)
    if isinstance(error, ConfigError):
        return APIError(400, str(error), param=error.argument, code="invalid_value")
    if isinstance(error, InvalidMessagesError):
        return APIError(400, str(error), param="messages", code="invalid_value")
    if isinstance(error, CapabilityError):
        return APIError(400, str(error), code="unsupported")
    if isinstance(error, BackendUnavailableError):
        return APIError(
            503,
            "the large model is unavailable and this policy does not degrade to the small one: "
            f"{type(error).__name__}",
            type="server_error",
            code="model_unavailable",
            headers={"Retry-After": "5"},
        )
    if isinstance(error, CallTimeoutError):
        return APIError(504, str(error), type="server_error", code="timeout")
    log.error("internal error while serving a request", exc_info=error)
    return APIError(500, "internal server error", type="server_error", code="internal_error")


def _validation_error(error: RequestValidationError) -> APIError:
    first = error.errors()[0] if error.errors() else {}
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request body")
    if param:
        message = f"{param}: {message}"
    return APIError(400, message, param=param, code="invalid_value")


def error_response(error: BaseException) -> JSONResponse:
    api = to_api_error(error)
    return JSONResponse(api.body(), status_code=api.status, headers=api.headers)
