"""A small standalone generate / teacher-forcing loop for any KV method (torch + transformers only).

``model.generate(ids, past_key_values=method.new_cache())`` works too once ``method.attach(model)``
has run; these helpers add what a benchmark needs: per-step logits, timing, KV bytes.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from collab_agent.cache.budget import CacheConfigError
from collab_agent.cache.compressed import CompressedCache
from collab_agent.cache.method import KVMethod


def check_same_tokenizer(large: Any, small: Any) -> None:
    """Raise `CacheConfigError` naming ``assistant`` unless the two tokenizers agree token for token."""
    if large is None or small is None:
        return
    same = len(large) == len(small) and large.get_vocab() == small.get_vocab()
    if not same:
        raise CacheConfigError(
            "assistant",
            f"tokenizer differs from the large model's ({len(small)} vs {len(large)} tokens, "
            "or other ids); SmallKV needs one tokenizer for both models",
        )


@dataclass
class Decoded:
    """What `decode` returns.

    Fields
    ------
    tokens : torch.Tensor
        ``(B, T)`` the tokens fed after the prompt (generated greedily or teacher-forced).
    logits : torch.Tensor
        ``(B, T, V)`` float32 next-token logits *before* each of those tokens was chosen, so
        ``logits[:, t].argmax(-1)`` is the greedy choice for ``tokens[:, t]``.
    prefill_seconds : float
        Wall time of the prompt forward pass.
    decode_seconds : float
        Wall time of the T - 1 one-token decode steps.
    kv_bytes_ratio : float
        Mean over decode steps of device KV bytes relative to the full cache.
    cache : CompressedCache
        The cache after the last step.
    """

    tokens: torch.Tensor
    logits: torch.Tensor
    prefill_seconds: float
    decode_seconds: float
    kv_bytes_ratio: float
    cache: CompressedCache = field(repr=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(
    model: nn.Module,
    input_ids: torch.Tensor,
    method: KVMethod,
    cache: CompressedCache | None = None,
) -> tuple[CompressedCache, torch.Tensor, float]:
    """Run the prompt through ``model`` with a fresh cache of ``method``.

    Returns ``(cache, last_logits (B, V) float32, seconds)``. Compression happens lazily at the
    next call, so the returned cache can be cloned per budget (`CompressedCache.clone`).
    """
    method.attach(model)
    cache = cache if cache is not None else method.new_cache()
    device = input_ids.device
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    _sync(device)
    return cache, out.logits[:, -1].float(), time.perf_counter() - start


@torch.no_grad()
def decode(
    model: nn.Module,
    cache: CompressedCache,
    first_logits: torch.Tensor,
    steps: int,
    forced: torch.Tensor | None = None,
    prefill_seconds: float = 0.0,
    track_bytes: bool = True,
    keep_logits: bool = True,
    stop_ids: Collection[int] = (),
) -> Decoded:
    """Decode ``steps`` tokens one at a time from a prefilled ``cache``.

    Greedy unless ``forced`` ``(B, steps)`` gives the tokens to feed (teacher forcing); either
    way the logits before every token are returned. ``track_bytes=False`` skips the per-step
    KV byte count (it synchronises the device; throughput runs turn it off), and
    ``keep_logits=False`` keeps only the last step's logits (memory). Decoding ends early once
    every row has produced one of ``stop_ids`` (end-of-turn tokens, say).
    """
    if forced is not None and forced.shape[1] < steps:
        raise CacheConfigError("forced", f"has {forced.shape[1]} tokens, fewer than steps={steps}")
    device = first_logits.device
    logits = [first_logits]
    tokens: list[torch.Tensor] = []
    ratios: list[float] = []
    _sync(device)
    start = time.perf_counter()
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(first_logits.shape[0], dtype=torch.bool, device=device)
    for t in range(steps):
        tok = forced[:, t] if forced is not None else logits[-1].argmax(-1)
        tokens.append(tok.to(device))
        if len(stops):
            done |= torch.isin(tokens[-1], stops)
        if t == steps - 1 or bool(done.all()):
            break
        out = model(input_ids=tokens[-1][:, None], cache=cache, use_cache=True)
        if not keep_logits:
            logits.clear()
        logits.append(out.logits[:, -1].float())
        if track_bytes:
            ratios.append(cache.kv_bytes_ratio())
    _sync(device)
    seconds = time.perf_counter() - start
    return Decoded(
        tokens=torch.stack(tokens, 1),
        logits=torch.stack(logits[-len(tokens) :], 1),
        prefill_seconds=prefill_seconds,
        decode_seconds=seconds,
        kv_bytes_ratio=sum(ratios) / len(ratios) if ratios else cache.kv_bytes_ratio(),
        cache=cache,
    )


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    method: KVMethod,
    max_new_tokens: int = 64,
    tokenizer: Any = None,
    assistant_tokenizer: Any = None,
) -> Decoded:
    """Greedy generation with ``method``'s cache (e.g. ``SmallKV(assistant=srm)``).

    Pass both tokenizers to have them checked: SmallKV needs the same tokenizer for both models.
    """
    check_same_tokenizer(tokenizer, assistant_tokenizer)
    cache, last, seconds = prefill(model, input_ids, method)
    return decode(model, cache, last, max_new_tokens, prefill_seconds=seconds)


def teacher_force(
    model: nn.Module, input_ids: torch.Tensor, continuation: torch.Tensor, method: KVMethod
) -> Decoded:
    """Feed ``continuation`` ``(B, T)`` one token at a time after the prompt; logits per step."""
    cache, last, seconds = prefill(model, input_ids, method)
    return decode(
        model, cache, last, continuation.shape[1], forced=continuation, prefill_seconds=seconds
    )
