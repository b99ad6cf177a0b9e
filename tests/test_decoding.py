"""The local and the batching backend decode through one `SequenceDecoder`, on a tiny
random-weight Qwen2 model (float32).

The claim: for the same requests, the plain backend (one at a time) and the batching backend
(all in one batch) give identical generations: the same sampled token ids, text, stop reason and
stop string, token counts, logprobs and top alternatives, whether a request ends at a stop
string, at ``max_tokens`` or at an end-of-turn token.
"""

from __future__ import annotations

import pytest

from collab_agent.backends.base import GREEDY, GenerateRequest, Generation
from collab_agent.backends.batching import BatchedTransformersBackend
from collab_agent.backends.decoding import SequenceDecoder
from collab_agent.backends.detokenize import IncrementalText
from collab_agent.backends.local import TransformersBackend
from collab_agent.backends.tiny import TinyPair
from collab_agent.limits import map_limited

MESSAGES = [
    {"role": "system", "content": "Reason step by step."},
    {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples?"},
]


def request(conversation_id: str, **kwargs) -> GenerateRequest:
    kwargs.setdefault("stop", ())
    kwargs.setdefault("max_tokens", 24)
    return GenerateRequest(
        conversation_id, MESSAGES, sampling=GREEDY, logprobs=True, top_logprobs=3, **kwargs
    )


def observed(backend: TransformersBackend) -> dict[str, list[int]]:
    """Every token each conversation sampled, as the backend's ``on_generation`` reports it."""
    sampled: dict[str, list[int]] = {}
    backend.on_generation = lambda req, _prompt, ids: sampled.update(
        {req.conversation_id: list(ids)}
    )
    return sampled


async def test_local_and_batched_backends_decode_the_same_generations(
    tiny_pair: TinyPair,
) -> None:
    model, tokenizer = tiny_pair.small, tiny_pair.tokenizer
    # The greedy tokens of the prompt, then an end-of-turn token and a stop string cut from them
    probe = TransformersBackend(model, tokenizer)
    probe_ids = observed(probe)
    await probe.generate(request("probe", max_tokens=12))
    ids = probe_ids["probe"]
    end = next(j for j in range(4, len(ids)) if ids[j] not in ids[:j])
    text = IncrementalText(tokenizer)
    for token in ids[:end]:
        text.push(token)
    boundary = text.lengths[1]  # a stop string across the second and third tokens' texts
    stop = text.text[boundary - 1 : boundary + 1]
    assert len(stop) == 2, "the probe's first tokens have text"
    requests = [
        request("length", max_tokens=end - 1),
        request("step", stop=(stop, "never seen")),
        request("eos"),
        request("unmet-stop", stop=("never seen",), max_tokens=3),
    ]
    local = TransformersBackend(model, tokenizer)
    batched = BatchedTransformersBackend(model, tokenizer, max_batch_size=4)
    for backend in (local, batched):
        backend.eos_token_ids = backend.eos_token_ids | {ids[end]}
    local_ids, batched_ids = observed(local), observed(batched)

    alone = [await local.generate(r) for r in requests]
    together = await map_limited(batched.generate, requests, max_concurrency=len(requests))

    assert [g.stop_reason for g in alone] == ["length", "step", "eos", "length"]
    assert alone[0].completion_tokens == end - 1 and alone[2].completion_tokens == end
    assert alone[1].stop_string == stop and stop not in alone[1].text
    assert batched.peak_batch_size > 1  # the rows really decoded together
    for req, want, got in zip(requests, alone, together, strict=True):
        cid = req.conversation_id
        assert batched_ids[cid] == local_ids[cid]
        assert_same(got, want)


def assert_same(got: Generation, want: Generation) -> None:
    assert (got.text, got.stop_reason, got.stop_string) == (
        want.text,
        want.stop_reason,
        want.stop_string,
    )
    assert (got.prompt_tokens, got.completion_tokens) == (
        want.prompt_tokens,
        want.completion_tokens,
    )
    assert got.logprobs is not None and want.logprobs is not None
    assert len(got.logprobs) == got.completion_tokens
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert got.top_logprobs is not None and want.top_logprobs is not None
    assert len(got.top_logprobs) == got.completion_tokens
    for g, w in zip(got.top_logprobs, want.top_logprobs, strict=True):
        assert g.keys() == w.keys()
        assert list(g.values()) == pytest.approx(list(w.values()), abs=1e-4)


def forced(token: int, vocab: int):
    """Logits whose argmax is ``token``."""
    import torch

    logits = torch.zeros(vocab)
    logits[token] = 100.0
    return logits


def test_the_decoder_cuts_a_stop_across_tokens_and_never_streams_it(tiny_pair: TinyPair) -> None:
    tokenizer = tiny_pair.tokenizer
    ids = tokenizer("Four apples.\n\nThen more", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids[:3]] == ["Four", " apples", ".\n\n"]
    vocab = len(tokenizer)
    stop = "es.\n"  # starts inside " apples", ends inside ".\n\n"
    decoder = SequenceDecoder(request("c", stop=(stop,)), tokenizer, frozenset())
    deltas = []
    for token in ids:
        pending = decoder.advance(forced(token, vocab))
        deltas.append(decoder.take_delta())
        if pending is None:
            break
        assert pending == token

    generation = decoder.generation(prompt_tokens=5, cached_tokens=2, seconds=0.0)
    assert (generation.text, generation.stop_reason, generation.stop_string) == (
        "Four appl",
        "step",
        stop,
    )
    assert deltas == ["Four", " appl", ""]  # "es" held back until the next token settled it
    assert decoder.sampled == ids[:3] and decoder.tokens == ids[:2]  # " apples" straddles
    assert generation.completion_tokens == 2
    assert generation.logprobs is not None and len(generation.logprobs) == 2
    assert generation.top_logprobs is not None and len(generation.top_logprobs) == 2
    assert all(lp == pytest.approx(0.0, abs=1e-3) for lp in generation.logprobs)
