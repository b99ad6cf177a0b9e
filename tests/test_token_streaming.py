"""Token streaming from the real local backends: `TransformersBackend.stream`,
`BatchedTransformersBackend.stream` and `CollabChatModel.astream` over two tiny random-weight
transformers models.

What a chat UI relies on: text arrives token by token; the deltas joined are exactly what
``generate`` / ``invoke`` return; a stop string is never shown; leaving a stream early stops the
decode and leaves the backend usable for the next call. In a batch also: concurrent streams get
their text while the batch decodes, and one slow or abandoned stream holds up no other.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

from collab_agent.backends.base import GREEDY, GenerateRequest, Generation
from collab_agent.backends.batching import BatchedTransformersBackend
from collab_agent.backends.local import TransformersBackend
from collab_agent.backends.tiny import TinyPair
from collab_agent.chat_model import CollabChatModel
from collab_agent.errors import BackendError
from collab_agent.limits import map_limited
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


def backends(
    tiny_pair: TinyPair, kind: type[TransformersBackend] = TransformersBackend
) -> tuple[TransformersBackend, TransformersBackend]:
    small = kind(tiny_pair.small, tiny_pair.tokenizer, name="tiny-small")
    large = kind(tiny_pair.large, tiny_pair.tokenizer, name="tiny-large")
    return small, large


def chat_model(
    tiny_pair: TinyPair, kind: type[TransformersBackend] = TransformersBackend, **fields: Any
) -> CollabChatModel:
    """The large model writes two steps, then the small one; six answer tokens, greedy."""
    small, large = backends(tiny_pair, kind)
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


# ============================================================================ the batching backend
def batched(tiny_pair: TinyPair, **options: Any) -> BatchedTransformersBackend:
    return BatchedTransformersBackend(tiny_pair.small, tiny_pair.tokenizer, name="b", **options)


async def generated(tiny_pair: TinyPair, requests: list[GenerateRequest]) -> list[Generation]:
    """The requests' `generate` results, together in a fresh batch."""
    return await map_limited(batched(tiny_pair).generate, requests, max_concurrency=len(requests))


async def test_concurrent_batched_streams_get_token_deltas_as_the_batch_decodes_them(
    tiny_pair: TinyPair,
) -> None:
    # A slice of one step: the worker returns to the event loop after every decode step.
    backend = batched(tiny_pair, decode_slice_s=0.0)
    requests = [request(f"s{i}", max_tokens=12 + 4 * i) for i in range(4)]
    expected = await generated(tiny_pair, requests)
    results: dict[int, tuple[list[str], Generation]] = {}
    first_delta_at: dict[int, int] = {}

    async def consume(i: int) -> None:
        async def noting_the_first_delta() -> Any:
            async for item in backend.stream(requests[i]):
                first_delta_at.setdefault(i, backend.decode_steps)
                yield item

        results[i] = await collect(noting_the_first_delta())

    async with anyio.create_task_group() as group:
        for i in range(len(requests)):
            group.start_soon(consume, i)

    assert backend.peak_batch_size > 1  # the streams decoded in one batch
    for i, want in enumerate(expected):
        deltas, generation = results[i]
        assert len(deltas) > 1
        assert "".join(deltas) == generation.text == want.text
        same_generation(generation, want)
        assert first_delta_at[i] < backend.decode_steps  # text came while the batch decoded
    assert backend.batch_size == 0 and backend.waiting == 0


async def test_batched_streams_never_show_a_stop_string_across_two_tokens(
    tiny_pair: TinyPair,
) -> None:
    tokenizer = tiny_pair.tokenizer
    free = await generated(tiny_pair, [request(f"f{i}", max_tokens=20) for i in range(3)])
    requests = []
    for i, generation in enumerate(free):
        ids = tokenizer(generation.text, add_special_tokens=False)["input_ids"]
        # from the last character of token 3 into token 5: the stop string spans tokens
        start = len(tokenizer.decode(ids[:3])) - 1
        stop = generation.text[start : len(tokenizer.decode(ids[:5])) + 1]
        requests.append(request(f"s{i}", max_tokens=20, stop=(stop,)))
    expected = await generated(tiny_pair, requests)
    backend = batched(tiny_pair, decode_slice_s=0.0)

    results = await map_limited(
        lambda r: collect(backend.stream(r)), requests, max_concurrency=len(requests)
    )

    assert backend.peak_batch_size > 1
    for (deltas, generation), want, req in zip(results, expected, requests, strict=True):
        assert generation.stop_reason == "step" and generation.stop_string == req.stop[0]
        assert req.stop[0] not in "".join(deltas)
        assert "".join(deltas) == generation.text == want.text
        same_generation(generation, want)


@pytest.mark.parametrize("close", ["aclose", "cancel"])
async def test_a_batched_stream_left_early_frees_its_row_and_a_slow_one_stalls_no_other(
    tiny_pair: TinyPair, close: str
) -> None:
    """The victim's consumer holds its first delta until the other streams are done (they
    must finish meanwhile), then leaves: by ``aclose`` or by its task being cancelled."""
    backend = batched(tiny_pair)
    requests = [request(f"s{i}", max_tokens=10 + 3 * i) for i in range(3)]
    expected = await generated(tiny_pair, requests)
    others_done = anyio.Event()
    results: list[tuple[list[str], Generation]] = []
    victim_deltas: list[str] = []

    async def victim() -> None:
        stream = backend.stream(request("victim", max_tokens=4000))
        try:
            async for item in stream:
                assert isinstance(item, str)
                victim_deltas.append(item)
                await others_done.wait()  # a slow consumer: nobody waits on it
                if close == "aclose":
                    break
                # else it reads on until the test cancels its task, inside the stream or not
        finally:
            await stream.aclose()

    async def others() -> None:
        results.extend(
            await map_limited(
                lambda r: collect(backend.stream(r)), requests, max_concurrency=len(requests)
            )
        )
        others_done.set()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            group.start_soon(victim)
            await anyio.lowlevel.checkpoint()
            group.start_soon(others)
            await others_done.wait()
            if close == "cancel":
                await anyio.sleep(0.05)
                group.cancel_scope.cancel()

    assert len(victim_deltas) >= 1
    for (deltas, generation), want in zip(results, expected, strict=True):
        assert "".join(deltas) == generation.text
        same_generation(generation, want)
    assert backend.batch_size == 0 and backend.waiting == 0  # the victim's row is gone
    prompt = len(backend.prompt_ids(request("victim")))
    assert backend.processed_tokens < 4 * prompt + 1500  # the victim stopped long before 4000
    # and the backend goes on serving
    deltas, generation = await collect(backend.stream(requests[0]))
    assert "".join(deltas) == generation.text == expected[0].text


async def test_a_batched_stream_raises_its_row_error_and_the_others_finish(
    tiny_pair: TinyPair,
) -> None:
    backend = batched(tiny_pair)
    too_long = GenerateRequest("long", [{"role": "user", "content": "word " * 5000}], stop=())
    good = request("good", max_tokens=12)
    results = await map_limited(
        lambda r: collect(backend.stream(r)),
        [good, too_long],
        max_concurrency=2,
        return_exceptions=True,
    )
    assert isinstance(results[1], BackendError) and "context" in str(results[1])
    deltas, generation = results[0]
    assert "".join(deltas) == generation.text == (await generated(tiny_pair, [good]))[0].text


# ============================================================================ the chat model
@pytest.mark.parametrize(
    "kind", [TransformersBackend, BatchedTransformersBackend], ids=["local", "batched"]
)
async def test_astream_streams_reasoning_and_answer_token_by_token_and_joins_to_invoke(
    tiny_pair: TinyPair, kind: type[TransformersBackend]
) -> None:
    chunks = [c async for c in chat_model(tiny_pair, kind).astream(QUESTION)]
    reasoning = [c.additional_kwargs["reasoning_content"] for c in chunks if c.additional_kwargs]
    answer = [c.content for c in chunks if c.content]
    assert len(reasoning) >= 10  # the large model's steps, token by token
    assert len(answer) >= 3  # the answer, token by token
    first_answer = next(i for i, c in enumerate(chunks) if c.content)
    assert all(not c.additional_kwargs for c in chunks[first_answer:])  # reasoning comes first

    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    result = await chat_model(tiny_pair, kind).ainvoke(QUESTION)
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
