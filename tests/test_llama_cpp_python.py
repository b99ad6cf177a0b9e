"""OpenAIBackend against llama-cpp-python's real server (the legacy dialect) on 127.0.0.1.

Its server differs from llama.cpp's own in the ways the backend must handle: legacy completions
logprobs (``token_logprobs`` / ``top_logprobs`` lists), no template endpoint and a chat endpoint
that starts a new turn after a trailing assistant message (so continuing reasoning needs a local
tokenizer and ``/completions``), and one request at a time.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from servers import SMOL, LlamaCppPythonServer

from collab_agent.backends.base import GREEDY, GenerateRequest
from collab_agent.backends.openai import OpenAIBackend
from collab_agent.errors import CapabilityError
from collab_agent.policies.fixed import SmallOnly
from collab_agent.reasoner import Reasoner

pytestmark = pytest.mark.server

LIST = [
    {
        "role": "user",
        "content": "List three fruits, one per paragraph, with a blank line between them.",
    }
]


def request(**overrides: Any) -> GenerateRequest:
    fields: dict[str, Any] = {
        "conversation_id": "c",
        "messages": LIST,
        "sampling": GREEDY,
        "max_tokens": 24,
    }
    fields.update(overrides)
    return GenerateRequest(**fields)


@pytest.fixture
async def backend(llama_cpp_python_server: LlamaCppPythonServer) -> Any:
    backend = OpenAIBackend(
        "smol", llama_cpp_python_server.base_url, tokenizer=f"bundled:{SMOL}", timeout=300
    )
    yield backend
    await backend.aclose()


async def test_the_server_is_recognised_and_reasoning_goes_through_completions(
    backend: OpenAIBackend,
) -> None:
    info = await backend.probe()
    assert info.dialect == "llama-cpp-python"
    assert not info.continues_assistant and not info.template_endpoint
    generation = await backend.generate(request(reasoning="1. Apple", max_tokens=32))
    assert generation.stop_reason in ("step", "eos", "length")
    assert not generation.text.startswith("1. Apple")  # a continuation, not a repeat
    assert generation.prompt_tokens > 0 and generation.completion_tokens > 0


async def test_legacy_logprobs_are_read_and_a_stop_string_ends_the_step(
    backend: OpenAIBackend,
) -> None:
    generation = await backend.generate(
        request(reasoning="1. Apple\n\n2.", logprobs=True, top_logprobs=3, max_tokens=40)
    )
    assert generation.logprobs is not None and all(lp <= 0 for lp in generation.logprobs)
    assert "\n\n" not in generation.text
    if generation.stop_reason == "step":
        assert generation.stop_string == "\n\n"
    assert generation.top_logprobs is not None
    assert len(generation.top_logprobs) == len(generation.logprobs) >= 1
    for chosen, alternatives in zip(generation.logprobs, generation.top_logprobs, strict=True):
        assert 1 <= len(alternatives) <= 3 and all(v <= 0 for v in alternatives.values())
        # its server applies a repeat penalty (1.1) before choosing, so the chosen token need
        # not be the most likely one: the top alternative bounds it
        assert chosen <= max(alternatives.values()) + 1e-3


async def test_without_a_tokenizer_continuing_reasoning_says_what_is_missing(
    llama_cpp_python_server: LlamaCppPythonServer,
) -> None:
    backend = OpenAIBackend("smol", llama_cpp_python_server.base_url, timeout=300)
    try:
        with pytest.raises(CapabilityError, match="tokenizer="):
            await backend.generate(request(reasoning="1. Apple"))
        # a fresh answer needs no continuation: the chat endpoint serves it
        generation = await backend.generate(request(max_tokens=8, stop=()))
        assert generation.completion_tokens > 0
    finally:
        await backend.aclose()


async def test_concurrent_callers_are_all_served_by_a_one_at_a_time_server(
    backend: OpenAIBackend,
) -> None:
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        generation = await backend.generate(
            request(conversation_id=f"c{i}", reasoning=f"{i}. ", max_tokens=6, stop=())
        )
        results[i] = generation.text

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(one, i)
    assert sorted(results) == [0, 1, 2] and all(results.values())


async def test_a_reasoner_runs_on_it(backend: OpenAIBackend) -> None:
    reasoner = Reasoner(
        backend, backend, SmallOnly(), max_steps=2, step_max_tokens=16, answer_max_tokens=8
    )
    trace = await reasoner.run(LIST)
    assert trace.steps and all(s.author == "small" for s in trace.steps)
    assert trace.usage["small"].prompt_tokens > 0 and trace.usage["small"].completion_tokens > 0


async def test_score_reads_the_echoed_prompt_logprobs(backend: OpenAIBackend) -> None:
    """Scoring a text the server itself wrote greedily gives back the logprobs it wrote it with
    (the prefix-cached generation and the echoed prompt are the same computation)."""
    asked = request(reasoning="1. Apple\n\n", logprobs=True, stop=(), max_tokens=8)
    written = await backend.generate(asked)
    assert written.logprobs is not None and written.completion_tokens == 8
    scored = await backend.score(asked, written.text)
    assert backend.can_score is True
    assert len(scored) == len(written.logprobs)
    assert scored == pytest.approx(written.logprobs, abs=0.05)
    assert await backend.score(asked, "") == []
