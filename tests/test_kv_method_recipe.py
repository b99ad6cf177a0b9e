"""CONTRIBUTING's "add a KV method" recipe, tried: a prompt-side method is one dataclass with one
scoring function, and one line in `METHODS` makes the benches take it by name.

The method here keeps the prompt tokens whose keys have the smallest norm (as kvpress's
KnormPress); nothing else of the cache package is written for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import test_cache_baselines as baselines
import torch

from collab_agent import cache as kv
from collab_agent.bench.kv import make_method
from collab_agent.cache import CompressedCache, Full, generate
from collab_agent.cache.base import KVLayer
from collab_agent.cache.generate import decode, prefill
from collab_agent.cache.method import PromptMethod

large = baselines.large  # the baselines' tiny model and prompt, as fixtures
prompt = baselines.prompt


@dataclass
class KeyNorm(PromptMethod):
    """Keeps the prompt tokens with the smallest key norm (Devoto et al. 2024)."""

    def prompt_scores(self, cache: CompressedCache, layer: KVLayer) -> torch.Tensor:
        return -layer.keys.float().norm(dim=-1)


def test_at_budget_one_the_new_method_is_the_full_cache(large, prompt) -> None:
    reference = generate(large, prompt, Full(), max_new_tokens=4)
    out = generate(large, prompt, KeyNorm(budget=1.0), max_new_tokens=4)
    assert torch.equal(out.logits, reference.logits)


def test_it_keeps_the_prompt_tokens_its_one_function_ranks_first(large, prompt) -> None:
    with torch.no_grad():
        keys = [
            layer.keys[0].float().norm(dim=-1)  # (Hkv, L): the reference, from a plain run
            for layer in large(prompt, use_cache=True).past_key_values.layers
        ]
    cache, last, _ = prefill(large, prompt, KeyNorm(budget=0.25))
    decode(large, cache, last, 2)
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
