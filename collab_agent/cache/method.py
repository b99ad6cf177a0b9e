"""The base of every KV method, and of the prompt-side ones.

A method only says *which* tokens matter (`KVMethod.token_scores`) and how its budget is split
(`KVMethod.layout`); the layer below keeps the chosen tokens on the device, the attention function
``"collab_kv"`` attends over them, and the budget accounting (`budget.py`) is the same for all
methods. A prompt-side method (compress the prompt once, keep what follows) subclasses
`PromptMethod` and writes one function, `PromptMethod.prompt_scores`.

Built on transformers' extension points only: a `Cache` whose layers are `CacheLayerMixin`
subclasses, an `AttentionInterface` / `AttentionMaskInterface` entry, and (for SmallKV) a forward
pre-hook. No model code is copied or patched. Depends on torch and transformers only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from collab_agent.cache.attention import use_kv_attention
from collab_agent.cache.budget import BudgetOf, CacheConfigError, check_budget, check_budget_of
from collab_agent.cache.compressed import CompressedCache

if TYPE_CHECKING:
    from torch import nn

    from collab_agent.cache.layer import KVLayer


@dataclass
class LayerPlan:
    """How many tokens a layer keeps, per batch row: K+V (``keep``, of which ``recent`` forced)
    and V only (``marginal``)."""

    keep: torch.Tensor
    recent: torch.Tensor
    marginal: torch.Tensor


@dataclass
class KVMethod:
    """Base of every KV method: the budget and the hooks a method fills in.

    Parameters
    ----------
    budget : float, default 0.2
        Share of the KV bytes kept on the device (K+V of a token = 1, V alone = 0.5), of the
        whole context or of the prompt, as ``budget_of`` says.
    budget_of : "context", "prompt" or None, default None (keyword only)
        ``context``: at most ``budget`` of every token seen so far stays on the device (the
        papers' accounting, for reasoning traces). ``prompt``: the prompt is compressed to
        ``budget`` and later tokens are added to the allowance one for one (kvpress's). ``None``:
        whoever makes the cache decides, `TransformersBackend` ``context``, `new_cache` alone
        ``prompt``.
    refresh_every : int, default 1 (keyword only)
        Once compressed, choose the kept tokens every this many decoded tokens; in between, new
        tokens are only appended, so the cache holds up to ``refresh_every - 1`` tokens over its
        budget and a choice made at a refresh stands until the next. 1 (the default) chooses at
        every step, the methods as published; larger values trade that for fewer per-step
        selections (see `bench kv-step`).
    """

    budget: float = 0.2
    budget_of: BudgetOf | None = field(default=None, kw_only=True)
    refresh_every: int = field(default=1, kw_only=True)
    reversible: ClassVar[bool] = False
    has_marginal: ClassVar[bool] = False
    _hooks: list[Any] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.budget = check_budget(self.budget)
        if self.budget_of is not None:
            check_budget_of(self.budget_of)
        if (
            not isinstance(self.refresh_every, int)
            or isinstance(self.refresh_every, bool)
            or self.refresh_every < 1
        ):
            raise CacheConfigError(
                "refresh_every", f"must be an integer >= 1, got {self.refresh_every!r}"
            )

    # ---- what users call ---------------------------------------------------------------------

    def attach(self, model: nn.Module) -> KVMethod:
        """Make ``model`` use the ``"collab_kv"`` attention (exact SDPA for ordinary caches)."""
        use_kv_attention(model)
        return self

    def new_cache(
        self, budgets: list[float] | None = None, budget_of: BudgetOf = "prompt"
    ) -> CompressedCache:
        """A fresh cache for one conversation (or one batch); pass it as the model's cache.
        ``budget_of`` applies unless the method sets its own (see the class docstring)."""
        return CompressedCache(self, budgets, budget_of)

    # ---- what a method implements ------------------------------------------------------------

    def ready(self, cache: CompressedCache, layer: KVLayer) -> bool:
        """Whether the layer may be compressed now (SmallKV waits for its calibration)."""
        return True

    def layout(self, allowance: torch.Tensor, length: int, decoded: int = 0) -> LayerPlan:
        """Split the per-row allowance (token equivalents) into kept, recent and marginal;
        ``decoded`` of the ``length`` tokens came after the prompt was compressed."""
        keep = allowance.clamp(max=length)
        return LayerPlan(keep=keep, recent=(keep // 2), marginal=torch.zeros_like(keep))

    def token_scores(self, cache: CompressedCache, layer: KVLayer) -> torch.Tensor:
        """Importance of every token seen, ``(B, Hkv, L)``; higher is kept first."""
        raise NotImplementedError

    def probability_rows(
        self, cache: CompressedCache, layer: KVLayer, q_pos: torch.Tensor
    ) -> slice | None:
        """Query rows of an uncompressed call whose attention probabilities `observe` needs."""
        return None

    def observe(
        self,
        cache: CompressedCache,
        layer: KVLayer,
        probs: torch.Tensor,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
    ) -> None:
        """Record attention probabilities ``(B, Hkv, G, q, S)`` over keys at ``k_pos``."""

    def observe_queries(
        self,
        cache: CompressedCache,
        layer: KVLayer,
        module: nn.Module,
        query: torch.Tensor,
        q_pos: torch.Tensor,
    ) -> None:
        """Record the queries ``(B, H, q, D)`` (after RoPE) of an uncompressed call."""

    def add_marginal(
        self, cache: CompressedCache, layer: KVLayer, probs: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """Add the marginal tokens' contribution (methods with ``has_marginal``)."""
        return out

    def shared_objects(self) -> list[Any]:
        """Objects `CompressedCache.clone` must share rather than copy (models)."""
        return []

    def repeat_state(self, cache: CompressedCache, repeats: int) -> None:
        """Repeat cache-level method state along the batch (see `CompressedCache.clone`)."""

    def crop_state(self, cache: CompressedCache, keep: int) -> None:
        """Cut cache-level method state to the first ``keep`` tokens (see `CompressedCache.crop`)."""


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


@dataclass
class PromptMethod(KVMethod):
    """Base of the prompt-side methods: the prompt is scored once, when it is first compressed;
    every token after it ranks above the prompt's (`after_prompt_first`), as in kvpress.

    A subclass writes `prompt_scores`; its statistics beyond the prompt's keys and values come
    from the `KVMethod` hooks (`observe_queries`, `probability_rows` / `observe`).
    """

    def layout(self, allowance: torch.Tensor, length: int, decoded: int = 0) -> LayerPlan:
        keep = allowance.clamp(max=length)
        return LayerPlan(keep=keep, recent=torch.zeros_like(keep), marginal=torch.zeros_like(keep))

    def prompt_scores(self, cache: CompressedCache, layer: KVLayer) -> torch.Tensor:
        """Importance ``(B, Hkv, S)`` of the first ``S`` tokens, higher kept first. Called once
        per layer, at its first compression, when ``layer.keys`` / ``layer.values``
        ``(B, Hkv, L, D)`` still hold every token in order; tokens from ``S`` on rank above."""
        raise NotImplementedError

    def token_scores(self, cache: CompressedCache, layer: KVLayer) -> torch.Tensor:
        prior = layer.state.prompt_scores
        if prior is None:
            prior = self.prompt_scores(cache, layer).float()
            layer.state.prompt_scores = prior
        scores = torch.nn.functional.pad(prior, (0, layer.length - prior.shape[-1]))
        return after_prompt_first(cache, scores, prior.shape[-1])
