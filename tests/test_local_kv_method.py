"""A TransformersBackend for the large model takes a KV method of collab_agent.cache
(``kv_method=``)."""

from __future__ import annotations

import pytest

from collab_agent.backends.base import GREEDY, GenerateRequest
from collab_agent.backends.local import TransformersBackend
from collab_agent.backends.tiny import tiny_qwen2
from collab_agent.cache import H2O, SmallKV

MESSAGES = [{"role": "user", "content": "Count from one to ten in words, one per line. " * 12}]


def request(conversation_id: str) -> GenerateRequest:
    return GenerateRequest(conversation_id, MESSAGES, max_tokens=12, sampling=GREEDY, stop=())


@pytest.fixture
def models():  # type: ignore[no-untyped-def]
    """Fresh tiny models: a KV method hooks the model it is attached to."""
    small, tokenizer = tiny_qwen2(0, size="small")
    large, _ = tiny_qwen2(1, size="large")
    return small, large, tokenizer


async def test_smallkv_at_full_budget_generates_what_the_full_cache_generates(models) -> None:  # type: ignore[no-untyped-def]
    small_model, large_model, tokenizer = models
    expected = await TransformersBackend(large_model, tokenizer).generate(request("plain"))
    small = TransformersBackend(small_model, tokenizer)
    compressed = TransformersBackend(
        large_model, tokenizer, kv_method=SmallKV(assistant=small, budget=1.0)
    )
    got = await compressed.generate(request("smallkv"))
    assert got.text == expected.text
    assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-4)


async def test_a_compressed_cache_keeps_fewer_bytes_on_the_device(models) -> None:  # type: ignore[no-untyped-def]
    _, large_model, tokenizer = models
    plain = TransformersBackend(large_model, tokenizer)
    await plain.generate(request("c"))
    compressed = TransformersBackend(large_model, tokenizer, kv_method=H2O(budget=0.2))
    generation = await compressed.generate(request("c"))
    assert generation.completion_tokens > 0
    assert 0 < compressed._store.nbytes < 0.5 * plain._store.nbytes


def test_the_old_cache_keyword_still_works_with_a_deprecation_warning(models) -> None:  # type: ignore[no-untyped-def]
    from collab_agent.errors import ConfigError

    _, large_model, tokenizer = models
    with pytest.warns(DeprecationWarning, match="kv_method"):
        backend = TransformersBackend(large_model, tokenizer, cache=H2O(budget=0.2))
    assert isinstance(backend.kv_method, H2O)
    with pytest.raises(ConfigError, match="only kv_method"):
        TransformersBackend(large_model, tokenizer, cache=H2O(), kv_method=H2O())
