"""The statistics a KV method keeps per cache layer, as typed fields.

Tensors with a leading batch dimension are repeated with the batch (`LayerState.repeat`); those
indexed by token position on their last dimension are cut with the cache on a crop
(`LayerState.crop`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class QueryStats:
    """Running sums of a layer's prompt queries before RoPE (`expected.observe_queries`).

    Fields
    ------
    total : torch.Tensor
        ``(B, H, D)`` sum of the queries.
    outer : torch.Tensor
        ``(B, H, D, D)`` sum of their outer products.
    count : int
        Queries summed.
    inverse_frequencies : torch.Tensor
        ``(D / 2,)`` the model's RoPE inverse frequencies (not per batch row).
    """

    total: torch.Tensor
    outer: torch.Tensor
    count: int
    inverse_frequencies: torch.Tensor

    def repeat(self, repeats: int) -> None:
        self.total = self.total.repeat_interleave(repeats, dim=0)
        self.outer = self.outer.repeat_interleave(repeats, dim=0)


POSITIONAL = ("accumulated", "prompt_scores", "expected", "value_norms", "votes")
"""`LayerState` fields indexed by token position: cut with the cache on a crop."""


@dataclass
class LayerState:
    """Method statistics of one `KVLayer`; each method fills the fields it uses.

    Fields
    ------
    accumulated : torch.Tensor or None
        ``(B, Hkv, L)`` attention received per token, summed over queries (H2O); grows with
        the layer.
    prompt_scores : torch.Tensor or None
        ``(B, Hkv, P)`` a prompt-side method's scores, computed at the first compression
        (`PromptMethod`).
    votes : torch.Tensor or None
        ``(B, Hkv, S)`` attention of the observation window's queries (SnapKV).
    votes_until : int or None
        The position after the last query counted in ``votes``.
    calibration : torch.Tensor or None
        ``(B, H, S)`` the calibration block: attention of the last queries before the first
        compression (SmallKV's head matching).
    expected : torch.Tensor or None
        ``(B, Hkv, P)`` the large model's expected attention over the prompt (SmallKV's prior).
    value_norms : torch.Tensor or None
        ``(B, Hkv, L)`` norm of every token's value vector (SmallKV).
    queries : QueryStats or None
        The prompt queries' statistics (expected attention).
    """

    accumulated: torch.Tensor | None = None
    prompt_scores: torch.Tensor | None = None
    votes: torch.Tensor | None = None
    votes_until: int | None = None
    calibration: torch.Tensor | None = None
    expected: torch.Tensor | None = None
    value_norms: torch.Tensor | None = None
    queries: QueryStats | None = None

    def crop(self, keep: int) -> None:
        """Cut the positional statistics to the first ``keep`` tokens."""
        for name in POSITIONAL:
            value = getattr(self, name)
            if value is not None and value.shape[-1] > keep:
                setattr(self, name, value[..., :keep])

    def repeat(self, repeats: int) -> None:
        """Repeat every per-row statistic ``repeats`` times along the batch."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(self, f.name, value.repeat_interleave(repeats, dim=0))
        if self.queries is not None:
            self.queries.repeat(repeats)
