"""One layer of a `CompressedCache`: a growing cache until the method compresses it, then slots.

It hands the method's scores to the slot functions (`slots.py`), keeps the host copy of every
token for reversible methods, and computes attention over the kept tokens by original position
(RoPE is applied before caching, so positions stay right after eviction).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from collab_agent.cache.attention import attend_next, attention_probs, probs_in_chunks
from collab_agent.cache.slots import kept_mask, occupied, refresh_slots, top_mask
from collab_agent.cache.state import LayerState

if TYPE_CHECKING:
    from torch import nn

    from collab_agent.cache.compressed import CompressedCache
    from collab_agent.cache.method import LayerPlan

HOST_HEADROOM = 256
"""Host copies grow to at least this many tokens past what they must hold (a prompt plus its
decode), and to 5/4 of it, so a decode step rarely reallocates them."""


class KVLayer(CacheLayerMixin):
    """One layer of a `CompressedCache`.

    Before compression it is a plain growing cache (attention is transformers' SDPA, so budget
    1.0 is bit-for-bit the full cache). Once compressed it holds *slots*: ``keys``/``values``
    ``(B, Hkv, S, D)`` with ``positions`` ``(B, Hkv, S)`` (original token index, -1 = empty),
    and, for methods with marginal tokens, ``marginal_values`` / ``marginal_positions``.
    Reversible methods keep every token's K/V in ``host_keys``/``host_values`` (CPU memory) so
    an evicted token can come back; on CUDA the copies run asynchronously and are read only
    after the event recorded behind them (`host_synchronize`).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, cache: CompressedCache, layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.length = 0  # tokens seen
        self.compressed = False
        self.positions: torch.Tensor | None = None
        self.marginal_values: torch.Tensor | None = None
        self.marginal_positions: torch.Tensor | None = None
        self.host_keys: torch.Tensor | None = None
        self.host_values: torch.Tensor | None = None
        self.state = LayerState()  # the method's statistics
        self.since_refresh = 0  # tokens appended without a selection (`KVMethod.refresh_every`)
        self.incoming: torch.Tensor | None = None  # this call's values (B, Hkv, q, D), on device
        self._host_copied: Any = None  # CUDA event recorded after the last host copy

    # ---- transformers' CacheLayerMixin -----------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.positions = torch.zeros(b, h, 0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.__init__(self.cache, self.layer_idx)  # type: ignore[misc]

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``tokens_to_remove`` tokens (a negative count, as transformers' layers
        take it). Uncompressed, the K/V are cut exactly; compressed, the slots of forgotten tokens
        are freed, the tokens still held stay, and a reversible method may bring evicted ones back
        from the host copy at the next update (which is written over from position ``keep`` on)."""
        keep = self.length - abs(tokens_to_remove)
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if keep <= 0:
            self.reset()
            return
        assert self.keys is not None and self.values is not None and self.positions is not None
        if not self.compressed:
            self.keys = self.keys[..., :keep, :]
            self.values = self.values[..., :keep, :]
            self.positions = self.positions[..., :keep]
        else:
            self.positions = self.positions.masked_fill(self.positions >= keep, -1)
            if self.marginal_positions is not None:
                self.marginal_positions = self.marginal_positions.masked_fill(
                    self.marginal_positions >= keep, -1
                )
        self.state.crop(keep)
        self.length = keep
        self.since_refresh = self.cache.method.refresh_every  # choose again at the next update

    def host_synchronize(self) -> None:
        """Wait until the host copies started so far have landed (CUDA; no-op elsewhere)."""
        if self._host_copied is not None:
            self._host_copied.synchronize()
            self._host_copied = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        names = ("keys", "values", "positions", "marginal_values", "marginal_positions")
        for name in (*names, "host_keys", "host_values"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.repeat_interleave(repeats, dim=0))
        self.state.repeat(repeats)

    # ---- update: append, then (re)select ---------------------------------------------------

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None and self.positions is not None
        b, h, q, _ = key_states.shape
        old = self.length
        self.length += q
        self.q_pos = torch.arange(old, old + q, device=self.device)
        method = self.cache.method
        self.incoming = value_states
        if method.reversible:
            self._host_append(key_states, value_states, old)
        if self.state.accumulated is not None:
            self.state.accumulated = torch.nn.functional.pad(self.state.accumulated, (0, q))
        new_pos = self.q_pos.expand(b, h, q)
        if self.appends_only(q):
            # between refreshes: keep the slots as chosen, append this call's tokens
            self.since_refresh += q
            plan = None
        else:
            plan = self.cache.plan_for(self)
        if plan is None:  # no compression (yet), or between refreshes: append
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.positions = torch.cat([self.positions, new_pos], dim=-1)
        else:
            self._select(plan, key_states, value_states, old)
            self.compressed = True
            self.since_refresh = 0
            if method.refresh_every > 1:
                self._pack()
        attend_next(self)
        return self.keys, self.values

    def appends_only(self, tokens: int) -> bool:
        """Whether an update of ``tokens`` tokens only appends them: the layer is compressed and
        the next selection is not due yet (`KVMethod.refresh_every`)."""
        return self.compressed and self.since_refresh + tokens < self.cache.method.refresh_every

    def compact(self) -> None:
        """Free the slots held over the budget once a call is over.

        A call keeps all of its own tokens while it runs (its queries must see them), so a call
        that reads many tokens and generates few (a judge or an answer after a re-render) would
        leave the cache over budget until the next update. Only evicts: the kept tokens are the
        top of the method's scores among those the slots hold, as the next update would choose.
        """
        if not self.compressed or self.positions is None:
            return
        plan = self.cache.plan_for(self)
        if plan is None:
            return
        scores = self.cache.method.token_scores(self.cache, self).float()
        keep = kept_mask(
            scores,
            plan.recent.to(self.device),
            plan.keep.to(self.device),
            occupied(self.positions, self.length),
        )
        stays = keep.gather(2, self.positions.clamp(min=0)) & (self.positions >= 0)
        self.positions = torch.where(stays, self.positions, torch.full_like(self.positions, -1))

    def _pack(self) -> None:
        """Move the filled slots to the front and drop the empty tail, so slots freed at a
        refresh do not pile up behind the tokens appended between refreshes."""
        assert self.keys is not None and self.values is not None and self.positions is not None
        filled = self.positions >= 0
        count = int(filled.sum(-1).max()) if filled.numel() else 0
        # stable: filled slots first, in their current order
        order = torch.sort((~filled).to(torch.int8), dim=-1, stable=True).indices[..., :count]
        self.positions = self.positions.gather(2, order)
        self.keys = self.keys.gather(2, order[..., None].expand(*order.shape, self.keys.shape[-1]))
        self.values = self.values.gather(
            2, order[..., None].expand(*order.shape, self.values.shape[-1])
        )

    def _host_append(self, k: torch.Tensor, v: torch.Tensor, old: int) -> None:
        # earlier copies (rows before `old`, which `source` may read this step) have landed
        self.host_synchronize()
        need = old + k.shape[-2]
        if self.host_keys is None or self.host_keys.shape[-2] < need:
            cap = max(need + HOST_HEADROOM, need * 5 // 4)
            pin = k.device.type == "cuda"
            nk = torch.empty(*k.shape[:2], cap, k.shape[-1], dtype=k.dtype, pin_memory=pin)
            nv = torch.empty(*v.shape[:2], cap, v.shape[-1], dtype=v.dtype, pin_memory=pin)
            if self.host_keys is None and old > 0:
                # the method became reversible after an uncompressed prefill (a clone with
                # another method): the device still holds every token, in order
                if self.compressed or self.keys is None or self.values is None:
                    raise RuntimeError("no host copy of the evicted tokens to start from")
                nk[..., :old, :] = self.keys[..., :old, :].cpu()
                nv[..., :old, :] = self.values[..., :old, :].cpu()
            elif self.host_keys is not None and self.host_values is not None:
                nk[..., :old, :] = self.host_keys[..., :old, :]
                nv[..., :old, :] = self.host_values[..., :old, :]
            self.host_keys, self.host_values = nk, nv
        assert self.host_values is not None
        self.host_keys[..., old:need, :].copy_(k, non_blocking=True)
        self.host_values[..., old:need, :].copy_(v, non_blocking=True)
        if k.device.type == "cuda":
            self._host_copied = torch.cuda.Event()
            self._host_copied.record(torch.cuda.current_stream(k.device))

    def _select(self, plan: LayerPlan, k_new: torch.Tensor, v_new: torch.Tensor, old: int) -> None:
        """Choose the kept tokens from the method's scores and move them into the slots."""
        method = self.cache.method
        q_new = k_new.shape[-2]
        n = self.length
        assert self.positions is not None
        scores = method.token_scores(self.cache, self).float()  # (B, Hkv, L)
        alive: torch.Tensor | None = None  # a reversible method may bring back any token
        if not method.reversible:
            alive = occupied(self.positions, n)
            alive[..., old:] = True
        # this call's tokens are always kept (a query must see itself), even over the budget
        n_recent = plan.recent.clamp(min=q_new).to(self.device)
        n_keep = torch.maximum(plan.keep.to(self.device), n_recent)
        # a token evicted for good (not reversible) stays out even inside the recent window,
        # which can reach back over evicted tokens after a crop
        keep_mask = kept_mask(scores, n_recent, n_keep, alive)
        if not self.compressed:
            self._gather_initial(keep_mask, k_new, v_new, old)
        else:
            self._refresh(keep_mask, k_new, v_new, old)
        if method.has_marginal and (int(plan.marginal.max()) > 0 or self._holds_marginal()):
            dropped = keep_mask if alive is None else keep_mask | ~alive
            rest = scores.masked_fill(dropped, float("-inf"))
            marginal_mask = top_mask(rest, plan.marginal.to(self.device))
            if alive is not None:
                marginal_mask &= alive
            self._refresh_marginal(marginal_mask, v_new, old)

    def _holds_marginal(self) -> bool:
        """Whether any marginal slot holds a token (a plan without marginal tokens must free
        them; with none held, its refresh would change nothing)."""
        mpos = self.marginal_positions
        return mpos is not None and mpos.numel() > 0 and bool((mpos >= 0).any())

    def source(
        self, tok: torch.Tensor, k_new: torch.Tensor | None, v_new: torch.Tensor, old: int
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """K and V of tokens ``tok`` (B, Hkv, M): new ones from this call, older ones from host."""
        is_new = tok >= old
        d = v_new.shape[-1]
        rel = (tok - old).clamp(min=0, max=v_new.shape[-2] - 1)
        v = v_new.gather(2, rel[..., None].expand(*rel.shape, d))
        k = k_new.gather(2, rel[..., None].expand(*rel.shape, d)) if k_new is not None else None
        if bool((~is_new).any()):
            if self.host_values is None:
                raise RuntimeError(
                    f"{type(self.cache.method).__name__} asked for an evicted token, "
                    "but it is not reversible"
                )
            hidx = tok.clamp(max=old - 1).cpu()
            hv = self.host_values.gather(2, hidx[..., None].expand(*hidx.shape, d))
            v = torch.where(is_new[..., None], v, hv.to(self.device, non_blocking=True))
            if k is not None and self.host_keys is not None:
                hk = self.host_keys.gather(2, hidx[..., None].expand(*hidx.shape, d))
                k = torch.where(is_new[..., None], k, hk.to(self.device, non_blocking=True))
        return k, v

    def _gather_initial(
        self, keep_mask: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, old: int
    ) -> None:
        assert self.keys is not None and self.values is not None
        all_k = torch.cat([self.keys, k_new], dim=-2)
        all_v = torch.cat([self.values, v_new], dim=-2)
        count = int(keep_mask.sum(-1).max())
        tok = torch.topk(keep_mask.float(), count, dim=-1).indices.sort(-1).values
        valid = keep_mask.gather(2, tok)
        d = all_k.shape[-1]
        self.keys = all_k.gather(2, tok[..., None].expand(*tok.shape, d))
        self.values = all_v.gather(2, tok[..., None].expand(*tok.shape, all_v.shape[-1]))
        self.positions = torch.where(valid, tok, torch.full_like(tok, -1))

    def _refresh(
        self, keep_mask: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, old: int
    ) -> None:
        """Diff update of the K+V slots: free slots of dropped tokens, fill them with incoming ones."""
        assert self.keys is not None and self.values is not None and self.positions is not None
        self.positions, self.keys, self.values = refresh_slots(
            self.source, keep_mask, self.positions, [self.keys, self.values], k_new, v_new, old
        )

    def _refresh_marginal(self, mask: torch.Tensor, v_new: torch.Tensor, old: int) -> None:
        b, h, _, d = v_new.shape
        if self.marginal_positions is None or self.marginal_values is None:
            self.marginal_positions = torch.full(
                (b, h, 0), -1, dtype=torch.long, device=self.device
            )
            self.marginal_values = v_new.new_zeros(b, h, 0, d)
        self.marginal_positions, self.marginal_values = refresh_slots(
            self.source, mask, self.marginal_positions, [self.marginal_values], None, v_new, old
        )

    # ---- attention ---------------------------------------------------------------------------

    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, None]:
        method = self.cache.method
        positions = self.positions
        assert positions is not None
        if not self.compressed:
            method.observe_queries(self.cache, self, module, query, self.q_pos)
            rows = method.probability_rows(self.cache, self, self.q_pos)
            if rows is not None:
                probs_in_chunks(
                    query,
                    key,
                    self.q_pos,
                    positions,
                    scaling,
                    rows,
                    lambda p, qp: method.observe(self.cache, self, p, qp, positions),
                )
            return sdpa_attention_forward(
                module, query, key, value, mask, scaling=scaling, **kwargs
            )
        # one query (a decode step) comes after every token held: only empty slots are masked
        one = query.shape[2] == 1
        probs = attention_probs(query, key, self.q_pos, positions, scaling, causal=not one)
        method.observe(self.cache, self, probs, self.q_pos, positions)
        out = torch.matmul(probs.to(value.dtype), value.unsqueeze(2))  # (B, Hkv, G, q, D)
        if method.has_marginal and self.marginal_values is not None:
            out = method.add_marginal(self.cache, self, probs, out)
        b, h, q, _d = query.shape
        return out.reshape(b, h, q, -1).transpose(1, 2).contiguous(), None

    # ---- accounting ----------------------------------------------------------------------------

    def device_bytes(self) -> int:
        """Bytes the layer holds on the accelerator (host copies not counted)."""
        total = 0
        for t in (self.keys, self.values, self.marginal_values):
            if t is not None:
                total += t.numel() * t.element_size()
        if self.compressed and self.positions is not None and self.keys is not None:
            # empty slots are capacity, not content: count only the filled ones
            filled = int((self.positions >= 0).sum())
            per = self.keys.shape[-1] * self.keys.element_size() * 2
            total = filled * per
            if self.marginal_positions is not None and self.marginal_values is not None:
                mfilled = int((self.marginal_positions >= 0).sum())
                total += (
                    mfilled * self.marginal_values.shape[-1] * self.marginal_values.element_size()
                )
        return total
