"""`CompressedCache`: the transformers `Cache` that applies a KV method, with the budget of
`budget.py` (the same accounting for every method, so they compare on equal terms).

A cache can be cropped (a rollback of the conversation) and reset: the method's statistics are
cut with it, and a reversible method (SmallKV) brings evicted tokens back from its host copy
instead of re-reading the prompt.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache

from collab_agent.cache.budget import BudgetOf, CacheConfigError, check_budget, check_budget_of
from collab_agent.cache.layer import KVLayer

if TYPE_CHECKING:
    from collab_agent.cache.method import KVMethod, LayerPlan


class CompressedCache(Cache):
    """A transformers `Cache` that applies a KV method (see `budget.py` for the budget).

    Pass it as ``cache=`` / ``past_key_values=`` to the model (its attention must be
    ``"collab_kv"``: `KVMethod.attach` sets that). ``budgets`` may give one budget per batch row.
    """

    layers: list[KVLayer]  # type: ignore[assignment]

    def __init__(
        self,
        method: KVMethod,
        budgets: list[float] | None = None,
        budget_of: BudgetOf = "prompt",
    ) -> None:
        super().__init__(layers=[])
        self.method = method
        self.budgets = budgets
        self.budget_of: BudgetOf = check_budget_of(method.budget_of or budget_of)
        self.prompt_length: int | None = None  # P: tokens seen when compression first happened
        # the method's own state shared by the layers, made by the method (SmallKV's
        # `AssistantState`); None until it makes one
        self.state: Any = None
        self.rollbacks = 0  # crops and resets that removed tokens (a benchmark counts them)
        # (conversation id, the token ids the cache holds) when a backend owns the cache: lets
        # SmallKV use the assistant backend's own attention over the same conversation
        self.conversation: tuple[str, list[int]] | None = None
        # the last plan made and what it was made from: every layer of a step asks for the same
        self._plan_memo: tuple[tuple[Any, ...], bool, LayerPlan] | None = None

    @property
    def is_croppable(self) -> bool:
        return True

    def reset(self) -> None:
        """Forget everything, the method's own state (SmallKV's SRM cache, head mapping) too."""
        if self.get_seq_length() > 0:
            self.rollbacks += 1
        self.layers = []
        self.prompt_length = None
        self.state = None
        self._plan_memo = None

    def crop(self, max_length: int) -> None:
        """Forget tokens from the end: ``-n`` removes ``n``, a length ``>= 0`` keeps that many
        (transformers' two conventions). Both sides stay consistent: the layers and the method's
        state (`KVMethod.crop_state`, e.g. SmallKV's SRM cache) are cut to the same length."""
        length = self.get_seq_length()
        keep = length + max_length if max_length < 0 else min(max_length, length)
        if keep >= length:
            return
        if keep <= 0:
            self.reset()
            return
        self.rollbacks += 1
        for layer in self.layers:
            layer.crop(keep - layer.length)
        if self.prompt_length is not None:
            self.prompt_length = min(self.prompt_length, keep)
        self.method.crop_state(self, keep)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(KVLayer(self, len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def row_budgets(self, batch: int) -> torch.Tensor:
        if self.budgets is None:
            return torch.full((batch,), self.method.budget, dtype=torch.float64)
        if len(self.budgets) != batch:
            raise CacheConfigError(
                "budgets", f"has {len(self.budgets)} entries for a batch of {batch} rows"
            )
        return torch.tensor([check_budget(b) for b in self.budgets], dtype=torch.float64)

    def plan_for(self, layer: KVLayer) -> LayerPlan | None:
        """The layer's plan for this update, or None while the cache stays uncompressed."""
        if not layer.compressed:
            if layer.length - layer.q_pos.numel() == 0:  # first call: nothing to compress yet
                return None
            if not self.method.ready(self, layer):
                return None
            if self.prompt_length is None or layer.layer_idx == 0:
                self.prompt_length = layer.length - layer.q_pos.numel()
        batch = self.keys_batch(layer)
        assert batch > 0
        key = (
            layer.length,
            self.prompt_length,
            batch,
            None if self.budgets is None else tuple(self.budgets),
            self.budget_of,
            id(self.method),
            self.method.budget,
        )
        if self._plan_memo is None or self._plan_memo[0] != key:
            budgets = self.row_budgets(batch)
            if self.budget_of == "context":
                allowance = torch.ceil(budgets * layer.length).long()
                decoded = 0
            else:
                p = self.prompt_length or 0
                allowance = torch.ceil(budgets * p).long() + (layer.length - p)
                decoded = layer.length - p
            fits = bool((allowance >= layer.length).all())
            self._plan_memo = (key, fits, self.method.layout(allowance, layer.length, decoded))
        _, fits, plan = self._plan_memo
        if not layer.compressed and fits:
            return None  # the whole context fits: stay exact
        return plan

    def compact(self) -> None:
        """Bring every compressed layer back within its budget after a call (`KVLayer.compact`)."""
        for layer in self.layers:
            layer.compact()

    @staticmethod
    def keys_batch(layer: KVLayer) -> int:
        assert layer.keys is not None
        return layer.keys.shape[0]

    def device_bytes(self) -> int:
        """Bytes of K/V the cache holds on the device."""
        return sum(layer.device_bytes() for layer in self.layers)

    def full_bytes(self) -> int:
        """Bytes the full cache would hold for the same tokens."""
        total = 0
        for layer in self.layers:
            if layer.keys is not None:
                b, h, _, d = layer.keys.shape
                total += 2 * b * h * layer.length * d * layer.keys.element_size()
        return total

    def kv_bytes_ratio(self) -> float:
        full = self.full_bytes()
        return self.device_bytes() / full if full else 1.0

    def clone(
        self,
        budgets: list[float] | None = None,
        batch_repeat: int = 1,
        method: KVMethod | None = None,
    ) -> CompressedCache:
        """A deep copy (models referenced by the method are shared, not copied), optionally with
        other per-row budgets, the batch repeated ``batch_repeat`` times, or another method
        (before compression only: it must find the statistics it needs, see `bench kv`)."""
        memo: dict[int, Any] = {}
        for m in (self.method, method):
            if m is not None:
                memo[id(m)] = m
                for obj in m.shared_objects():
                    memo[id(obj)] = obj
        new = copy.deepcopy(self, memo)
        if method is not None:
            if any(layer.compressed for layer in self.layers):
                raise CacheConfigError("method", "a compressed cache cannot change its method")
            new.method = method
            new.budget_of = check_budget_of(method.budget_of or self.budget_of)
        if batch_repeat > 1:
            new.batch_repeat_interleave(batch_repeat)
            self.method.repeat_state(new, batch_repeat)
        if budgets is not None:
            new.budgets = list(budgets)
        return new
