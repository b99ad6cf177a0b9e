"""CONTRIBUTING's "add a KV method" recipe, tried: a prompt-side method is one dataclass with one
scoring function, and one line in `METHODS` makes the benches take it by name.

The method here keeps the prompt tokens whose keys have the smallest norm (as kvpress's
KnormPress); nothing else of the cache package is written for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from collab_agent import cache as kv
from collab_agent.bench.kv import make_method
from collab_agent.cache import CompressedCache, Full, generate
from collab_agent.cache.base import KVLayer
from collab_agent.cache.generate import decode, prefill
from collab_agent.cache.method import PromptMethod

VOCAB = 512


@dataclass
class KeyNorm(PromptMethod):
    """Keeps the prompt tokens with the smallest key norm (Devoto et al. 2024)."""

    def prompt_scores(self, cache: CompressedCache, layer: KVLayer) -> torch.Tensor:
        return -layer.keys.float().norm(dim=-1)


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 96), generator=torch.Generator().manual_seed(4))


def test_at_budget_one_the_new_method_is_the_full_cache(model, prompt) -> None:
    reference = generate(model, prompt, Full(), max_new_tokens=4)
    out = generate(model, prompt, KeyNorm(budget=1.0), max_new_tokens=4)
    assert torch.equal(out.logits, reference.logits)


def test_it_keeps_the_prompt_tokens_its_one_function_ranks_first(model, prompt) -> None:
    with torch.no_grad():
        keys = [
            layer.keys[0].float().norm(dim=-1)  # (Hkv, L): the reference, from a plain run
            for layer in model(prompt, use_cache=True).past_key_values.layers
        ]
    cache, last, _ = prefill(model, prompt, KeyNorm(budget=0.25))
    decode(model, cache, last, 2)
    length = prompt.shape[1]
    for layer, norms in zip(cache.layers, keys, strict=True):
        for head in range(norms.shape[0]):
            positions = layer.positions[0, head]
            kept = {p for p in positions[positions >= 0].tolist() if p < length}
            assert 0 < len(kept) < length // 2
            smallest = set(norms[head].argsort()[: len(kept)].tolist())
            assert kept == smallest


def test_one_line_in_methods_lets_the_benches_take_it_by_name(monkeypatch) -> None:
    monkeypatch.setitem(kv.METHODS, "keynorm", KeyNorm)
    assert isinstance(make_method("keynorm", small=None), KeyNorm)
