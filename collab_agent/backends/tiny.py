"""Tiny random-weight Qwen2 models with the real Qwen2.5 tokenizer, for tests and smoke runs.

Real code paths at test speed: the models are `Qwen2ForCausalLM` built from a real config at a
tiny shape, and the tokenizer is the bundled Qwen2.5-Coder one (151,936 tokens, ChatML), read
from the cache (see `collab_agent.backends.bundled.load_tokenizer`). The same seed always gives
the same weights. Weights are drawn with a larger spread than transformers' default so that the
next-token distribution is peaked and greedy decoding has no near-ties (exactness tests compare
greedy texts computed along different paths).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from collab_agent._hf import IMPORT_LOCK
from collab_agent.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Qwen2ForCausalLM

TinySize = Literal["small", "large"]

SHAPES: dict[str, dict[str, Any]] = {
    "small": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "large": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
    },
}
"""Tiny shapes of the pair: the large one has more layers and query heads (GQA, 2 KV heads
both, head dim 16), like the real Qwen2.5 0.5B/1.5B pair."""

INITIALIZER_RANGE = 0.2
"""Std of the random weights (transformers uses 0.02, which makes logits nearly flat)."""


@functools.cache
def qwen_tokenizer() -> PreTrainedTokenizerBase:
    """The Qwen2.5 tokenizer of the bundled 0.5B model (loaded once per process)."""
    from collab_agent.backends.bundled import TOKENIZER_SOURCE, load_tokenizer

    return load_tokenizer(TOKENIZER_SOURCE)


def tiny_qwen2(
    seed: int = 0, *, size: TinySize = "small", **config_overrides: Any
) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerBase]:
    """A random-weight `Qwen2ForCausalLM` at a tiny shape, with the real Qwen tokenizer.

    Args:
        seed: seeds the weights; equal seeds (and shapes) give equal weights.
        size: ``"small"`` (hidden 64, 2 layers, 4 heads) or ``"large"`` (hidden 128, 3 layers,
            8 heads); both have 2 KV heads.
        **config_overrides: any `Qwen2Config` field (e.g. ``num_hidden_layers=4``,
            ``attn_implementation="eager"``).

    Returns:
        ``(model, tokenizer)``, the model in eval mode, float32, on CPU.
    """
    import torch

    with IMPORT_LOCK:
        from transformers import Qwen2Config, Qwen2ForCausalLM

    if size not in SHAPES:
        raise ConfigError("size", f"must be one of {sorted(SHAPES)}, got {size!r}")
    tokenizer = qwen_tokenizer()
    fields: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "initializer_range": INITIALIZER_RANGE,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        **SHAPES[size],
        **config_overrides,
    }
    config = Qwen2Config(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = fields["eos_token_id"]
    model.generation_config.pad_token_id = fields["pad_token_id"]
    return model.eval(), tokenizer


class TinyPair(NamedTuple):
    """A small and a large tiny model sharing one tokenizer (unpacks as a 3-tuple)."""

    small: Qwen2ForCausalLM
    large: Qwen2ForCausalLM
    tokenizer: PreTrainedTokenizerBase


def tiny_pair(small_seed: int = 0, large_seed: int = 1, **config_overrides: Any) -> TinyPair:
    """The tiny SRM/LRM pair: `tiny_qwen2` at the small and large shapes, different seeds."""
    small, tokenizer = tiny_qwen2(small_seed, size="small", **config_overrides)
    large, _ = tiny_qwen2(large_seed, size="large", **config_overrides)
    return TinyPair(small, large, tokenizer)
