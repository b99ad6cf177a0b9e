"""The attention function every KV method shares, registered with transformers as ``"collab_kv"``.

A cache layer that wants to see the attention call of its update (`KVLayer`, `ObservedLayer`)
names itself with `attend_next` in ``update``; the call that follows goes to its ``attend``. Any
other cache gets transformers' SDPA attention unchanged. Depends on torch and transformers only.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from collab_agent.cache.budget import CacheConfigError

if TYPE_CHECKING:
    from torch import nn

ATTENTION_NAME = "collab_kv"
"""The `attn_implementation` name under which the KV methods' attention function is registered."""


class AttendingLayer(Protocol):
    """A cache layer that computes the attention of its own update (see `attend_next`):
    ``attend(module, query, key, value, mask, scaling, kwargs)``, as `kv_attention` calls it."""

    layer_idx: int

    @property
    def attend(self) -> Callable[..., tuple[torch.Tensor, None]]: ...


_PENDING: contextvars.ContextVar[AttendingLayer | None] = contextvars.ContextVar(
    "collab_kv_pending", default=None
)
"""The cache layer that was updated last in this thread; the attention call that follows uses it."""


def attend_next(layer: AttendingLayer) -> None:
    """Route the next ``"collab_kv"`` attention call in this thread to ``layer.attend``."""
    _PENDING.set(layer)


PROBS_CHUNK = 256
"""Query rows per chunk when attention probabilities are materialised (bounds memory)."""


def attention_probs(
    query: torch.Tensor,
    keys: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor | None,
    scaling: float,
    causal: bool = True,
) -> torch.Tensor:
    """Softmax attention probabilities in float32, causal by original position.

    query ``(B, H, q, D)``, keys ``(B, Hkv, S, D)``, q_pos ``(q,)``, k_pos ``(B, Hkv, S)`` with -1
    for an empty slot. Returns ``(B, Hkv, G, q, S)`` with ``G = H // Hkv`` (GQA groups).
    ``causal=False`` says every key precedes every query (a one-token decode step), so only
    empty slots are masked; ``k_pos=None`` with it says there is no empty slot either.
    """
    b, h, q, d = query.shape
    hkv = keys.shape[1]
    g = h // hkv
    # (B, Hkv, G*q, D) @ (B, Hkv, D, S): one matmul per KV head; broadcasting the keys over the
    # groups instead made torch copy them per group (60x slower on CPU at q=1, same result)
    qg = query.reshape(b, hkv, g * q, d)
    logits = torch.matmul(qg, keys.transpose(-1, -2)).reshape(b, hkv, g, q, -1).float() * scaling
    if causal:
        if k_pos is None:
            raise ValueError("causal attention needs the keys' positions")
        allowed = (k_pos[:, :, None, None, :] >= 0) & (k_pos[:, :, None, None, :] <= q_pos[:, None])
        logits = logits.masked_fill(~allowed, float("-inf"))
    elif k_pos is not None:
        logits = logits.masked_fill((k_pos < 0)[:, :, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def probs_in_chunks(
    query: torch.Tensor,
    keys: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scaling: float,
    rows: slice,
    sink: Callable[[torch.Tensor, torch.Tensor], None],
) -> None:
    """Materialise probabilities for the query rows in ``rows`` chunk by chunk; ``sink(probs, q_pos)``."""
    start, stop = rows.start or 0, rows.stop if rows.stop is not None else query.shape[2]
    for s in range(start, stop, PROBS_CHUNK):
        e = min(stop, s + PROBS_CHUNK)
        sink(attention_probs(query[:, :, s:e], keys, q_pos[s:e], k_pos, scaling), q_pos[s:e])


def kv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``"collab_kv"``.

    With an ordinary cache it is exactly transformers' SDPA attention. With a `KVLayer` or an
    `ObservedLayer` (set by the layer's ``update`` just before) it records what the method needs
    and, once the cache is compressed, attends over the kept tokens by original position.
    """
    layer = _PENDING.get()
    _PENDING.set(None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if layer is None or layer.layer_idx != getattr(module, "layer_idx", layer.layer_idx):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return layer.attend(module, query, key, value, attention_mask, scaling, kwargs)


_REGISTERED = False


def register_attention() -> None:
    """Register ``"collab_kv"`` with transformers' attention and mask interfaces (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(ATTENTION_NAME, kv_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
        _REGISTERED = True


def use_kv_attention(model: nn.Module) -> None:
    """Switch ``model`` to the ``"collab_kv"`` attention (plain SDPA for ordinary caches)."""
    register_attention()
    config = getattr(model, "config", None)
    if config is None:
        raise CacheConfigError("model", "must be a transformers PreTrainedModel with a config")
    if config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)  # type: ignore[operator]
