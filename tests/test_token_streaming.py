"""Token streaming from the real local backends: `TransformersBackend.stream` and
`CollabChatModel.astream` over two tiny random-weight transformers models.

What a chat UI relies on: text arrives token by token; the deltas joined are exactly what
``generate`` / ``invoke`` return; a stop string is never shown; leaving a stream early stops the
decode and leaves the backend usable for the next call.
"""

from __future__ import annotations

from typing import Any

import pytest

from collab_agent.backends.base import GREEDY, GenerateRequest, Generation
from collab_agent.backends.batching import BatchedTransformersBackend
from collab_agent.backends.local import TransformersBackend
from collab_agent.backends.tiny import TinyPair
from collab_agent.chat_model import CollabChatModel
from collab_agent.policies import TrigReason

QUESTION = "What is 2 + 3?"


def request(conversation_id: str = "c", **overrides: Any) -> GenerateRequest:
    fields: dict[str, Any] = {
        "conversation_id": conversation_id,
        "messages": [{"role": "user", "content": QUESTION}],
        "sampling": GREEDY,
        "max_tokens": 24,
        "logprobs": True,
    }
    fields.update(overrides)
    return GenerateRequest(**fields)


def backends(tiny_pair: TinyPair) -> tuple[TransformersBackend, TransformersBackend]:
    small = TransformersBackend(tiny_pair.small, tiny_pair.tokenizer, name="tiny-small")
    large = TransformersBackend(tiny_pair.large, tiny_pair.tokenizer, name="tiny-large")
    return small, large


def chat_model(tiny_pair: TinyPair, **fields: Any) -> CollabChatModel:
    """The large model writes two steps, then the small one; six answer tokens, greedy."""
    small, large = backends(tiny_pair)
    fields.setdefault("policy", TrigReason(priming_steps=2))
    return CollabChatModel(
        small=small,
        large=large,
        max_steps=3,
        step_max_tokens=8,
        max_tokens=6,
        temperature=0,
        **fields,
    )


async def collect(stream: Any) -> tuple[list[str], Generation]:
    items = [item async for item in stream]
    *deltas, generation = items
    assert isinstance(generation, Generation)
    assert all(isinstance(d, str) and d for d in deltas)
    return deltas, generation


def same_generation(a: Generation, b: Generation) -> None:
    assert (a.text, a.stop_reason, a.stop_string) == (b.text, b.stop_reason, b.stop_string)
    assert (a.prompt_tokens, a.completion_tokens) == (b.prompt_tokens, b.completion_tokens)
    assert a.logprobs == pytest.approx(b.logprobs)


# ============================================================================ the backend
async def test_stream_yields_token_deltas_that_join_to_what_generate_returns(
    tiny_pair: TinyPair,
) -> None:
    backend, _ = backends(tiny_pair)
    expected = await backend.generate(request("a"))
    deltas, generation = await collect(backend.stream(request("b")))
    assert len(deltas) >= 10  # about one per token, not one per call
    assert "".join(deltas) == generation.text
    same_generation(generation, expected)


async def test_a_stop_string_is_never_shown_in_a_delta(tiny_pair: TinyPair) -> None:
    backend, _ = backends(tiny_pair)
    whole = (await backend.generate(request("a", max_tokens=30))).text
    # A stop string of text the model does write, spanning token boundaries.
    stop = whole[len(whole) // 2 : len(whole) // 2 + 4]
    assert stop.strip()
    expected = await backend.generate(request("b", max_tokens=30, stop=(stop,)))
    assert expected.stop_reason == "step"
    deltas, generation = await collect(backend.stream(request("c", max_tokens=30, stop=(stop,))))
    assert stop not in "".join(deltas)
    assert "".join(deltas) == generation.text
    same_generation(generation, expected)


async def test_closing_a_stream_early_stops_the_decode_and_frees_the_backend(
    tiny_pair: TinyPair,
) -> None:
    backend, _ = backends(tiny_pair)
    stream = backend.stream(request("a", max_tokens=400))
    async for _delta in stream:
        break
    await stream.aclose()
    # The decode stopped well before max_tokens: the prompt plus a few tokens ran forward.
    prompt = len(backend.prompt_ids(request("a")))
    assert backend.processed_tokens < prompt + 50
    # The next call runs at once and the conversation's cache is still right.
    again = await backend.generate(request("a"))
    fresh, _ = backends(tiny_pair)
    same_generation(again, await fresh.generate(request("a")))


async def test_the_batched_backend_streams_its_batched_generation_whole(
    tiny_pair: TinyPair,
) -> None:
    backend = BatchedTransformersBackend(tiny_pair.small, tiny_pair.tokenizer, name="batched")
    expected = await backend.generate(request("a"))
    deltas, generation = await collect(backend.stream(request("b")))
    assert deltas == [expected.text]
    same_generation(generation, expected)


# ============================================================================ the chat model
async def test_astream_streams_reasoning_and_answer_token_by_token_and_joins_to_invoke(
    tiny_pair: TinyPair,
) -> None:
    chunks = [c async for c in chat_model(tiny_pair).astream(QUESTION)]
    reasoning = [c.additional_kwargs["reasoning_content"] for c in chunks if c.additional_kwargs]
    answer = [c.content for c in chunks if c.content]
    assert len(reasoning) >= 10  # the large model's steps, token by token
    assert len(answer) >= 3  # the answer, token by token
    first_answer = next(i for i, c in enumerate(chunks) if c.content)
    assert all(not c.additional_kwargs for c in chunks[first_answer:])  # reasoning comes first

    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    result = await chat_model(tiny_pair).ainvoke(QUESTION)
    assert full.content == result.content
    assert (
        full.additional_kwargs["reasoning_content"] == result.additional_kwargs["reasoning_content"]
    )


async def test_leaving_astream_early_leaves_the_backends_usable(tiny_pair: TinyPair) -> None:
    model = chat_model(tiny_pair)
    async for _chunk in model.astream(QUESTION):
        break
    result = await model.ainvoke(QUESTION)
    assert result.content == (await chat_model(tiny_pair).ainvoke(QUESTION)).content


async def test_step_granularity_still_yields_one_reasoning_chunk_per_step(
    tiny_pair: TinyPair,
) -> None:
    model = chat_model(tiny_pair, stream_granularity="step")
    chunks = [c async for c in model.astream(QUESTION)]
    reasoning = [c.additional_kwargs["reasoning_content"] for c in chunks if c.additional_kwargs]
    result = await chat_model(tiny_pair).ainvoke(QUESTION)
    steps = result.response_metadata["collab"]["steps"]
    assert len(reasoning) == len(steps)
    assert "".join(reasoning) == result.additional_kwargs["reasoning_content"]
