"""TransformersBackend on tiny random-weight Qwen2 models with the real Qwen tokenizer.

The claims: greedy text through prefix KV reuse equals a fresh ``model.generate`` on the same
full prompt, across model switches and rollbacks; only the new tokens are prefilled; stop strings
cut the text exactly; logprobs are real log-probabilities; caches are bounded and freed; a
cancelled caller stops the worker; errors are typed.
"""

from __future__ import annotations

import copy

import anyio
import pytest
import torch

from collab_agent.backends.base import GREEDY, GenerateRequest, Sampling
from collab_agent.backends.decoding import tokens_before
from collab_agent.backends.local import (
    TransformersBackend,
    common_prefix_length,
    find_stop,
    render_prompt,
)
from collab_agent.backends.tiny import TinyPair, tiny_qwen2
from collab_agent.errors import BackendError, ConfigError

QUESTION = [
    {"role": "system", "content": "Reason step by step."},
    {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples?"},
]


def request(conversation: str, reasoning: str = "", **kwargs) -> GenerateRequest:
    kwargs.setdefault("stop", ())
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("sampling", GREEDY)
    return GenerateRequest(conversation, QUESTION, reasoning=reasoning, **kwargs)


def reference(backend: TransformersBackend, req: GenerateRequest) -> str:
    """Greedy text of a fresh ``model.generate`` on the backend's full prompt for ``req``."""
    ids = backend.prompt_ids(req)
    with torch.inference_mode():
        out = backend.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=req.max_tokens,
            do_sample=False,
            eos_token_id=sorted(backend.eos_token_ids),
            pad_token_id=backend.tokenizer.pad_token_id,
        )
    new = [t for t in out[0, len(ids) :].tolist()]
    for i, token in enumerate(new):
        if token in backend.eos_token_ids:
            new = new[:i]
            break
    return backend.tokenizer.decode(new, skip_special_tokens=False)


@pytest.fixture
def pair_backends(tiny_pair: TinyPair) -> tuple[TransformersBackend, TransformersBackend]:
    small = TransformersBackend(tiny_pair.small, tiny_pair.tokenizer, name="tiny-small")
    large = TransformersBackend(tiny_pair.large, tiny_pair.tokenizer, name="tiny-large")
    return small, large


# ----------------------------------------------------------------------------- exactness
async def test_prefix_reuse_is_exact_across_switches_and_rollbacks(pair_backends):
    small, large = pair_backends
    conv = "exact"
    reasoning = ""
    plan = ["small", "small", "large", "small", "reject", "large", "small"]
    accepted: list[str] = []  # reasoning before each step, for rollbacks
    for who in plan:
        if who == "reject":  # the small model's last step is thrown away: roll back
            reasoning = accepted.pop()
            continue
        backend = small if who == "small" else large
        req = request(conv, reasoning)
        gen = await backend.generate(req)
        assert gen.text == reference(backend, req), who
        assert gen.prompt_tokens == len(backend.prompt_ids(req))
        accepted.append(reasoning)
        reasoning = reasoning + gen.text + "\n\n"
    assert small.is_cached(conv) and large.is_cached(conv)


async def test_only_new_tokens_are_prefilled(pair_backends):
    small, large = pair_backends
    first = await small.generate(request("reuse"))
    assert first.cached_tokens == 0
    written = (await large.generate(request("reuse", first.text + "\n\n"))).text
    req = request("reuse", first.text + "\n\n" + written + "\n\n")
    before = small.processed_tokens
    again = await small.generate(req)
    # Everything the small model had read or written before is reused ...
    assert again.cached_tokens >= first.prompt_tokens
    # ... and the model ran forward only on the rest plus the tokens it generated.
    prefilled = again.prompt_tokens - again.cached_tokens
    assert small.processed_tokens - before == prefilled + again.completion_tokens - 1


async def test_rollback_crops_to_the_common_prefix(pair_backends):
    small, _ = pair_backends
    first = await small.generate(request("rollback"))
    base = small.prompt_ids(request("rollback"))
    await small.generate(request("rollback", first.text + "\n\n"))
    again = await small.generate(request("rollback"))  # the step was rejected
    assert again.cached_tokens == len(base) - 1  # the last prompt token gives the logits
    assert again.text == first.text


# ----------------------------------------------------------------------------- stop strings
async def test_stop_string_straddling_tokens_cuts_the_text(pair_backends):
    small, _ = pair_backends
    full = await small.generate(request("stop-a", max_tokens=24, logprobs=True))
    ids = small.tokenizer(full.text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 8
    # a stop string from the middle of token 4 to the middle of token 6
    pieces = [small.tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    start = len(pieces[4]) - 1
    stop = full.text[start : len(pieces[6]) + 1]
    expected = full.text[: full.text.find(stop)]
    cut = await small.generate(request("stop-b", max_tokens=24, stop=[stop], logprobs=True))
    assert cut.text == expected
    assert cut.stop_reason == "step" and cut.stop_string == stop
    assert cut.completion_tokens == len(cut.logprobs)
    assert cut.logprobs == full.logprobs[: cut.completion_tokens]


async def test_stop_string_inside_one_token(pair_backends):
    small, _ = pair_backends
    full = await small.generate(request("stop-c", max_tokens=24, logprobs=True))
    tokenizer = small.tokenizer
    ids = tokenizer(full.text, add_special_tokens=False)["input_ids"]
    word = next(w for w in (tokenizer.decode([i]) for i in ids) if len(w.strip()) >= 4)
    stop = word[2:]  # the end of a merged token
    cut = await small.generate(request("stop-d", max_tokens=24, stop=["\n\n", stop], logprobs=True))
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.stop_string == stop
    # the token holding the start of the stop string counts: its text begins before it
    assert cut.completion_tokens == len(cut.logprobs) >= 1


def test_merged_delimiter_token_is_found_and_counted(tiny_pair: TinyPair) -> None:
    tokenizer = tiny_pair.tokenizer
    ids = tokenizer("Add them.\n\nSo 7", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert ".\n\n" in pieces  # the delimiter hides inside a merged token
    lengths = [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]
    text = tokenizer.decode(ids)
    position, stop = find_stop(text, ["\n\n"])
    assert text[:position] == "Add them." and stop == "\n\n"
    assert tokens_before(lengths, position) == pieces.index(".\n\n") + 1


def test_find_stop_picks_the_earliest():
    assert find_stop("a. b\n\nc", ["\n\n", ". "]) == (1, ". ")
    assert find_stop("abc", ["x", ""]) is None
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2


async def test_end_of_turn_stops_generation(tiny_pair: TinyPair):
    # a model whose output layer always prefers <|im_end|>
    model, tokenizer = tiny_qwen2(seed=3)
    bias = torch.zeros(model.config.vocab_size)
    bias[tokenizer.convert_tokens_to_ids("<|im_end|>")] = 1e4
    model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
    backend = TransformersBackend(model, tokenizer)
    gen = await backend.generate(request("eos", logprobs=True))
    assert gen.stop_reason == "eos" and gen.text == "" and gen.completion_tokens == 0


# ----------------------------------------------------------------------------- logprobs, sampling
async def test_logprobs_are_real_log_probabilities(pair_backends):
    small, _ = pair_backends
    req = request("lp", max_tokens=10, logprobs=True)
    gen = await small.generate(req)
    ids = small.prompt_ids(req)
    new = small.tokenizer(gen.text, add_special_tokens=False)["input_ids"]
    assert len(gen.logprobs) == gen.completion_tokens == 10
    with torch.inference_mode():
        logits = small.model(torch.tensor([ids + new])).logits[0].float()
    dist = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)
    assert torch.allclose(dist.exp().sum(-1), torch.ones(len(new)), atol=1e-4)
    if len(new) == len(gen.logprobs):  # the text round-trips to the same tokens
        chosen = dist.gather(1, torch.tensor(new)[:, None])[:, 0]
        assert torch.allclose(chosen, torch.tensor(gen.logprobs), atol=1e-4)
    assert all(lp <= 0 for lp in gen.logprobs)


async def test_top_logprobs_are_the_most_likely_tokens(pair_backends):
    small, _ = pair_backends
    req = request("top", max_tokens=6, logprobs=True, top_logprobs=5)
    gen = await small.generate(req)
    assert gen.top_logprobs is not None and len(gen.top_logprobs) == gen.completion_tokens == 6
    ids = small.prompt_ids(req)
    with torch.inference_mode():
        logits = small.model(torch.tensor([ids])).logits[0, -1].float()
    best = torch.log_softmax(logits, dim=-1).topk(5)
    want = {small.tokenizer.decode([int(i)]): float(v) for v, i in zip(*best, strict=True)}
    first = gen.top_logprobs[0]
    assert set(first) == set(want) and all(abs(first[t] - want[t]) < 1e-3 for t in want)
    for chosen, alternatives in zip(gen.logprobs, gen.top_logprobs, strict=True):
        assert max(alternatives.values()) == pytest.approx(chosen, abs=1e-4)  # greedy: on top
    assert (await small.generate(request("top2", max_tokens=2))).top_logprobs is None


def test_top_logprobs_is_bounded() -> None:
    with pytest.raises(ConfigError, match="top_logprobs"):
        GenerateRequest("c", QUESTION, top_logprobs=21)
    with pytest.raises(ConfigError, match="top_logprobs"):
        GenerateRequest("c", QUESTION, top_logprobs=-1)


async def test_score_gives_the_logprob_of_each_continuation_token(pair_backends):
    small, _ = pair_backends
    req = request("score", "First, count the apples.\n\n")
    continuation = "Tom has 7 apples."
    scores = await small.score(req, continuation)
    ids = small.prompt_ids(req)
    new = small.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = small.model(torch.tensor([ids + new])).logits[0].float()
    expected = torch.log_softmax(logits[len(ids) - 1 : -1], -1).gather(
        1, torch.tensor(new)[:, None]
    )
    assert torch.allclose(torch.tensor(scores), expected[:, 0], atol=1e-4)
    # a second score reuses the cache and gives the same numbers
    before = small.processed_tokens
    assert torch.allclose(torch.tensor(await small.score(req, continuation)), torch.tensor(scores))
    assert small.processed_tokens - before == len(new) + 1  # the last prompt token again
    # and generation after scoring is still exact
    gen = await small.generate(req)
    assert gen.text == reference(small, req)


async def test_sampling_honours_seed_and_top_p(pair_backends):
    small, _ = pair_backends
    hot = Sampling(temperature=1.5, top_p=1.0, seed=7)
    a = await small.generate(request("s1", sampling=hot, max_tokens=16))
    b = await small.generate(request("s2", sampling=hot, max_tokens=16))
    c = await small.generate(request("s3", sampling=Sampling(1.5, 1.0, seed=8), max_tokens=16))
    assert a.text == b.text != c.text
    greedy = await small.generate(request("s4", max_tokens=16, logprobs=True))
    narrow = Sampling(temperature=0.9, top_p=1e-6, seed=1)  # only the top token survives
    n = await small.generate(request("s5", sampling=narrow, max_tokens=16, logprobs=True))
    assert n.text == greedy.text
    assert n.logprobs == greedy.logprobs  # raw logits, before temperature


# ----------------------------------------------------------------------------- caches
async def test_lru_keeps_at_most_n_conversations(tiny_pair: TinyPair):
    backend = TransformersBackend(tiny_pair.small, tiny_pair.tokenizer, max_cached_conversations=2)
    for conv in ("a", "b", "c"):
        await backend.generate(request(conv, max_tokens=2))
    assert not backend.is_cached("a") and backend.is_cached("b") and backend.is_cached("c")
    await backend.generate(request("b", max_tokens=2))  # b becomes most recent
    await backend.generate(request("d", max_tokens=2))
    assert backend.is_cached("b") and not backend.is_cached("c")


async def test_byte_cap_frees_caches(tiny_pair: TinyPair):
    probe = TransformersBackend(tiny_pair.small, tiny_pair.tokenizer)
    await probe.generate(request("one", max_tokens=2))
    one = probe.cache_bytes
    assert one > 0
    backend = TransformersBackend(
        tiny_pair.small, tiny_pair.tokenizer, max_cache_bytes=int(one * 1.5)
    )
    await backend.generate(request("x", max_tokens=2))
    await backend.generate(request("y", max_tokens=2))
    assert backend.cached_conversations == 1 and backend.is_cached("y")
    assert backend.cache_bytes <= int(one * 1.5)
    tight = TransformersBackend(tiny_pair.small, tiny_pair.tokenizer, max_cache_bytes=1)
    await tight.generate(request("z", max_tokens=2))
    assert tight.cached_conversations == 0


async def test_release_and_aclose_free_caches(tiny_pair: TinyPair):
    backend = TransformersBackend(tiny_pair.small, tiny_pair.tokenizer)
    await backend.generate(request("r1", max_tokens=2))
    await backend.generate(request("r2", max_tokens=2))
    await backend.release("r1")
    assert not backend.is_cached("r1") and backend.is_cached("r2")
    await backend.aclose()
    assert backend.cached_conversations == 0
    with pytest.raises(BackendError, match="closed"):
        await backend.generate(request("r3"))


# ----------------------------------------------------------------------------- concurrency
async def test_cancelled_caller_stops_the_worker(tiny_pair: TinyPair):
    backend = TransformersBackend(tiny_pair.small, tiny_pair.tokenizer)
    with anyio.move_on_after(0.5) as scope:
        await backend.generate(request("cancel", max_tokens=3000))
    assert scope.cancelled_caught
    # the worker has already stopped: the lock is free and no token is processed any more
    assert backend._lock.acquire(blocking=False)
    backend._lock.release()
    count = backend.processed_tokens
    assert 0 < count < 3000
    await anyio.sleep(0.2)
    assert backend.processed_tokens == count
    # the conversation's cache stays consistent
    req = request("cancel", max_tokens=6)
    gen = await backend.generate(req)
    assert gen.cached_tokens > 0 and gen.text == reference(backend, req)


async def test_concurrent_calls_are_serialised(pair_backends):
    small, _ = pair_backends
    reqs = [request(f"par-{i}", max_tokens=8) for i in range(3)]
    results: dict[int, str] = {}

    async def run(i: int) -> None:
        results[i] = (await small.generate(reqs[i])).text

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(run, i)
    for i, req in enumerate(reqs):
        assert results[i] == reference(small, req)


# ----------------------------------------------------------------------------- prompt and errors
def test_tools_are_rendered_into_the_prompt(tiny_pair: TinyPair):
    tool = {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate arithmetic.",
            "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}},
        },
    }
    req = GenerateRequest("t", QUESTION, reasoning="Step 1.", tools=[tool])
    text = render_prompt(tiny_pair.tokenizer, req)
    assert "calculator" in text and text.endswith("<|im_start|>assistant\nStep 1.")


def test_errors_are_typed(tiny_pair: TinyPair):
    with pytest.raises(ConfigError) as err:
        TransformersBackend(tiny_pair.small, tiny_pair.tokenizer, max_cache_bytes=0)
    assert err.value.argument == "max_cache_bytes"
    with pytest.raises(ConfigError) as err:
        TransformersBackend(tiny_pair.small, tiny_pair.tokenizer, max_cached_conversations=-1)
    assert err.value.argument == "max_cached_conversations"
    plain = copy.copy(tiny_pair.tokenizer)
    plain.chat_template = None
    with pytest.raises(ConfigError) as err:
        TransformersBackend(tiny_pair.small, plain)
    assert err.value.argument == "tokenizer"
    with pytest.raises(ConfigError) as err:
        TransformersBackend.from_pretrained("/nonexistent/model/folder", device="cpu")
    assert err.value.argument == "name_or_path"
    with pytest.raises(ConfigError) as err:
        TransformersBackend.from_pretrained("bundled:no-such-model", device="cpu")
    assert err.value.argument == "name"
    with pytest.raises(ConfigError) as err:
        TransformersBackend.from_pretrained("/x", dtype="float99", device="cpu")
    assert err.value.argument == "dtype"


async def test_too_long_prompt_is_a_backend_error(tiny_pair: TinyPair):
    model, tokenizer = tiny_qwen2(seed=0, max_position_embeddings=32)
    backend = TransformersBackend(model, tokenizer)
    with pytest.raises(BackendError, match="context"):
        await backend.generate(request("long"))
