"""Backends declare their optional capabilities by having them; the reasoner and the triggers read
them with ``isinstance`` against the protocols of `collab_agent.backends.capabilities`."""

from __future__ import annotations

import pytest

from collab_agent.backends.base import ClosableBackend
from collab_agent.backends.capabilities import (
    Closable,
    Degradable,
    PrefillCounting,
    Releasable,
    Scoring,
    can_score,
)
from collab_agent.backends.openai import OpenAIBackend
from collab_agent.errors import CapabilityError
from collab_agent.policies import LargeSurprise, Policy
from collab_agent.reasoner import Reasoner
from collab_agent.testing import ScriptedBackend
from collab_agent.types import GenerateRequest

QUESTION = [{"role": "user", "content": "What is 3 + 4?"}]


def test_a_local_model_declares_scoring_counting_release_and_close(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    from collab_agent.backends.local import TransformersBackend

    backend = TransformersBackend(tiny_pair.small, tiny_pair.tokenizer, name="tiny")
    for capability in (Scoring, PrefillCounting, Releasable, Closable):
        assert isinstance(backend, capability), capability.__name__
    assert can_score(backend)
    assert not isinstance(backend, Degradable)


def test_a_scripted_backend_declares_only_release() -> None:
    scripted = ScriptedBackend([])
    assert isinstance(scripted, Releasable)
    for capability in (Scoring, PrefillCounting, Closable, Degradable):
        assert not isinstance(scripted, capability), capability.__name__
    assert not can_score(scripted)


async def test_a_server_backend_declares_close_and_what_to_do_when_unreachable() -> None:
    backend = OpenAIBackend("m", "http://127.0.0.1:1/v1", on_unavailable="degrade")
    try:
        assert isinstance(backend, Closable) and isinstance(backend, ClosableBackend)
        assert isinstance(backend, Degradable)
        assert Reasoner(ScriptedBackend([]), backend).on_large_unavailable == "degrade"
        assert Reasoner(backend, ScriptedBackend([])).on_large_unavailable == "fail"
    finally:
        await backend.aclose()


class EchoLessServer(ScriptedBackend):
    """A scoring backend whose engine says it cannot score (llama.cpp's own server ignores
    ``echo``; no real server here can be made to say so on demand)."""

    can_score = False

    async def score(self, request: GenerateRequest, continuation: str) -> list[float]:
        raise AssertionError("never called: the backend said it cannot score")


def test_a_backend_that_says_it_cannot_score_is_refused_before_any_call() -> None:
    large = EchoLessServer([], name="echo-less")
    assert isinstance(large, Scoring) and not can_score(large)
    with pytest.raises(CapabilityError, match="echo-less"):
        Reasoner(ScriptedBackend([]), large, Policy((LargeSurprise(),)))
    assert large.calls == 0


def test_the_old_scoring_name_still_imports() -> None:
    from collab_agent.policies.signals import ScoringBackend

    assert ScoringBackend is Scoring
