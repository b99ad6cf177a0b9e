"""H2O, Heavy-Hitter Oracle: keep the tokens with the largest accumulated attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from collab_agent.cache.budget import CacheConfigError
from collab_agent.cache.method import KVMethod, LayerPlan

if TYPE_CHECKING:
    from collab_agent.cache.compressed import CompressedCache
    from collab_agent.cache.layer import KVLayer


@dataclass
class H2O(KVMethod):
    """H2O, Heavy-Hitter Oracle: keep the tokens with the largest accumulated attention of the
    model itself, plus the most recent ones (Zhang et al., NeurIPS 2023,
    https://arxiv.org/abs/2306.14048, section 3).

    Parameters
    ----------
    budget : float, default 0.2
        Share of the KV kept, of the context or the prompt (see `KVMethod`).
    recent_share : float, default 0.5
        Share of the kept tokens reserved for the most recent ones (the paper's equal split).
    """

    budget: float = 0.2
    recent_share: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.recent_share <= 1:
            raise CacheConfigError("recent_share", f"must lie in [0, 1], got {self.recent_share!r}")

    def layout(self, allowance: torch.Tensor, length: int, decoded: int = 0) -> LayerPlan:
        keep = allowance.clamp(max=length)
        recent = (keep.double() * self.recent_share).long()
        return LayerPlan(keep=keep, recent=recent, marginal=torch.zeros_like(keep))

    def token_scores(self, cache: CompressedCache, layer: KVLayer) -> torch.Tensor:
        assert layer.state.accumulated is not None
        return layer.state.accumulated

    def probability_rows(
        self, cache: CompressedCache, layer: KVLayer, q_pos: torch.Tensor
    ) -> slice | None:
        return slice(0, q_pos.numel())

    def observe(
        self,
        cache: CompressedCache,
        layer: KVLayer,
        probs: torch.Tensor,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
    ) -> None:
        accumulate_scores(layer, probs, k_pos)


def accumulate_scores(layer: KVLayer, probs: torch.Tensor, k_pos: torch.Tensor) -> None:
    """Add attention mass received by each key (summed over query heads of a KV group and over
    queries) into ``layer.state.accumulated`` at the keys' original positions."""
    b, hkv = probs.shape[:2]
    mass = probs.sum(dim=(2, 3))  # (B, Hkv, S)
    acc = layer.state.accumulated
    if acc is None or acc.shape[-1] < layer.length:
        grown = torch.zeros(b, hkv, layer.length, device=probs.device)
        if acc is not None:
            grown[..., : acc.shape[-1]] = acc
        acc = layer.state.accumulated = grown
    valid = k_pos >= 0
    acc.scatter_add_(2, k_pos.clamp(min=0), mass.masked_fill(~valid, 0.0))
