"""KV methods serve the collaboration: the large model's compressed cache survives every
rollback the `Reasoner` causes (TrigReason, SpecReason, LargeSurprise, a moved token prefix)."""

from __future__ import annotations

import pytest

from collab_agent.backends.base import GREEDY, GenerateRequest
from collab_agent.backends.local import TransformersBackend
from collab_agent.backends.tiny import tiny_qwen2
from collab_agent.cache import H2O, CompressedCache, SmallKV, SnapKV, StreamingLLM
from collab_agent.policies import LargeSurprise, Policy, SpecReason, TrigReason
from collab_agent.reasoner import Reasoner

QUESTION = [
    {
        "role": "user",
        "content": "A farmer has 17 sheep, buys 5 more, then sells 8. "
        "How many sheep does the farmer have now? Think in short steps. " * 3,
    }
]


@pytest.fixture
def models():  # type: ignore[no-untyped-def]
    """Fresh tiny models: a KV method hooks the model it is attached to."""
    small, tokenizer = tiny_qwen2(0, size="small")
    large, _ = tiny_qwen2(1, size="large")
    return small, large, tokenizer


def pair(models, method_for):  # type: ignore[no-untyped-def]
    small_model, large_model, tokenizer = models
    small = TransformersBackend(small_model, tokenizer, name="tiny-small")
    large = TransformersBackend(
        large_model, tokenizer, name="tiny-large", kv_method=method_for(small)
    )
    return small, large


def smallkv(small: TransformersBackend, budget: float = 0.3) -> SmallKV:
    return SmallKV(assistant=small, budget=budget, min_calibration_tokens=16)


def large_caches(large: TransformersBackend) -> list[CompressedCache]:
    return [entry.kv for entry in large._store._entries.values()]


def assert_both_sides_agree(cache: CompressedCache) -> None:
    """The SRM has read exactly the tokens the LRM's cache holds (its own pass), or the LRM
    reads the assistant's shared statistics up to its own length."""
    state = cache.state
    if state is None:
        return
    if state.srm_length is not None:
        assert state.srm_length == cache.get_seq_length()
    elif state.srm is not None and state.srm.layers:
        assert all(layer.seen == cache.get_seq_length() for layer in state.srm.layers)


def reasoner(small, large, policy) -> Reasoner:  # type: ignore[no-untyped-def]
    return Reasoner(
        small,
        large,
        policy,
        sampling=GREEDY,
        max_steps=5,
        step_max_tokens=8,
        answer_max_tokens=4,
        release_on_finish=False,
    )


async def test_smallkv_under_trigreason_survives_the_trace(models) -> None:  # type: ignore[no-untyped-def]
    small, large = pair(models, smallkv)
    trace = await reasoner(small, large, TrigReason(priming_steps=1)).run(QUESTION)
    assert trace.steps and trace.usage["large"].calls >= 1
    for cache in large_caches(large):
        assert_both_sides_agree(cache)
        assert cache.budget_of == "context"


async def test_smallkv_under_specreason_survives_every_judge_call(models) -> None:  # type: ignore[no-untyped-def]
    """Every judge call renders another prompt, so the large model's cache rolls back each time."""
    small, large = pair(models, smallkv)
    trace = await reasoner(small, large, SpecReason()).run(QUESTION)
    assert trace.usage["large"].calls >= 2
    caches = large_caches(large)
    assert sum(cache.rollbacks for cache in caches) >= 1
    for cache in caches:
        assert_both_sides_agree(cache)


async def test_smallkv_under_large_surprise_survives_score_then_rejection(models) -> None:  # type: ignore[no-untyped-def]
    """Threshold below any NLL: every scored step is rejected and rewritten from before it."""
    small, large = pair(models, smallkv)
    policy = Policy((LargeSurprise(threshold=-1.0, min_tokens=1),), name="surprise")
    trace = await reasoner(small, large, policy).run(QUESTION)
    assert any(step.rejected_text is not None for step in trace.steps)
    for cache in large_caches(large):
        assert cache.rollbacks >= 1
        assert_both_sides_agree(cache)


@pytest.mark.parametrize("policy", ["trigreason", "specreason", "surprise"])
async def test_smallkv_choosing_in_blocks_survives_every_policy(models, policy) -> None:  # type: ignore[no-untyped-def]
    """SmallKV choosing every 4 tokens (the SRM reading the large model's tokens in blocks)
    under each policy's rollbacks: after every call both sides hold the same tokens."""
    small, large = pair(
        models,
        lambda s: SmallKV(assistant=s, budget=0.3, min_calibration_tokens=16, refresh_every=4),
    )
    chosen = {
        "trigreason": TrigReason(priming_steps=1),
        "specreason": SpecReason(),
        "surprise": Policy((LargeSurprise(threshold=-1.0, min_tokens=1),), name="surprise"),
    }[policy]
    trace = await reasoner(small, large, chosen).run(QUESTION)
    assert trace.steps and trace.usage["large"].calls >= 1
    caches = large_caches(large)
    assert any(layer.compressed for cache in caches for layer in cache.layers)
    for cache in caches:
        assert_both_sides_agree(cache)


def request(reasoning: str, conversation: str = "c") -> GenerateRequest:
    return GenerateRequest(
        conversation, QUESTION, reasoning=reasoning, max_tokens=6, sampling=GREEDY, stop=()
    )


METHODS = {
    "smallkv": smallkv,
    "h2o": lambda small: H2O(budget=0.3),
    "snapkv": lambda small: SnapKV(budget=0.3, window=8),
    "streaming": lambda small: StreamingLLM(budget=0.3),
}


@pytest.mark.parametrize("name", sorted(METHODS))
async def test_a_moved_token_prefix_crops_both_sides(models, name) -> None:  # type: ignore[no-untyped-def]
    """Re-tokenising the trace moves the common prefix back: the compressed cache is cropped
    (not reset) and the next generation runs on it."""
    _small, large = pair(models, METHODS[name])
    await large.generate(request("First we count the sheep.\n\nThen"))
    await large.generate(request("First we count the sheep.\n\nThen we add five"))
    (cache,) = large_caches(large)
    before, rollbacks = cache.get_seq_length(), cache.rollbacks
    assert any(layer.compressed for layer in cache.layers)
    # "sheep." becomes "sheep!" : the tokens after the common prefix are dropped
    out = await large.generate(request("First we count the sheep!\n\nThen we sell eight"))
    (cache,) = large_caches(large)
    assert cache.rollbacks == rollbacks + 1 and 0 < out.cached_tokens < before
    assert cache.get_seq_length() == out.prompt_tokens + out.completion_tokens - 1
    assert_both_sides_agree(cache)
    assert 0 < cache.kv_bytes_ratio() < 0.6


async def test_a_rollback_at_full_budget_generates_what_a_fresh_cache_generates(models) -> None:  # type: ignore[no-untyped-def]
    """Crop is exact: after a rollback, SmallKV at budget 1 equals a fresh full cache."""
    _small, large = pair(models, lambda s: smallkv(s, budget=1.0))
    await large.generate(request("First we count the sheep.\n\nThen we add five"))
    got = await large.generate(request("First we count the goats.\n\nThen"))
    plain = TransformersBackend(models[1], models[2])
    expected = await plain.generate(request("First we count the goats.\n\nThen", "fresh"))
    assert got.cached_tokens > 0
    assert got.text == expected.text
    assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-4)


async def test_a_whole_context_budget_bounds_decoded_tokens_too(models) -> None:  # type: ignore[no-untyped-def]
    """In a collaboration the budget is a share of the whole context: decoded tokens count."""
    _small, large = pair(models, lambda s: H2O(budget=0.25))
    long = GenerateRequest("c", QUESTION, max_tokens=40, sampling=GREEDY, stop=())
    out = await large.generate(long)
    (cache,) = large_caches(large)
    assert out.completion_tokens == 40
    kept = int((cache.layers[0].positions[0, 0] >= 0).sum())
    assert kept <= -(-0.25 * cache.get_seq_length() // 1) + 1


class SrmTokens:
    """Tokens the SRM's transformer body runs forward on (its own steps and any other pass)."""

    def __init__(self, model) -> None:  # type: ignore[no-untyped-def]
        self.count = 0
        model.base_model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:  # type: ignore[no-untyped-def]
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.count += int(ids.shape[-1])


@pytest.mark.parametrize("every", [1, 4])
@pytest.mark.parametrize("share", [True, False])
async def test_smallkv_reads_the_srm_backends_own_pass_instead_of_a_second_one(
    share, every
) -> None:  # type: ignore[no-untyped-def]
    """TrigReason with SmallKV: the SRM runs on about as many tokens as in the plain
    collaboration when SmallKV shares its pass, about twice as many with its own; choosing
    every 4 tokens, the SRM reads the large model's tokens in blocks, each once."""
    counts = []
    for cache in (None, "smallkv"):
        small_model, tokenizer = tiny_qwen2(0, size="small")
        large_model, _ = tiny_qwen2(1, size="large")
        meter = SrmTokens(small_model)
        small = TransformersBackend(small_model, tokenizer, name="tiny-small")
        method = None
        if cache:
            method = SmallKV(
                assistant=small,
                budget=1.0,
                min_calibration_tokens=16,
                share_assistant_pass=share,
                refresh_every=every,
            )
        large = TransformersBackend(large_model, tokenizer, name="tiny-large", kv_method=method)
        await reasoner(small, large, TrigReason(priming_steps=1)).run(QUESTION)
        counts.append(meter.count)
    plain, with_smallkv = counts
    if share:
        assert with_smallkv <= 1.05 * plain
    else:
        assert with_smallkv > 1.5 * plain


@pytest.mark.parametrize("name", sorted(METHODS))
async def test_a_long_read_with_a_short_answer_leaves_the_cache_within_budget(models, name) -> None:  # type: ignore[no-untyped-def]
    """A judge or answer call reads a whole step and generates one token: the call keeps its
    own tokens while it runs, but between calls the cache is back within its budget."""
    _small, large = pair(models, METHODS[name])
    await large.generate(request("First we count the sheep.\n\nThen we add five"))
    step = " We add five sheep to the seventeen we had, which makes twenty-two sheep in all." * 8
    short = GenerateRequest(
        "c",
        QUESTION,
        reasoning="First we count the sheep.\n\nThen we add five" + step,
        max_tokens=1,
        sampling=GREEDY,
        stop=(),
    )
    await large.generate(short)
    (cache,) = large_caches(large)
    assert any(layer.compressed for layer in cache.layers)
    for layer in cache.layers:
        kept = int((layer.positions[0, 0] >= 0).sum())
        assert kept <= -(-0.3 * layer.length // 1) + 1, (kept, layer.length)
    assert_both_sides_agree(cache)
