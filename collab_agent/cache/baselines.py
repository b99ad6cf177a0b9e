"""The KV baselines SmallKV is compared with, in the same framework and budget accounting.

Each method is a dataclass whose whole logic is `token_scores` (which tokens matter) plus, where
the method needs the model's own attention, `probability_rows` / `observe`. See `base.py` for the
shared budget accounting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from collab_agent.cache.base import (
    CacheConfigError,
    CompressedCache,
    KVLayer,
    KVMethod,
    LayerPlan,
    accumulate_scores,
)
from collab_agent.cache.expected import expected_attention, observe_queries

if TYPE_CHECKING:
    from torch import nn


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
        assert layer.scores is not None
        return layer.scores

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


@dataclass
class SnapKV(KVMethod):
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

    def layout(self, allowance: torch.Tensor, length: int, decoded: int = 0) -> LayerPlan:
        keep = allowance.clamp(max=length)
        return LayerPlan(keep=keep, recent=torch.zeros_like(keep), marginal=torch.zeros_like(keep))

    def token_scores(self, cache: CompressedCache, layer: KVLayer) -> torch.Tensor:
        votes = layer.state["votes"]  # (B, Hkv, S): window queries' attention, mean over group
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
        previous = layer.state.get("votes")
        continues = layer.state.get("votes_until") == int(q_pos[0])
        if previous is None or not continues or previous.shape != votes.shape:
            layer.state["votes"] = torch.zeros_like(votes)  # a new call: a new window
        layer.state["votes"] = layer.state["votes"] + votes
        layer.state["votes_until"] = int(q_pos[-1]) + 1


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


@dataclass
class ExpectedAttention(KVMethod):
    """Expected attention: keep the tokens the *future* queries are expected to attend most,
    estimated from the prompt queries' mean and covariance with RoPE averaged over the next
    ``future`` positions, weighted by each token's value norm (Devoto et al. 2025,
    https://arxiv.org/abs/2510.00636, section 3; kvpress's ``ExpectedAttentionPress``).

    The prompt is compressed once; tokens decoded later are kept, as in kvpress.

    Parameters
    ----------
    budget : float, default 0.2
        Share of the KV kept, of the context or the prompt (see `KVMethod`).
    sinks : int, default 4
        Initial tokens always kept and left out of the query statistics.
    future : int, default 512
        Future query positions the RoPE rotation is averaged over.
    covariance : bool, default True
        Include the queries' covariance term (else only their mean).
    value_norm : bool, default True
        Multiply each token's expected attention by the norm of its value vector.
    """

    budget: float = 0.2
    sinks: int = 4
    future: int = 512
    covariance: bool = True
    value_norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise CacheConfigError("sinks", f"must be >= 0, got {self.sinks!r}")
        if self.future < 1:
            raise CacheConfigError("future", f"must be >= 1, got {self.future!r}")

    def layout(self, allowance: torch.Tensor, length: int, decoded: int = 0) -> LayerPlan:
        keep = allowance.clamp(max=length)
        return LayerPlan(keep=keep, recent=torch.zeros_like(keep), marginal=torch.zeros_like(keep))

    def observe_queries(
        self,
        cache: CompressedCache,
        layer: KVLayer,
        module: nn.Module,
        query: torch.Tensor,
        q_pos: torch.Tensor,
    ) -> None:
        observe_queries(layer, module, query, q_pos, self.sinks)

    def token_scores(self, cache: CompressedCache, layer: KVLayer) -> torch.Tensor:
        prior = layer.state.get("expected")
        if prior is None:  # the first compression: the device still holds every prompt token
            assert layer.keys is not None and layer.values is not None
            prior = expected_attention(
                layer, layer.keys, layer.keys.shape[-2], self.future, self.covariance
            )
            if self.value_norm:
                prior = prior * layer.values.float().norm(dim=-1)
            prior[..., : self.sinks] = float("inf")
            layer.state["expected"] = prior
        scores = torch.nn.functional.pad(prior, (0, layer.length - prior.shape[-1]))
        return after_prompt_first(cache, scores, prior.shape[-1])


RECENCY_BASE = 1e6
"""Scores from here up rank tokens by position, above any attention-based score."""


def after_prompt_first(cache: CompressedCache, scores: torch.Tensor, start: int) -> torch.Tensor:
    """Rank the tokens from ``start`` on (those a prompt-compression method does not score) above
    the rest: all kept when the budget is the prompt's, the most recent first when it is a share
    of the whole context (when they alone exceed it, the oldest of them go too)."""
    scores = scores.clone()
    if cache.budget_of == "prompt":
        scores[..., start:] = float("inf")
        return scores
    n = scores.shape[-1]
    positions = torch.arange(start, n, device=scores.device, dtype=scores.dtype)
    scores[..., start:] = RECENCY_BASE + positions
    return scores
