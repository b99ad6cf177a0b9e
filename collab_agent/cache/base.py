"""The framework every KV method shares: a compressed `Cache`, its layers, and one attention function.

A method (`SmallKV`, `H2O`, `SnapKV`, `StreamingLLM`, `Full`) only says *which* tokens matter
(`token_scores`) and how its budget is split (`layout`); the layer below keeps the chosen tokens
on the device, the attention function registered under ``"collab_kv"`` attends over them, and the
budget accounting is the same for all methods, so they compare on equal terms.

Built on transformers' extension points only: a `Cache` whose layers are `CacheLayerMixin`
subclasses, an `AttentionInterface` / `AttentionMaskInterface` entry, and (for SmallKV) a forward
pre-hook. No model code is copied or patched. Depends on torch and transformers only.

Budget accounting (all methods, a token's K+V = 1 token equivalent, V alone = 0.5), one of two
modes (`KVMethod.budget_of`):

- ``"context"``: at every step the cache holds at most ``ceil(budget * L)`` token equivalents,
  L = every token seen so far (prompt and everything decoded), as in the SmallKV and H2O papers.
  The mode for a reasoning trace, whose decoded tokens outnumber the question's; the default of
  `TransformersBackend(cache=...)`.
- ``"prompt"``: the prompt is compressed to ``ceil(budget * P)`` (P = tokens seen when
  compression first happens) and every token processed after that adds one token equivalent to
  the allowance, as in kvpress, where the prompt is compressed and decoded tokens are appended.
  The default of a cache made by `KVMethod.new_cache` alone (`bench kv`, `bench kv-gsm8k`).

Original positions are kept for every cached token (RoPE is applied before caching), so positions
stay right after eviction. A cache can be cropped (a rollback of the conversation) and reset: the
method's statistics are cut with it, and a reversible method (SmallKV) brings evicted tokens back
from its host copy instead of re-reading the prompt.
"""

from __future__ import annotations

import contextvars
import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

if TYPE_CHECKING:
    from torch import nn

ATTENTION_NAME = "collab_kv"
"""The `attn_implementation` name under which the KV methods' attention function is registered."""

_PENDING: contextvars.ContextVar[Any] = contextvars.ContextVar("collab_kv_pending", default=None)
"""The cache layer that was updated last in this thread; the attention call that follows uses it."""

PROBS_CHUNK = 256
"""Query rows per chunk when attention probabilities are materialised (bounds memory)."""

LAST_ROWS = 64
"""An observed (SRM) layer keeps its last call's attention rows for calls up to this many tokens;
for longer calls it keeps the queries instead and the rows a method needs are recomputed from
them (memory: the rows of every head would be ``q x L`` floats each)."""

BudgetOf = Literal["context", "prompt"]
"""What a budget is a share of: the whole current context, or the prompt (see the module)."""

POSITIONAL_STATE = ("expected", "value_norms", "votes")
"""Per-layer method statistics indexed by token position: cut with the cache on a crop."""


def check_budget_of(budget_of: object, argument: str = "budget_of") -> BudgetOf:
    if budget_of not in ("context", "prompt"):
        raise CacheConfigError(argument, f"must be 'context' or 'prompt', got {budget_of!r}")
    return budget_of  # type: ignore[return-value]


class CacheConfigError(ValueError):
    """A KV-method argument is out of range or of the wrong kind; names the argument."""

    def __init__(self, argument: str, problem: str) -> None:
        self.argument = argument
        super().__init__(f"{argument}: {problem}")


def check_budget(budget: object) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise CacheConfigError("budget", f"must be a fraction in (0, 1], got {budget!r}")
    return float(budget)


# --------------------------------------------------------------------------------------------
# Attention helpers
# --------------------------------------------------------------------------------------------


def attention_probs(
    query: torch.Tensor,
    keys: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Softmax attention probabilities in float32, causal by original position.

    query ``(B, H, q, D)``, keys ``(B, Hkv, S, D)``, q_pos ``(q,)``, k_pos ``(B, Hkv, S)`` with -1
    for an empty slot. Returns ``(B, Hkv, G, q, S)`` with ``G = H // Hkv`` (GQA groups).
    """
    b, h, q, d = query.shape
    hkv = keys.shape[1]
    g = h // hkv
    # (B, Hkv, G*q, D) @ (B, Hkv, D, S): one matmul per KV head; broadcasting the keys over the
    # groups instead made torch copy them per group (60x slower on CPU at q=1, same result)
    qg = query.reshape(b, hkv, g * q, d)
    logits = torch.matmul(qg, keys.transpose(-1, -2)).reshape(b, hkv, g, q, -1).float() * scaling
    allowed = (k_pos[:, :, None, None, :] >= 0) & (k_pos[:, :, None, None, :] <= q_pos[:, None])
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _probs_in_chunks(
    query: torch.Tensor,
    keys: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scaling: float,
    rows: slice,
    sink: Any,
) -> None:
    """Materialise probabilities for the query rows in ``rows`` chunk by chunk; ``sink(probs, q_pos)``."""
    start, stop = rows.start or 0, rows.stop if rows.stop is not None else query.shape[2]
    for s in range(start, stop, PROBS_CHUNK):
        e = min(stop, s + PROBS_CHUNK)
        sink(attention_probs(query[:, :, s:e], keys, q_pos[s:e], k_pos, scaling), q_pos[s:e])


def kv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``"collab_kv"``.

    With an ordinary cache it is exactly transformers' SDPA attention. With a `KVLayer` or an
    `ObservedLayer` (set by the layer's ``update`` just before) it records what the method needs
    and, once the cache is compressed, attends over the kept tokens by original position.
    """
    layer = _PENDING.get()
    _PENDING.set(None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if layer is None or layer.layer_idx != getattr(module, "layer_idx", layer.layer_idx):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return layer.attend(module, query, key, value, attention_mask, scaling, kwargs)


_REGISTERED = False


def register_attention() -> None:
    """Register ``"collab_kv"`` with transformers' attention and mask interfaces (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(ATTENTION_NAME, kv_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
        _REGISTERED = True


def use_kv_attention(model: nn.Module) -> None:
    """Switch ``model`` to the ``"collab_kv"`` attention (plain SDPA for ordinary caches)."""
    register_attention()
    config = getattr(model, "config", None)
    if config is None:
        raise CacheConfigError("model", "must be a transformers PreTrainedModel with a config")
    if config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)  # type: ignore[operator]


# --------------------------------------------------------------------------------------------
# Cache layers
# --------------------------------------------------------------------------------------------


class ObservedLayer(DynamicLayer):
    """A full-cache layer that records attention: accumulated per key, the last call's rows (or,
    for a call longer than `LAST_ROWS`, its queries), the sum of the last ``window`` query rows
    (``window_sum``), and the calibration block (see `calibration_update`).

    Used for the assistant (SRM) of SmallKV; the attention output itself is exact.
    """

    def __init__(
        self, layer_idx: int, calibration_tokens: int, keep_last: bool, window: int = 32
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.calibration_tokens = calibration_tokens
        self.keep_last = keep_last
        self.window = window
        # the last `window` query rows, row of position p in slot p % window (a ring, so a step
        # writes one row instead of shifting them all), and their running sum over the rows
        self.ring: torch.Tensor | None = None  # (B, H, window, capacity) float32
        self.window_sum: torch.Tensor | None = None  # (B, H, L) float32
        self.accumulated: torch.Tensor | None = None  # (B, H, L) float32
        self.calibration: torch.Tensor | None = None  # (B, H, L') float32
        self.last: torch.Tensor | None = None  # (B, H, q, L) float32, last call's probabilities
        self.last_query: torch.Tensor | None = None  # (B, H, q, D), when `last` would be too big
        self.last_q_pos: torch.Tensor | None = None
        self.scaling = 1.0
        self.calibrating = True  # a method that has used the calibration block turns this off
        self.seen = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states)
        self._q_pos = torch.arange(
            self.seen, self.seen + key_states.shape[-2], device=key_states.device
        )
        self.seen += key_states.shape[-2]
        _PENDING.set(self)
        return keys, values

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
        b, h, q, _ = query.shape
        n = key.shape[-2]
        k_pos = torch.arange(n, device=key.device).expand(b, key.shape[1], n)
        acc = torch.zeros(b, h, n, dtype=torch.float32, device=key.device)
        if self.accumulated is not None:
            acc[..., : self.accumulated.shape[-1]] = self.accumulated
        calib_rows = calibration_rows(q, self.calibration_tokens)
        calib = (
            calibration_start(self.calibration, q, self.calibration_tokens, acc)
            if self.calibrating
            else None
        )
        lasts: list[torch.Tensor] = []
        recent: list[torch.Tensor] = []
        recent_pos: list[torch.Tensor] = []
        first_calib = self.seen - q + calib_rows.start

        def sink(probs: torch.Tensor, qp: torch.Tensor) -> None:
            flat = probs.flatten(1, 2)  # (B, H, rows, L)
            acc.add_(flat.sum(2))
            in_window = qp >= self.seen - self.window
            if bool(in_window.any()):
                recent.append(flat[:, :, in_window])
                recent_pos.append(qp[in_window])
            rows = qp >= first_calib
            if calib is not None and bool(rows.any()):
                calib.add_(flat[:, :, rows].sum(2))
            if self.keep_last and q <= LAST_ROWS:
                lasts.append(flat)

        _probs_in_chunks(query, key, self._q_pos, k_pos, scaling, slice(0, q), sink)
        self.accumulated = acc
        if calib is not None:
            self.calibration = calib
        self.last = torch.cat(lasts, dim=2) if lasts else None
        keep_query = self.keep_last and q > LAST_ROWS
        self.last_query = query if keep_query else None
        self.last_q_pos = self._q_pos if keep_query else None
        self.scaling = scaling
        self._enter_window(torch.cat(recent, dim=2), torch.cat(recent_pos), n)
        out = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, **kwargs)
        return out

    def crop_to(self, keep: int) -> None:
        """Forget every token from position ``keep`` on: keys, values and statistics. The
        attention that forgotten queries paid to kept keys stays in ``accumulated`` (the sum
        cannot be taken apart); the window loses the forgotten rows and refills as tokens come."""
        if keep >= self.seen:
            return
        if keep <= 0:
            self.__init__(  # type: ignore[misc]
                self.layer_idx, self.calibration_tokens, self.keep_last, self.window
            )
            return
        super().crop(keep - self.seen)
        old = self.seen
        self.seen = keep
        for name in ("accumulated", "calibration"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[..., :keep].contiguous())
        self.last = self.last_query = self.last_q_pos = None
        if self.ring is not None:
            # out of place: a rollback may come outside the inference mode the rows were made in
            gone = torch.arange(max(keep, old - self.window), old, device=self.ring.device)
            ring = self.ring.index_fill(2, gone % self.window, 0.0)
            later = torch.arange(ring.shape[-1], device=ring.device) >= keep
            self.ring = ring.masked_fill(later, 0.0)
            self.window_sum = self.ring[..., :keep].sum(2)

    def _enter_window(self, rows: torch.Tensor, positions: torch.Tensor, n: int) -> None:
        """Put the query rows ``(B, H, r, n)`` at ``positions`` into the window: each takes the
        slot of the row ``window`` positions before it, whose attention leaves the sum. Every
        ``window`` positions the sum is recomputed from the ring (no drift from the updates)."""
        b, h, _, _ = rows.shape
        if self.ring is None or self.ring.shape[-1] < n:
            cap = max(n + 256, n * 5 // 4)
            ring = rows.new_zeros(b, h, self.window, cap)
            if self.ring is not None:
                ring[..., : self.ring.shape[-1]] = self.ring
            self.ring = ring
        total = rows.new_zeros(b, h, n)
        if self.window_sum is not None:
            total[..., : self.window_sum.shape[-1]] = self.window_sum
        slots = positions % self.window
        total -= self.ring[:, :, slots, :n].sum(2)
        self.ring[:, :, slots, :n] = rows
        self.ring[:, :, slots, n:] = 0.0
        total += rows.sum(2)
        if int(positions[-1]) % self.window == self.window - 1:
            total = self.ring[..., :n].sum(2)
        self.window_sum = total


class ObservedCache(DynamicCache):
    """A full `DynamicCache` whose layers record attention (see `ObservedLayer`)."""

    layers: list[ObservedLayer]  # type: ignore[assignment]

    def __init__(
        self, calibration_tokens: int = 128, keep_last: bool = True, window: int = 32
    ) -> None:
        super().__init__()
        self.calibration_tokens = calibration_tokens
        self.keep_last = keep_last
        self.window = window
        self.layer_class_to_replicate = None  # layers are made here, with their index

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(
                ObservedLayer(
                    len(self.layers), self.calibration_tokens, self.keep_last, self.window
                )
            )
        return self.layers[layer_idx].update(key_states, value_states)

    def crop_to(self, keep: int) -> None:
        """Forget every token from position ``keep`` on (see `ObservedLayer.crop_to`)."""
        for layer in self.layers:
            layer.crop_to(keep)

    def crop(self, max_length: int) -> None:
        """transformers' crop (``-n`` removes ``n`` tokens), statistics cut too."""
        seen = self.get_seq_length()
        self.crop_to(seen + max_length if max_length < 0 else max_length)

    def reset(self) -> None:
        self.layers = []


def calibration_rows(q: int, tokens: int) -> slice:
    """The query rows of a ``q``-token call that enter the calibration block: its last
    ``tokens`` (the most recent text, the part of the context that the coming tokens continue,
    rather than the chat template at the start)."""
    return slice(max(0, q - tokens), q)


def calibration_start(
    previous: torch.Tensor | None, q: int, tokens: int, like: torch.Tensor
) -> torch.Tensor:
    """The calibration block, shaped as ``like`` ``(B, H, n)``, that a ``q``-token call adds to: a
    fresh one when the call alone fills the block (its last ``tokens`` rows), else ``previous``
    (rows of shorter calls add up) widened to the call's ``n`` keys."""
    if previous is None or q >= tokens or previous.shape[:2] != like.shape[:2]:
        return torch.zeros_like(like)
    return torch.nn.functional.pad(previous, (0, like.shape[-1] - previous.shape[-1]))


@dataclass
class LayerPlan:
    """How many tokens a layer keeps, per batch row: K+V (``keep``, of which ``recent`` forced)
    and V only (``marginal``)."""

    keep: torch.Tensor
    recent: torch.Tensor
    marginal: torch.Tensor


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
        self.scores: torch.Tensor | None = None  # method statistics, (B, Hkv, L) float32
        self.state: dict[str, Any] = {}  # other per-layer method state
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
        if self.scores is not None:
            self.scores = self.scores[..., :keep]
        for name in POSITIONAL_STATE:
            value = self.state.get(name)
            if isinstance(value, torch.Tensor) and value.shape[-1] > keep:
                self.state[name] = value[..., :keep]
        self.length = keep

    def host_synchronize(self) -> None:
        """Wait until the host copies started so far have landed (CUDA; no-op elsewhere)."""
        if self._host_copied is not None:
            self._host_copied.synchronize()
            self._host_copied = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in ("keys", "values", "positions", "scores", "marginal_values"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.repeat_interleave(repeats, dim=0))
        for name in ("marginal_positions", "host_keys", "host_values"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.repeat_interleave(repeats, dim=0))
        for key, value in self.state.items():  # method statistics are (B, ...) tensors
            if isinstance(value, torch.Tensor):
                self.state[key] = value.repeat_interleave(repeats, dim=0)

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
        if self.scores is not None:
            self.scores = torch.nn.functional.pad(self.scores, (0, q))
        new_pos = self.q_pos.expand(b, h, q)
        plan = self.cache.plan_for(self)
        if plan is None:  # no compression (yet): a plain growing cache
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.positions = torch.cat([self.positions, new_pos], dim=-1)
        else:
            self._select(plan, key_states, value_states, old)
            self.compressed = True
        _PENDING.set(self)
        return self.keys, self.values

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
        keep = _kept(
            scores,
            plan.recent.to(self.device),
            plan.keep.to(self.device),
            _occupied(self.positions, self.length),
        )
        stays = keep.gather(2, self.positions.clamp(min=0)) & (self.positions >= 0)
        self.positions = torch.where(stays, self.positions, torch.full_like(self.positions, -1))

    def _host_append(self, k: torch.Tensor, v: torch.Tensor, old: int) -> None:
        # earlier copies (rows before `old`, which `_source` may read this step) have landed
        self.host_synchronize()
        need = old + k.shape[-2]
        if self.host_keys is None or self.host_keys.shape[-2] < need:
            cap = max(need + 256, need * 5 // 4)  # headroom: a prompt plus its decode
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
        b, h, q_new, _ = k_new.shape
        n = self.length
        assert self.positions is not None
        scores = method.token_scores(self.cache, self).float()  # (B, Hkv, L)
        alive = torch.ones(b, h, n, dtype=torch.bool, device=self.device)
        if not method.reversible:
            alive = _occupied(self.positions, n)
            alive[..., old:] = True
        # this call's tokens are always kept (a query must see itself), even over the budget
        n_recent = plan.recent.clamp(min=q_new).to(self.device)
        n_keep = torch.maximum(plan.keep.to(self.device), n_recent)
        # a token evicted for good (not reversible) stays out even inside the recent window,
        # which can reach back over evicted tokens after a crop
        keep_mask = _kept(scores, n_recent, n_keep, alive)
        if not self.compressed:
            self._gather_initial(keep_mask, k_new, v_new, old)
        else:
            self._refresh(keep_mask, k_new, v_new, old)
        if method.has_marginal:
            rest = scores.masked_fill(keep_mask | ~alive, float("-inf"))
            marginal_mask = _top_mask(rest, plan.marginal.to(self.device)) & alive
            self._refresh_marginal(marginal_mask, v_new, old)

    def _source(
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
        self.positions, self.keys, self.values = _refresh_slots(
            self, keep_mask, self.positions, [self.keys, self.values], k_new, v_new, old
        )

    def _refresh_marginal(self, mask: torch.Tensor, v_new: torch.Tensor, old: int) -> None:
        b, h, _, d = v_new.shape
        if self.marginal_positions is None or self.marginal_values is None:
            self.marginal_positions = torch.full(
                (b, h, 0), -1, dtype=torch.long, device=self.device
            )
            self.marginal_values = v_new.new_zeros(b, h, 0, d)
        self.marginal_positions, self.marginal_values = _refresh_slots(
            self, mask, self.marginal_positions, [self.marginal_values], None, v_new, old
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
        assert self.positions is not None
        if not self.compressed:
            method.observe_queries(self.cache, self, module, query, self.q_pos)
            rows = method.probability_rows(self.cache, self, self.q_pos)
            if rows is not None:
                _probs_in_chunks(
                    query,
                    key,
                    self.q_pos,
                    self.positions,
                    scaling,
                    rows,
                    lambda p, qp: method.observe(self.cache, self, p, qp, self.positions),
                )
            return sdpa_attention_forward(
                module, query, key, value, mask, scaling=scaling, **kwargs
            )
        probs = attention_probs(query, key, self.q_pos, self.positions, scaling)
        method.observe(self.cache, self, probs, self.q_pos, self.positions)
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


def _occupied(positions: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, H, length)`` mask of the tokens that the slots ``positions`` (-1 = empty) hold."""
    b, h, _ = positions.shape
    out = torch.zeros(b, h, length + 1, dtype=torch.bool, device=positions.device)
    out.scatter_(2, positions + 1, True)
    return out[..., 1:]


def _kept(
    scores: torch.Tensor, n_recent: torch.Tensor, n_keep: torch.Tensor, alive: torch.Tensor
) -> torch.Tensor:
    """``(B, H, L)`` mask of the tokens kept: the last ``n_recent[b]`` always, then the best
    scores up to ``n_keep[b]`` in all, never a token outside ``alive``."""
    n = scores.shape[-1]
    idx = torch.arange(n, device=scores.device)
    recent = idx >= (n - n_recent)[:, None, None]
    scores = scores.masked_fill(recent, float("inf")).masked_fill(~alive, float("-inf"))
    return _top_mask(scores, n_keep)


def _top_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``counts[b]`` highest-scoring tokens per (row, head); never -inf ones."""
    n = scores.shape[-1]
    k = int(min(n, int(counts.max()))) if counts.numel() else 0
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    top = torch.topk(scores, k, dim=-1)
    rank_ok = torch.arange(k, device=scores.device) < counts[:, None, None]
    ok = rank_ok & (top.values > float("-inf"))
    mask.scatter_(2, top.indices, ok)
    return mask


def _refresh_slots(
    layer: KVLayer,
    want: torch.Tensor,
    positions: torch.Tensor,
    stores: list[torch.Tensor],
    k_new: torch.Tensor | None,
    v_new: torch.Tensor,
    old: int,
) -> tuple[torch.Tensor, ...]:
    """Make the slots hold exactly the tokens in ``want`` (B, Hkv, L), moving as little as possible.

    Slots of tokens no longer wanted are freed; incoming tokens fill free slots (the slot store
    grows in blocks of 64 when needed). ``stores`` is ``[keys, values]`` or ``[values]``.
    """
    b, h, _ = want.shape
    valid = positions >= 0
    still = want.gather(2, positions.clamp(min=0)) & valid
    positions = torch.where(still, positions, torch.full_like(positions, -1))
    have = _occupied(positions, want.shape[-1])
    incoming = want & ~have
    n_in = incoming.sum(-1)
    m = int(n_in.max()) if n_in.numel() else 0
    if m == 0:
        return (positions, *stores)
    free = positions < 0
    short = int((n_in - free.sum(-1)).max())
    if short > 0:
        grow = 64 * math.ceil(short / 64)
        positions = torch.nn.functional.pad(positions, (0, grow), value=-1)
        stores = [torch.nn.functional.pad(s, (0, 0, 0, grow)) for s in stores]
        free = positions < 0
    in_tok = torch.topk(incoming.float(), m, dim=-1, sorted=True).indices
    in_ok = incoming.gather(2, in_tok)
    slot = torch.topk(free.float(), m, dim=-1, sorted=True).indices
    k_in, v_in = layer._source(in_tok, k_new if len(stores) == 2 else None, v_new, old)
    out = []
    sources = [k_in, v_in] if len(stores) == 2 else [v_in]
    # in place: the slot stores belong to this layer alone (`clone` deep-copies them), and an
    # out-of-place scatter copied every slot on every decode step
    for store, src in zip(stores, sources, strict=True):
        assert src is not None
        d = store.shape[-1]
        idx = slot[..., None].expand(b, h, m, d)
        cur = store.gather(2, idx)
        store.scatter_(2, idx, torch.where(in_ok[..., None], src.to(store.dtype), cur))
        out.append(store)
    cur_pos = positions.gather(2, slot)
    positions.scatter_(2, slot, torch.where(in_ok, in_tok, cur_pos))
    return (positions, *out)


class CompressedCache(Cache):
    """A transformers `Cache` that applies a KV method (see the module docstring for the budget).

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
        self.state: dict[str, Any] = {}  # method state shared by the layers (e.g. SmallKV's SRM)
        self.rollbacks = 0  # crops and resets that removed tokens (a benchmark counts them)
        # (conversation id, the token ids the cache holds) when a backend owns the cache: lets
        # SmallKV use the assistant backend's own attention over the same conversation
        self.conversation: tuple[str, list[int]] | None = None

    @property
    def is_croppable(self) -> bool:
        return True

    def reset(self) -> None:
        """Forget everything, the method's own state (SmallKV's SRM cache, head mapping) too."""
        if self.get_seq_length() > 0:
            self.rollbacks += 1
        self.layers = []
        self.prompt_length = None
        self.state.clear()

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
        assert self.keys_batch(layer) > 0
        budgets = self.row_budgets(self.keys_batch(layer))
        if self.budget_of == "context":
            allowance = torch.ceil(budgets * layer.length).long()
            decoded = 0
        else:
            p = self.prompt_length or 0
            allowance = torch.ceil(budgets * p).long() + (layer.length - p)
            decoded = layer.length - p
        if not layer.compressed and bool((allowance >= layer.length).all()):
            return None  # the whole context fits: stay exact
        return self.method.layout(allowance, layer.length, decoded)

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


# --------------------------------------------------------------------------------------------
# The method base class
# --------------------------------------------------------------------------------------------


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
    """

    budget: float = 0.2
    budget_of: BudgetOf | None = field(default=None, kw_only=True)
    reversible: ClassVar[bool] = False
    has_marginal: ClassVar[bool] = False
    _hooks: list[Any] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.budget = check_budget(self.budget)
        if self.budget_of is not None:
            check_budget_of(self.budget_of)

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


def accumulate_scores(layer: KVLayer, probs: torch.Tensor, k_pos: torch.Tensor) -> None:
    """Add attention mass received by each key (summed over query heads of a KV group and over
    queries) into ``layer.scores`` at the keys' original positions."""
    b, hkv = probs.shape[:2]
    mass = probs.sum(dim=(2, 3))  # (B, Hkv, S)
    if layer.scores is None or layer.scores.shape[-1] < layer.length:
        old = layer.scores
        layer.scores = torch.zeros(b, hkv, layer.length, device=probs.device)
        if old is not None:
            layer.scores[..., : old.shape[-1]] = old
    valid = k_pos >= 0
    layer.scores.scatter_add_(2, k_pos.clamp(min=0), mass.masked_fill(~valid, 0.0))
