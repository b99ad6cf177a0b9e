"""Slot management of a compressed layer: which tokens to keep, and moving them into slots.

A compressed layer holds its kept tokens in *slots* ``(B, Hkv, S, D)`` with their original
positions ``(B, Hkv, S)`` (-1 = empty). These functions pick the kept tokens from a method's
scores and update the slots with as few moves as possible.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SLOT_BLOCK = 64
"""The slot store grows by a multiple of this many slots when the incoming tokens do not fit."""

Source = Callable[
    [torch.Tensor, torch.Tensor | None, torch.Tensor, int],
    tuple[torch.Tensor | None, torch.Tensor],
]
"""``source(tokens, k_new, v_new, old)``: K (when ``k_new`` is given) and V of ``tokens``
``(B, Hkv, M)``, the new ones from this call (positions from ``old`` on), older ones from
wherever the layer keeps them (`KVLayer.source`)."""


def occupied(positions: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, H, length)`` mask of the tokens that the slots ``positions`` (-1 = empty) hold."""
    b, h, _ = positions.shape
    out = torch.zeros(b, h, length + 1, dtype=torch.bool, device=positions.device)
    out.scatter_(2, positions + 1, True)
    return out[..., 1:]


def kept_mask(
    scores: torch.Tensor,
    n_recent: torch.Tensor,
    n_keep: torch.Tensor,
    alive: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, H, L)`` mask of the tokens kept: the last ``n_recent[b]`` always, then the best
    scores up to ``n_keep[b]`` in all, never a token outside ``alive`` (None: every token)."""
    n = scores.shape[-1]
    idx = torch.arange(n, device=scores.device)
    recent = idx >= (n - n_recent)[:, None, None]
    scores = scores.masked_fill(recent, float("inf"))
    if alive is not None:
        scores = scores.masked_fill(~alive, float("-inf"))
    return top_mask(scores, n_keep)


def top_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``counts[b]`` highest-scoring tokens per (row, head); never -inf ones."""
    n = scores.shape[-1]
    k = int(min(n, int(counts.max()))) if counts.numel() else 0
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    top = torch.topk(scores, k, dim=-1)
    rank_ok = torch.arange(k, device=scores.device) < counts[:, None, None]
    ok = rank_ok & (top.values > float("-inf"))
    mask.scatter_(2, top.indices, ok)
    return mask


def refresh_slots(
    source: Source,
    want: torch.Tensor,
    positions: torch.Tensor,
    stores: list[torch.Tensor],
    k_new: torch.Tensor | None,
    v_new: torch.Tensor,
    old: int,
) -> tuple[torch.Tensor, ...]:
    """Make the slots hold exactly the tokens in ``want`` (B, Hkv, L), moving as little as possible.

    Slots of tokens no longer wanted are freed; incoming tokens fill free slots (the slot store
    grows in blocks of `SLOT_BLOCK` when needed). ``stores`` is ``[keys, values]`` or ``[values]``.
    """
    b, h, _ = want.shape
    valid = positions >= 0
    still = want.gather(2, positions.clamp(min=0)) & valid
    positions = torch.where(still, positions, torch.full_like(positions, -1))
    have = occupied(positions, want.shape[-1])
    incoming = want & ~have
    n_in = incoming.sum(-1)
    least, m = (int(x) for x in torch.aminmax(n_in)) if n_in.numel() else (0, 0)
    if m == 0:
        return (positions, *stores)
    free = positions < 0
    short = int((n_in - free.sum(-1)).max())
    if short > 0:
        grow = SLOT_BLOCK * math.ceil(short / SLOT_BLOCK)
        positions = torch.nn.functional.pad(positions, (0, grow), value=-1)
        stores = [torch.nn.functional.pad(s, (0, 0, 0, grow)) for s in stores]
        free = positions < 0
    in_tok = torch.topk(incoming.float(), m, dim=-1, sorted=True).indices
    in_ok = incoming.gather(2, in_tok)
    slot = torch.topk(free.float(), m, dim=-1, sorted=True).indices
    k_in, v_in = source(in_tok, k_new if len(stores) == 2 else None, v_new, old)
    out = []
    sources = [k_in, v_in] if len(stores) == 2 else [v_in]
    # every (row, head) takes m tokens (a decode step's usual case): no slot is written
    # with its own content
    whole = least == m
    # in place: the slot stores belong to this layer alone (`clone` deep-copies them), and an
    # out-of-place scatter copied every slot on every decode step
    for store, src in zip(stores, sources, strict=True):
        assert src is not None
        d = store.shape[-1]
        idx = slot[..., None].expand(b, h, m, d)
        src = src.to(store.dtype)
        if not whole:
            src = torch.where(in_ok[..., None], src, store.gather(2, idx))
        store.scatter_(2, idx, src)
        out.append(store)
    new_pos = in_tok if whole else torch.where(in_ok, in_tok, positions.gather(2, slot))
    positions.scatter_(2, slot, new_pos)
    return (positions, *out)
