"""StreamingLLM: a few attention-sink tokens at the start plus a recent window."""

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
class StreamingLLM(KVMethod):
    """StreamingLLM: keep a few attention-sink tokens at the start plus a recent window
    (Xiao et al., ICLR 2024, https://arxiv.org/abs/2309.17453, section 3.2).

    Parameters
    ----------
    budget : float, default 0.2
        Share of the KV kept, of the context or the prompt (see `KVMethod`).
    sinks : int, default 4
        Number of initial tokens always kept.
    """

    budget: float = 0.2
    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise CacheConfigError("sinks", f"must be >= 0, got {self.sinks!r}")

    def layout(self, allowance: torch.Tensor, length: int, decoded: int = 0) -> LayerPlan:
        keep = allowance.clamp(max=length)
        return LayerPlan(keep=keep, recent=torch.zeros_like(keep), marginal=torch.zeros_like(keep))

    def token_scores(self, cache: CompressedCache, layer: KVLayer) -> torch.Tensor:
        assert layer.keys is not None
        b, h = layer.keys.shape[:2]
        score = torch.arange(layer.length, device=layer.keys.device, dtype=torch.float32)
        score[: self.sinks] = float(layer.length + 1)
        return score.expand(b, h, layer.length)
