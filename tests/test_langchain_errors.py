"""Backend errors reach LangChain code typed as LangChain's model errors too: the backends
raise our `BackendError` family only, and the chat model adds LangChain's class for the same
condition where an error leaves it."""

from __future__ import annotations

import pytest
from langchain_core.exceptions import (
    ContextOverflowError,
    ModelAPIError,
    ModelError,
    ModelInvalidRequestError,
    ModelRateLimitError,
)
from servers import Reply, scripted

from collab_agent.backends.openai import (
    BackendContextOverflowError,
    BackendRateLimitError,
    BackendRequestError,
    BackendServerError,
    errors,
)
from collab_agent.chat_model import CollabChatModel
from collab_agent.errors import BackendError, BackendUnavailableError
from collab_agent.langchain_errors import LANGCHAIN_TYPES, as_langchain
from collab_agent.policies.fixed import LargeOnly
from collab_agent.testing import ScriptedBackend

KEY = "sk-lc-boundary-SECRET-13579"
OVERFLOW = {"error": {"message": "request (9000 tokens) exceeds the available context size"}}


def model_at(url: str) -> CollabChatModel:
    return CollabChatModel(
        small=ScriptedBackend(["Final answer: 4"]),
        large=f"openai:m@{url}",
        policy=LargeOnly(),
        backend_options={"mode": "chat-continue", "max_retries": 0},
    )


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


ERRORS = [
    c for c in vars(errors).values() if isinstance(c, type) and c.__module__ == errors.__name__
]


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_every_backend_error_has_a_langchain_kind_and_no_langchain_base(cls: type) -> None:
    assert issubclass(cls, BackendError) and cls in LANGCHAIN_TYPES
    assert not issubclass(cls, ModelError)


def test_all_ten_are_seen() -> None:
    assert len(ERRORS) == 10


def test_as_langchain_keeps_the_class_message_and_attributes() -> None:
    error = BackendRateLimitError("slow down", retry_after=7.0)
    typed = as_langchain(error)
    assert isinstance(typed, BackendRateLimitError) and isinstance(typed, ModelRateLimitError)
    assert isinstance(typed, BackendUnavailableError)
    assert str(typed) == "slow down" and typed.retry_after == 7.0
    assert type(typed).__name__ == "BackendRateLimitError"
    assert as_langchain(typed) is typed
    plain = BackendError("no kind")
    assert as_langchain(plain) is plain


async def test_context_overflow_through_the_chat_model_is_both_types() -> None:
    async with scripted(Reply(status=400, body=OVERFLOW)) as server:
        model = model_at(server.base_url)
        async with model:
            with pytest.raises(ContextOverflowError) as caught:
                await model.ainvoke("2 + 2?")
    assert isinstance(caught.value, BackendContextOverflowError)
    assert KEY not in str(caught.value) and KEY not in repr(caught.value)


@pytest.mark.parametrize(
    ("status", "ours", "theirs"),
    [
        (422, BackendRequestError, ModelInvalidRequestError),
        (503, BackendServerError, ModelAPIError),
    ],
)
def test_sync_invoke_raises_both_types(status: int, ours: type, theirs: type) -> None:
    import asyncio

    async def run() -> BaseException:
        async with scripted(Reply(status=status, body={"error": "no"})) as server:
            model = model_at(server.base_url)
            try:
                await asyncio.to_thread(model.invoke, "2 + 2?")
            except Exception as error:
                return error
            finally:
                await model.aclose()
        raise AssertionError("no error")

    error = asyncio.run(run())
    assert isinstance(error, ours) and isinstance(error, theirs)
