"""Expected attention: how much attention the *future* queries will pay each cached token, from
the statistics of the prompt's own queries (Devoto et al. 2025, "Expected Attention: KV cache
compression by estimating attention from future queries distribution",
https://arxiv.org/abs/2510.00636, section 3; kvpress's ``ExpectedAttentionPress``).

The queries a layer computes over the prompt are modelled as a Gaussian before RoPE (mean and
covariance per head). A query at a future position ``t`` is that Gaussian rotated by ``R_t``; the
rotation is averaged over the next ``future`` positions. The expected logit of key ``k`` is then
``mu'.k / sqrt(d) + k' Sigma' k / (2 d)`` (the log of the Gaussian's moment generating function),
and a softmax over the tokens gives each token's expected share of attention.

Used by the `ExpectedAttention` baseline and as the large model's own prior in `SmallKV`.
"""

from __future__ import annotations

from typing import Any

import torch

from collab_agent.cache.base import CacheConfigError, KVLayer


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
    total = layer.state.get("query_sum")
    if total is None:
        layer.state["query_sum"] = pre.sum(2)
        layer.state["query_outer"] = torch.einsum("bhqd,bhqe->bhde", pre, pre)
        layer.state["query_count"] = pre.shape[2]
        layer.state["inverse_frequencies"] = (inv,)  # a tuple: not repeated with the batch
    else:
        layer.state["query_sum"] = total + pre.sum(2)
        layer.state["query_outer"] = layer.state["query_outer"] + torch.einsum(
            "bhqd,bhqe->bhde", pre, pre
        )
        layer.state["query_count"] = layer.state["query_count"] + pre.shape[2]


def expected_attention(
    layer: KVLayer, keys: torch.Tensor, start: int, future: int, covariance: bool = True
) -> torch.Tensor:
    """``(B, Hkv, S)`` expected attention share of ``keys`` ``(B, Hkv, S, D)`` (after RoPE) for
    queries at positions ``start .. start + future - 1``, mean over each KV head's query heads."""
    if "query_sum" not in layer.state:
        raise RuntimeError("no prompt queries were observed for expected attention")
    n = layer.state["query_count"]
    mean = layer.state["query_sum"] / n  # (B, H, D)
    cov = layer.state["query_outer"] / n - mean[..., :, None] * mean[..., None, :]
    (inv,) = layer.state["inverse_frequencies"]
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
