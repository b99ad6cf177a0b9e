"""SnapKV: the last prompt queries vote for the keys to keep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from collab_agent.cache.budget import CacheConfigError
from collab_agent.cache.method import PromptMethod, after_prompt_first

if TYPE_CHECKING:
    from collab_agent.cache.compressed import CompressedCache
    from collab_agent.cache.layer import KVLayer


@dataclass
class SnapKV(PromptMethod):
    """SnapKV: the last ``window`` prompt queries vote for the keys to keep, votes pooled over
    neighbouring keys (Li et al., NeurIPS 2024, https://arxiv.org/abs/2404.14469, section 4).

    The prompt is compressed once; tokens decoded later are kept (the budget allowance grows
    with them), as in the paper and in kvpress.

    Parameters
    ----------
    budget : float, default 0.2
        Share of the KV kept, of the context or the prompt (see `KVMethod`).
    window : int, default 32
        Observation window: the last prompt tokens, whose queries vote; always kept.
    kernel_size : int, default 5
        Width of the average pooling over key positions that keeps neighbours together.
    """

    budget: float = 0.2
    window: int = 32
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise CacheConfigError("window", f"must be >= 1, got {self.window!r}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise CacheConfigError("kernel_size", f"must be odd and >= 1, got {self.kernel_size!r}")

    def token_scores(self, cache: CompressedCache, layer: KVLayer) -> torch.Tensor:
        """The pooled votes, recomputed at every step rather than scored once: the window moves
        with the prompt's length, which a crop into the prompt shortens."""
        votes = layer.state.votes  # (B, Hkv, S): window queries' attention, mean over group
        assert votes is not None
        b, h, s = votes.shape
        pooled = torch.nn.functional.avg_pool1d(
            votes.reshape(b * h, 1, s),
            self.kernel_size,
            stride=1,
            padding=self.kernel_size // 2,
            count_include_pad=False,
        ).reshape(b, h, s)
        scores = torch.nn.functional.pad(pooled, (0, layer.length - s))
        window_start = max(0, (cache.prompt_length or layer.length) - self.window)
        return after_prompt_first(cache, scores, window_start)  # the window and what follows

    def probability_rows(
        self, cache: CompressedCache, layer: KVLayer, q_pos: torch.Tensor
    ) -> slice | None:
        n = q_pos.numel()
        return slice(max(0, n - self.window), n)

    def observe(
        self,
        cache: CompressedCache,
        layer: KVLayer,
        probs: torch.Tensor,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
    ) -> None:
        if layer.compressed:
            return
        votes = probs.sum(dim=3).mean(dim=2)  # summed over the window rows, mean over group
        previous = layer.state.votes
        continues = layer.state.votes_until == int(q_pos[0])
        if previous is None or not continues or previous.shape != votes.shape:
            previous = torch.zeros_like(votes)  # a new call: a new window
        layer.state.votes = previous + votes
        layer.state.votes_until = int(q_pos[-1]) + 1
