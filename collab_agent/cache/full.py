"""The full cache: nothing is evicted (the reference every method is measured against)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from collab_agent.cache.method import KVMethod

if TYPE_CHECKING:
    import torch

    from collab_agent.cache.compressed import CompressedCache
    from collab_agent.cache.layer import KVLayer


@dataclass
class Full(KVMethod):
    """Full cache: nothing is evicted (the reference every method is measured against).

    Parameters
    ----------
    budget : float, default 1.0
        Ignored; always the whole context.
    """

    budget: float = 1.0

    def ready(self, cache: CompressedCache, layer: KVLayer) -> bool:
        return False

    def token_scores(self, cache: CompressedCache, layer: KVLayer) -> torch.Tensor:
        raise AssertionError("Full never compresses")
