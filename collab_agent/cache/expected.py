"""Expected attention: how much attention the *future* queries will pay each cached token, from
the statistics of the prompt's own queries (Devoto et al. 2025, "Expected Attention: KV cache
compression by estimating attention from future queries distribution",
https://arxiv.org/abs/2510.00636, section 3; kvpress's ``ExpectedAttentionPress``).

The queries a layer computes over the prompt are modelled as a Gaussian before RoPE (mean and
covariance per head). A query at a future position ``t`` is that Gaussian rotated by ``R_t``; the
rotation is averaged over the next ``future`` positions. The expected logit of key ``k`` is then
``mu'.k / sqrt(d) + k' Sigma' k / (2 d)`` (the log of the Gaussian's moment generating function),
and a softmax over the tokens gives each token's expected share of attention.

The `ExpectedAttention` method keeps the tokens it ranks highest; `SmallKV` uses the estimate as
the large model's own prior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from collab_agent.cache.budget import CacheConfigError
from collab_agent.cache.method import PromptMethod
from collab_agent.cache.state import QueryStats

if TYPE_CHECKING:
    from torch import nn

    from collab_agent.cache.compressed import CompressedCache
    from collab_agent.cache.layer import KVLayer


def inverse_frequencies(config: Any, head_dim: int, device: torch.device) -> torch.Tensor:
    """RoPE's ``(head_dim / 2,)`` inverse frequencies from a model config: plain RoPE, or any
    scaled kind transformers knows (``linear``, ``llama3``, ``yarn``...), whose inverse
    frequencies its own ``ROPE_INIT_FUNCTIONS`` give."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
        inv = 1.0 / theta**exponents
    elif rope_type in ROPE_INIT_FUNCTIONS:
        inv = ROPE_INIT_FUNCTIONS[rope_type](config, device)[0].float()
    else:
        raise CacheConfigError("model", f"expected attention: unknown RoPE kind {rope_type!r}")
    if inv.numel() != head_dim // 2:
        raise CacheConfigError(
            "model",
            f"expected attention needs RoPE over the whole head ({head_dim // 2} frequencies), "
            f"this model rotates {inv.numel()}",
        )
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' RoPE pairing: ``[x1, x2] -> [-x2, x1]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def observe_queries(
    layer: KVLayer, module: Any, query: torch.Tensor, q_pos: torch.Tensor, sinks: int
) -> None:
    """Add the prompt queries ``(B, H, q, D)`` (after RoPE) at ``q_pos`` into the layer's running
    pre-RoPE sums; the first ``sinks`` positions (attention sinks, outliers) are skipped."""
    keep = q_pos >= sinks
    if not bool(keep.any()):
        return
    q = query[:, :, keep].float()
    d = q.shape[-1]
    inv = inverse_frequencies(module.config, d, q.device)
    angles = q_pos[keep].float()[:, None] * inv  # (q, D/2)
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    pre = q * cos - rotate_half(q) * sin  # undo R_pos
    outer = torch.einsum("bhqd,bhqe->bhde", pre, pre)
    stats = layer.state.queries
    if stats is None:
        layer.state.queries = QueryStats(pre.sum(2), outer, pre.shape[2], inv)
    else:
        stats.total = stats.total + pre.sum(2)
        stats.outer = stats.outer + outer
        stats.count += pre.shape[2]


def expected_attention(
    layer: KVLayer, keys: torch.Tensor, start: int, future: int, covariance: bool = True
) -> torch.Tensor:
    """``(B, Hkv, S)`` expected attention share of ``keys`` ``(B, Hkv, S, D)`` (after RoPE) for
    queries at positions ``start .. start + future - 1``, mean over each KV head's query heads."""
    stats = layer.state.queries
    if stats is None:
        raise RuntimeError("no prompt queries were observed for expected attention")
    mean = stats.total / stats.count  # (B, H, D)
    cov = stats.outer / stats.count - mean[..., :, None] * mean[..., None, :]
    inv = stats.inverse_frequencies
    d = mean.shape[-1]
    t = torch.arange(start, start + future, dtype=torch.float32, device=keys.device)
    angles = t[:, None] * inv  # (F, D/2)
    cos_bar = angles.cos().mean(0).repeat(2)
    sin_bar = angles.sin().mean(0).repeat(2)
    # the averaged rotation as a matrix: R x = x * cos + rotate_half(x) * sin
    eye = torch.eye(d, device=keys.device)
    rot = eye * cos_bar[:, None] + rotate_half(eye.T).T * sin_bar[:, None]
    mean_f = mean @ rot.T
    b, hkv = keys.shape[:2]
    h = mean.shape[1]
    g = h // hkv
    k = keys.float()
    logits = torch.einsum("bkgd,bksd->bkgs", mean_f.reshape(b, hkv, g, d), k) / d**0.5
    if covariance:
        cov_f = rot @ cov @ rot.T  # (B, H, D, D)
        kc = torch.einsum("bksd,bkgde->bkgse", k, cov_f.reshape(b, hkv, g, d, d))
        logits = logits + (kc * k[:, :, None]).sum(-1) / (2 * d)
    return torch.softmax(logits, dim=-1).mean(2)


@dataclass
class ExpectedAttention(PromptMethod):
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

    def observe_queries(
        self,
        cache: CompressedCache,
        layer: KVLayer,
        module: nn.Module,
        query: torch.Tensor,
        q_pos: torch.Tensor,
    ) -> None:
        observe_queries(layer, module, query, q_pos, self.sinks)

    def prompt_scores(self, cache: CompressedCache, layer: KVLayer) -> torch.Tensor:
        assert layer.keys is not None and layer.values is not None
        scores = expected_attention(
            layer, layer.keys, layer.keys.shape[-2], self.future, self.covariance
        )
        if self.value_norm:
            scores = scores * layer.values.float().norm(dim=-1)
        scores[..., : self.sinks] = float("inf")
        return scores
