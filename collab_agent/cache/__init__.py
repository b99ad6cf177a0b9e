"""KV-cache management for local large models: SmallKV and the baselines it is compared with.

Depends only on torch and transformers. Usage::

    method = SmallKV(assistant=small_model, budget=0.1).attach(large_model)
    out = large_model.generate(ids, past_key_values=method.new_cache(), max_new_tokens=256)
"""

from collab_agent.cache.base import (
    ATTENTION_NAME,
    CacheConfigError,
    CompressedCache,
    KVMethod,
    ObservedCache,
    use_kv_attention,
)
from collab_agent.cache.baselines import H2O, ExpectedAttention, Full, SnapKV, StreamingLLM
from collab_agent.cache.generate import (
    Decoded,
    check_same_tokenizer,
    decode,
    generate,
    prefill,
    teacher_force,
)
from collab_agent.cache.smallkv import SmallKV

METHODS: dict[str, type[KVMethod]] = {
    "full": Full,
    "h2o": H2O,
    "snapkv": SnapKV,
    "streaming": StreamingLLM,
    "expected": ExpectedAttention,
    "smallkv": SmallKV,
}
"""The methods by the names `bench kv` reports them under."""

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
