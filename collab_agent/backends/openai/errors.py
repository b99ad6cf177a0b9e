"""The typed errors of an OpenAI-compatible server, and which of them are retried.

Each is a `BackendError` (never retried) or a `BackendUnavailableError` (retried, then raised;
``on_unavailable="degrade"`` applies). They carry no LangChain base: the chat model gives them
LangChain's model-error types where they cross into LangChain (`collab_agent.langchain.errors`).
"""

from __future__ import annotations

import email.utils
import math
import time

import openai

from collab_agent.errors import BackendError, BackendUnavailableError


class BackendTimeoutError(BackendUnavailableError):
    """The server did not answer within the deadline (after the retries)."""


class BackendConnectionError(BackendUnavailableError):
    """The server could not be reached (refused, reset, closed mid-response)."""


class BackendRateLimitError(BackendUnavailableError):
    """The server answered 429 (after the retries). ``retry_after`` is its hint, seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendServerError(BackendUnavailableError):
    """The server answered 5xx (after the retries)."""


class BackendProtocolError(BackendUnavailableError):
    """The server answered 2xx with a body that is not a valid completion (truncated or empty
    JSON, ``choices`` missing or ``null``, a message or ``usage`` of the wrong type, a
    non-numeric logprob). Retried like a 5xx: a flaky proxy or an overloaded server answers
    garbage now and then; after the retries it is unavailable (so ``degrade`` applies)."""


class BackendContextOverflowError(BackendError):
    """The prompt plus ``max_tokens`` exceed the model's context window (never retried)."""


class BackendAuthenticationError(BackendError):
    """The server rejected the API key (401; never retried)."""


class BackendPermissionError(BackendError):
    """The key lacks permission for this request (403; never retried)."""


class BackendNotFoundError(BackendError):
    """The model or endpoint does not exist on this server (404; never retried)."""


class BackendRequestError(BackendError):
    """The server rejected the request as invalid (other 4xx; never retried)."""


RETRYABLE = (
    BackendTimeoutError,
    BackendConnectionError,
    BackendRateLimitError,
    BackendServerError,
    BackendProtocolError,
)
"""The failures a later attempt may not meet."""


def retry_after(error: openai.APIStatusError) -> float | None:
    """The server's wait hint in seconds: ``Retry-After-Ms``, ``Retry-After`` as seconds or an
    HTTP date. Anything unreadable (``soon``, ``nan``, a malformed date) is no hint at all."""
    headers = error.response.headers
    value = headers.get("retry-after-ms")
    if value:
        seconds = _finite(value)
        if seconds is not None:
            return max(seconds / 1000.0, 0.0)
    value = headers.get("retry-after")
    if not value:
        return None
    seconds = _finite(value)
    if seconds is not None:
        return max(seconds, 0.0)
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(parsed.timestamp() - time.time(), 0.0)


def _finite(value: str) -> float | None:
    """``float(value)`` when it is a number other than NaN (infinity stays: "wait forever")."""
    try:
        number = float(value)
    except ValueError:
        return None
    return None if math.isnan(number) else number
