"""Our backend errors typed as LangChain's model errors where they cross into LangChain.

The backends raise the `BackendError` family only (nothing under `collab_agent.backends`
imports LangChain). `CollabChatModel` re-raises each error that leaves it as a subclass of both
its own class and LangChain's ``langchain_core.exceptions`` class for the same condition, so
code around a LangChain model catches either (as LangChain asks of provider integrations).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from typing import ParamSpec, TypeVar

from langchain_core.exceptions import (
    ContextOverflowError,
    ModelAPIError,
    ModelAuthenticationError,
    ModelConnectionError,
    ModelError,
    ModelInvalidRequestError,
    ModelNotFoundError,
    ModelPermissionDeniedError,
    ModelRateLimitError,
    ModelTimeoutError,
)

from collab_agent.backends.openai import errors
from collab_agent.errors import BackendError

__all__ = ["LANGCHAIN_TYPES", "as_langchain", "langchain_typed"]

P = ParamSpec("P")
T = TypeVar("T")

LANGCHAIN_TYPES: dict[type[BackendError], type[ModelError]] = {
    errors.BackendTimeoutError: ModelTimeoutError,
    errors.BackendConnectionError: ModelConnectionError,
    errors.BackendRateLimitError: ModelRateLimitError,
    errors.BackendServerError: ModelAPIError,
    errors.BackendProtocolError: ModelAPIError,
    errors.BackendContextOverflowError: ContextOverflowError,
    errors.BackendAuthenticationError: ModelAuthenticationError,
    errors.BackendPermissionError: ModelPermissionDeniedError,
    errors.BackendNotFoundError: ModelNotFoundError,
    errors.BackendRequestError: ModelInvalidRequestError,
}
"""Each backend error class -> LangChain's class for the same condition."""


_DUALS: dict[type[BackendError], type[BackendError]] = {}


def _dual(ours: type[BackendError], theirs: type[ModelError]) -> type[BackendError]:
    """The subclass of both, named as ours (made once per class)."""
    if ours not in _DUALS:
        namespace = {"__module__": ours.__module__, "__qualname__": ours.__qualname__}
        _DUALS[ours] = type(ours.__name__, (ours, theirs), namespace)
    return _DUALS[ours]


def as_langchain(error: BaseException) -> BaseException:
    """``error`` as the subclass of its class and LangChain's class for its kind (same message
    and attributes); ``error`` itself when it has no LangChain kind or already has it."""
    if not isinstance(error, BackendError) or isinstance(error, ModelError):
        return error
    kind = next((LANGCHAIN_TYPES[c] for c in type(error).__mro__ if c in LANGCHAIN_TYPES), None)
    if kind is None:
        return error
    dual = _dual(type(error), kind)
    typed = dual.__new__(dual, *error.args)
    typed.__dict__.update(error.__dict__)
    typed.__traceback__ = error.__traceback__
    return typed


def langchain_typed(
    stream: Callable[P, AsyncIterator[T]],
) -> Callable[P, AsyncIterator[T]]:
    """Wrap an async generator function so the backend errors it raises leave it typed
    `as_langchain` (the wrapped generator is closed when the wrapper is)."""

    @functools.wraps(stream)
    async def typed(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
        try:
            async with contextlib.aclosing(stream(*args, **kwargs)) as inner:  # type: ignore[type-var]
                async for item in inner:
                    yield item
        except BackendError as error:
            mapped = as_langchain(error)
            if mapped is error:
                raise
            raise mapped from error.__cause__

    return typed
