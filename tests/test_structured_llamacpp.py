"""Structured output on llama.cpp's real server: the answer is decoded under its JSON grammar
(SmolLM2-135M keeps this fast; on its own it rarely writes valid JSON for these prompts)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from collab_agent import CollabChatModel, OpenAIBackend, SmallOnly
from collab_agent.backends.base import GREEDY, GenerateRequest
from collab_agent.backends.llamacpp import LlamaCppServer

pytestmark = pytest.mark.server


class Answer(BaseModel):
    """The answer to an arithmetic question."""

    answer: int


@pytest.fixture
async def smol(smol_server: LlamaCppServer) -> Any:
    backend = OpenAIBackend("smol", smol_server.base_url, timeout=600)
    yield backend
    await backend.aclose()


async def test_a_json_schema_request_returns_text_matching_the_schema(smol: OpenAIBackend) -> None:
    schema = {**Answer.model_json_schema(), "additionalProperties": False}
    request = GenerateRequest(
        conversation_id="c",
        messages=[{"role": "user", "content": "What is 6 * 7? Think about it."}],
        sampling=GREEDY,
        max_tokens=32,
        stop=(),
        response_format={"type": "json_schema", "json_schema": {"name": "A", "schema": schema}},
    )
    generation = await smol.generate(request)
    assert set(json.loads(generation.text)) == {"answer"}


async def test_with_structured_output_json_schema_and_json_mode_on_llamacpp(
    smol: OpenAIBackend,
) -> None:
    model = CollabChatModel(
        small=smol, large=smol, policy=SmallOnly(), reasoning_budget=16, max_tokens=32
    )
    parsed = await model.with_structured_output(Answer, method="json_schema", strict=True).ainvoke(
        "What is 6 * 7?"
    )
    assert isinstance(parsed, Answer)
    loose = await model.with_structured_output(None, method="json_mode").ainvoke(
        "What is 6 * 7? Answer in JSON."
    )
    assert isinstance(loose, dict)


async def test_a_managed_llamacpp_backend_constrains_without_probing_the_server(
    smol_server: LlamaCppServer,
) -> None:
    from collab_agent.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(str(smol_server.model_path), server=smol_server)
    try:
        model = CollabChatModel(
            small=backend, large=backend, policy=SmallOnly(), reasoning_budget=8, max_tokens=32
        )
        parsed = await model.with_structured_output(
            Answer, method="json_schema", strict=True
        ).ainvoke("Tell me a joke about cats.")
        assert isinstance(parsed, Answer)
    finally:
        await backend.aclose()
