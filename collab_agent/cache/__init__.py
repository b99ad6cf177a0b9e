"""KV-cache management for local large models: SmallKV and the baselines it is compared with.

Depends only on torch and transformers. Usage::

    method = SmallKV(assistant=small_model, budget=0.1).attach(large_model)
    out = large_model.generate(ids, past_key_values=method.new_cache(), max_new_tokens=256)
"""

from collab_agent.cache.attention import ATTENTION_NAME, use_kv_attention
from collab_agent.cache.budget import CacheConfigError
from collab_agent.cache.compressed import CompressedCache
from collab_agent.cache.expected import ExpectedAttention
from collab_agent.cache.full import Full
from collab_agent.cache.generate import (
    Decoded,
    check_same_tokenizer,
    decode,
    generate,
    prefill,
    teacher_force,
)
from collab_agent.cache.h2o import H2O
from collab_agent.cache.method import KVMethod, PromptMethod
from collab_agent.cache.observer import ObservedCache
from collab_agent.cache.smallkv import SmallKV
from collab_agent.cache.snapkv import SnapKV
from collab_agent.cache.streaming import StreamingLLM

METHODS: dict[str, type[KVMethod]] = {
    "full": Full,
    "smallkv": SmallKV,
    "h2o": H2O,
    "snapkv": SnapKV,
    "streaming": StreamingLLM,
    "expected": ExpectedAttention,
}
"""Every KV method by the name `bench kv` reports it under: the one registry of methods."""

__all__ = [
    "ATTENTION_NAME",
    "H2O",
    "METHODS",
    "CacheConfigError",
    "CompressedCache",
    "Decoded",
    "ExpectedAttention",
    "Full",
    "KVMethod",
    "ObservedCache",
    "PromptMethod",
    "SmallKV",
    "SnapKV",
    "StreamingLLM",
    "check_same_tokenizer",
    "decode",
    "generate",
    "prefill",
    "teacher_force",
    "use_kv_attention",
]
