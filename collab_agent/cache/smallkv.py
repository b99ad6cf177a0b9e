"""SmallKV: the large model's KV cache, chosen by the attention of a small model of its family."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from collab_agent.cache.attention import attention_probs, use_kv_attention
from collab_agent.cache.budget import CacheConfigError
from collab_agent.cache.compressed import CompressedCache
from collab_agent.cache.expected import expected_attention, observe_queries
from collab_agent.cache.layer import KVLayer
from collab_agent.cache.method import KVMethod, LayerPlan
from collab_agent.cache.observer import (
    ObservedCache,
    ObservedLayer,
    calibration_rows,
    calibration_start,
)

PRIOR_SINKS = 4
"""Initial tokens left out of the prior's query statistics (kvpress's ExpectedAttention default)."""

PRIOR_FUTURE = 512
"""Future positions the prior's RoPE rotation is averaged over (kvpress's default)."""


class ObservedConversation(Protocol):
    """The assistant's cache of one conversation: the token ids it holds and its KV cache."""

    tokens: list[int]
    kv: Any
    next_logits: Any


@runtime_checkable
class SharingAssistant(Protocol):
    """An assistant backend in this process that lets SmallKV read its own attention: its
    conversations' caches record attention (`ObservedCache`) once `record_attention` is called,
    and `observed_conversation` lends one conversation's cache under the backend's lock.
    `TransformersBackend` is one."""

    def record_attention(self, calibration_tokens: int, window: int) -> None: ...

    def observed_conversation(
        self, conversation_id: str
    ) -> AbstractContextManager[ObservedConversation]: ...


@dataclass
class AssistantState:
    """SmallKV's state of one `CompressedCache`, shared by its layers (``cache.state``).

    Fields
    ------
    srm : ObservedCache or None
        The assistant's attention-recording cache of the same tokens.
    srm_length : int or None
        Tokens of ``srm`` that the large model has read, when ``srm`` is the assistant
        backend's own cache (which may have read further); None for SmallKV's own SRM pass.
    mapping : (torch.Tensor, torch.Tensor) or None
        The SRM layer and head ``(L, H)`` of each LRM layer's query heads, once heads are matched.
    jaccard : torch.Tensor or None
        ``(L, H)`` the matched pairs' Jaccard similarity.
    stacked : dict
        SRM statistics stacked over its layers, by name: a memo of one step.
    pending, pending_positions : torch.Tensor or None
        ``(B, n)`` tokens the large model read between two refreshes (`KVMethod.refresh_every`)
        that SmallKV's own SRM pass has not read yet, and their positions when given: the SRM
        reads them in one call at the next refresh.
    """

    srm: ObservedCache | None = None
    srm_length: int | None = None
    mapping: tuple[torch.Tensor, torch.Tensor] | None = None
    jaccard: torch.Tensor | None = None
    stacked: dict[str, torch.Tensor | None] = field(default_factory=dict)
    pending: torch.Tensor | None = None
    pending_positions: torch.Tensor | None = None


def assistant_state(cache: CompressedCache) -> AssistantState:
    """The cache's `AssistantState`, made on first use."""
    if cache.state is None:
        cache.state = AssistantState()
    state: AssistantState = cache.state
    return state


def assistant_model(assistant: Any) -> nn.Module:
    """The torch model behind ``assistant``: a transformers model, or an object (a backend)
    exposing one as ``.model``."""
    model = assistant if hasattr(assistant, "config") else getattr(assistant, "model", None)
    if model is None or not hasattr(model, "config"):
        raise CacheConfigError(
            "assistant",
            f"must be a transformers causal LM or an object with a `.model` one, got {type(assistant).__name__}",
        )
    return model


@dataclass(kw_only=True)
class SmallKV(KVMethod):
    """SmallKV: small-model-assisted KV compression (Zhao, Peng, Nguyen et al., NeurIPS 2025).

    The small model (SRM) reads the *full* context alongside the large model (LRM):

    1. *attention matching* (section 3.2): once at least ``min_calibration_tokens`` have been
       seen, each LRM query head is mapped to the SRM head (any layer) whose top-``match_top``
       token set has the highest Jaccard similarity, the sets taken over every key from the
       attention of the last ``calibration_tokens`` queries (the recent text, so the sets
       represent the context rather than the chat template at its start); GQA: eviction is decided per LRM KV head from the mean of its
       query heads' mapped SRM scores;
    2. *saliency-shift compensation* (section 3.3): at every step the kept set is recomputed
       from the SRM's accumulated attention over all tokens; eviction is reversible (every
       token's LRM K/V stays in host memory and is brought back when it matters again);
    3. *marginal-token compensation* (section 3.4): the next most important tokens keep V only
       on the device; their attention weights are the mapped SRM head's.

    Beyond the paper (both on by default, chosen by `bench kv` on the bundled pair; the figures
    are in the README's KV section and ``benchmarks/results/kv_bundled_*.json``):
    ``keep_decoded`` compresses the prompt only, as kvpress does, and ``prior`` mixes the large
    model's own expected attention (Devoto et al. 2025) into the SRM's saliency.
    ``SmallKV(assistant=srm, **SmallKV.PAPER)`` is the paper's configuration.

    Parameters
    ----------
    assistant : transformers model or backend, required
        The SRM: a causal LM sharing the LRM's tokenizer (or an object with such a ``.model``).
    budget : float, default 0.2
        Share of the KV bytes kept on the device (V only counts half), of the whole context or
        of the prompt (``budget_of``, see `KVMethod`; a `TransformersBackend` uses the context).
    split : tuple[int, int, int], default (1, 0, 0)
        Budget shares critical : recent : marginal (the marginal share buys twice the tokens).
        The paper's is (2, 1, 2); with ``keep_decoded`` every decoded token is recent anyway.
        Marginal tokens did not pay with the other defaults (`bench kv`, variant
        ``smallkv_marginal``).
    calibration_tokens : int, default 128
        Queries whose attention matches the heads (paper: 100-200 tokens): the last ones read
        before the first compression.
    min_calibration_tokens : int, default 100
        Matching (and so compression) waits until this many tokens have been seen.
    match_top : float, default 0.2
        Share of the calibration tokens in each head's top set for the Jaccard similarity.
    score : "window" or "accumulated", default "window"
        What the SRM's attention ranks tokens by: ``accumulated`` sums each token's attention
        over all queries so far (the paper); ``window`` sums it over the last ``window`` queries
        only (the current saliency, as SnapKV's observation window, but recomputed every step)
        and pools it over ``kernel_size`` neighbouring tokens. ``window`` is the default, as
        `bench kv` on the bundled pair ranks the two (README, "Benchmarks").
    window : int, default 32
        Queries counted by ``score="window"``.
    kernel_size : int, default 5
        Pooling width of ``score="window"`` (odd).
    combine : "renormalised" or "paper", default "renormalised"
        ``paper``: O = O_critical + O_marginal (plain sum). ``renormalised``: the critical part
        is weighted by the SRM's mass on the critical tokens and both parts are renormalised to
        the SRM's mass on the kept tokens, so the weights sum to one.
    value_norm : bool, default True
        Weight each token's score by the norm of its LRM value vector (a token moves the output
        by its attention times its value, as kvpress's ExpectedAttention scores). On by default:
        it lowered KL at every budget on the bundled pair (`bench kv`).
    sinks : int, default 0
        The first ``sinks`` tokens are always kept (StreamingLLM's attention sinks).
    keep_decoded : bool, default True
        Under prompt accounting (``budget_of="prompt"``): keep every token decoded after the
        prompt was compressed, and compress the prompt only (as kvpress, SnapKV and
        ExpectedAttention do); the split then divides the prompt's allowance. ``False``, and
        always under whole-context accounting: decoded tokens compete with the prompt's at every
        step (the paper).
    prior : float, default 0.5
        Weight of the large model's own expected attention over the prompt (`expected.py`: the
        prompt queries' statistics, computed once when the prompt is compressed) against the
        SRM's current saliency: each token's score is ``prior * expected + (1 - prior) * srm``,
        both as shares of one; decoded tokens have no prior and use the SRM's share alone.
    refresh_every : int, default 1 (keyword only)
        As `KVMethod`: choose the kept tokens every this many decoded tokens. Without a marginal
        share the SRM then also reads the large model's tokens only at a refresh, all those
        since the last one in one call (a decode step of one token costs about as much as one
        of several, so its cost per token falls about ``refresh_every`` times).
    share_assistant_pass : bool, default True
        When the assistant is a backend of this process that shares its attention
        (`SharingAssistant`, e.g. the SRM's `TransformersBackend` in a TrigReason pair) and the
        large model's cache belongs to a backend conversation, the SRM's attention comes from
        the assistant's own cache of the same conversation: tokens the SRM has read already
        (the steps it wrote) are not run again, and tokens the LRM reads first (its own steps)
        are run once, into the SRM's cache, so the SRM's next call reuses them. Without a
        marginal share only (the marginal weights need the SRM rows of the LRM's very call);
        otherwise, and for a standalone cache, SmallKV runs its own SRM pass.
    """

    assistant: Any = None
    budget: float = 0.2
    split: tuple[int, int, int] = (1, 0, 0)
    calibration_tokens: int = 128
    min_calibration_tokens: int = 100
    match_top: float = 0.2
    score: Literal["window", "accumulated"] = "window"
    window: int = 32
    kernel_size: int = 5
    combine: Literal["renormalised", "paper"] = "renormalised"
    value_norm: bool = True
    sinks: int = 0
    keep_decoded: bool = True
    prior: float = 0.5
    share_assistant_pass: bool = True

    PAPER: ClassVar[dict[str, Any]] = {
        "split": (2, 1, 2),
        "keep_decoded": False,
        "budget_of": "context",
        "prior": 0.0,
        "score": "accumulated",
        "value_norm": False,
        "combine": "paper",
    }
    """The paper's configuration: ``SmallKV(assistant=srm, **SmallKV.PAPER)``: critical : recent :
    marginal = 2 : 1 : 2 of the whole context, tokens ranked by the SRM's accumulated attention
    alone, marginal output added as a plain sum."""

    reversible = True
    has_marginal = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.assistant is None:
            raise CacheConfigError(
                "assistant", "SmallKV needs the small model (SRM) that guides it"
            )
        self._srm = assistant_model(self.assistant)
        if (
            len(self.split) != 3
            or any(not isinstance(x, int) or x < 0 for x in self.split)
            or sum(self.split[:2]) == 0
        ):
            raise CacheConfigError(
                "split",
                f"must be three integers >= 0 (critical, recent, marginal), got {self.split!r}",
            )
        if self.calibration_tokens < 1:
            raise CacheConfigError(
                "calibration_tokens", f"must be >= 1, got {self.calibration_tokens!r}"
            )
        if not self.min_calibration_tokens >= 1:
            raise CacheConfigError(
                "min_calibration_tokens", f"must be >= 1, got {self.min_calibration_tokens!r}"
            )
        if not 0 < self.match_top <= 1:
            raise CacheConfigError("match_top", f"must lie in (0, 1], got {self.match_top!r}")
        if self.score not in ("accumulated", "window"):
            raise CacheConfigError(
                "score", f"must be 'accumulated' or 'window', got {self.score!r}"
            )
        if self.window < 1:
            raise CacheConfigError("window", f"must be >= 1, got {self.window!r}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise CacheConfigError("kernel_size", f"must be odd and >= 1, got {self.kernel_size!r}")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise CacheConfigError("sinks", f"must be an integer >= 0, got {self.sinks!r}")
        if not 0 <= self.prior <= 1:
            raise CacheConfigError("prior", f"must lie in [0, 1], got {self.prior!r}")
        if self.combine not in ("renormalised", "paper"):
            raise CacheConfigError(
                "combine", f"must be 'renormalised' or 'paper', got {self.combine!r}"
            )

    # ---- wiring ------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> SmallKV:
        """Prepare ``model`` (the LRM): ``"collab_kv"`` attention on both models, and a forward
        pre-hook that runs the SRM on the same new tokens before each LRM call with a SmallKV
        cache, so ``model(...)`` and ``model.generate(...)`` work unchanged."""
        lrm_vocab = getattr(model.config, "vocab_size", None)
        srm_vocab = getattr(self._srm.config, "vocab_size", None)
        if lrm_vocab != srm_vocab:
            raise CacheConfigError(
                "assistant",
                f"vocabulary of {srm_vocab} tokens differs from the large model's {lrm_vocab}; "
                "SmallKV needs two models that share one tokenizer",
            )
        use_kv_attention(model)
        use_kv_attention(self._srm)
        if self._shares():
            self.assistant.record_attention(self.calibration_tokens, self.window)
        if not any(h[0] is model for h in self._hooks):
            handle = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
            self._hooks.append((model, handle))
        return self

    def detach(self) -> None:
        """Remove the forward hooks `attach` added."""
        for _, handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def shared_objects(self) -> list[Any]:
        return [self.assistant, self._srm]

    def _shares(self) -> bool:
        return (
            self.share_assistant_pass
            and self.split[2] == 0
            and isinstance(self.assistant, SharingAssistant)
        )

    def _before_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not isinstance(cache, CompressedCache) or cache.method is not self:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise CacheConfigError("input_ids", "SmallKV needs token ids (not inputs_embeds)")
        if self._between_refreshes(cache, ids.shape[-1]):
            self._defer(cache, ids, kwargs.get("position_ids"))
            return
        self.observe_tokens(cache, ids, kwargs.get("position_ids"))

    def _between_refreshes(self, cache: CompressedCache, tokens: int) -> bool:
        """Whether a call of ``tokens`` tokens only appends to every layer (no selection, so no
        SRM statistics are read); never with a marginal share, whose output needs the SRM's
        attention rows at every call."""
        if self.split[2] > 0 or not cache.layers:
            return False
        return all(layer.appends_only(tokens) for layer in cache.layers)

    def _defer(
        self, cache: CompressedCache, ids: torch.Tensor, position_ids: torch.Tensor | None
    ) -> None:
        """Leave ``ids`` for the SRM's next call. The shared pass needs nothing kept: the
        conversation's token list holds them, and the next call reads what the SRM lacks."""
        if cache.conversation is not None and ids.shape[0] == 1 and self._shares():
            return
        state = assistant_state(cache)
        first = state.pending is None
        state.pending = ids if state.pending is None else torch.cat([state.pending, ids], -1)
        if position_ids is None or (not first and state.pending_positions is None):
            state.pending_positions = None
        else:
            before = state.pending_positions
            state.pending_positions = (
                position_ids if before is None else torch.cat([before, position_ids], -1)
            )

    def _catch_up(self, cache: CompressedCache, length: int) -> None:
        """Let the SRM read what the large model read since the last refresh (to ``length``
        tokens), before its statistics are read outside a call (`KVLayer.compact`)."""
        state = assistant_state(cache)
        if state.srm_length is not None and cache.conversation is not None:
            if state.srm_length < length:
                self._observe_shared(cache, cache.conversation, [])
        elif state.pending is not None:
            pending, positions = state.pending, state.pending_positions
            state.pending = state.pending_positions = None
            self._run_srm(state, pending, positions)

    def observe_tokens(
        self,
        cache: CompressedCache,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> None:
        """Run the SRM over ``input_ids`` (the tokens the LRM is about to process) with its full,
        attention-recording cache. Called by the pre-hook; call it yourself if you drive the
        model's layers another way."""
        if cache.conversation is not None and input_ids.shape[0] == 1 and self._shares():
            self._observe_shared(cache, cache.conversation, input_ids[0].tolist())
            return
        state = assistant_state(cache)
        if state.pending is not None:  # read between refreshes: now, with this call's tokens
            pending = state.pending.to(input_ids.device)
            if position_ids is not None and state.pending_positions is not None:
                position_ids = torch.cat(
                    [state.pending_positions.to(position_ids.device), position_ids], -1
                )
            else:
                position_ids = None  # the SRM's cache gives the positions
            input_ids = torch.cat([pending, input_ids], -1)
            state.pending = state.pending_positions = None
        self._run_srm(state, input_ids, position_ids)

    def _run_srm(
        self, state: AssistantState, input_ids: torch.Tensor, position_ids: torch.Tensor | None
    ) -> None:
        """SmallKV's own SRM pass over ``input_ids``, into its attention-recording cache."""
        srm_cache = state.srm
        if srm_cache is None:
            srm_cache = ObservedCache(self.calibration_tokens, keep_last=True, window=self.window)
            state.srm = srm_cache
        use_kv_attention(self._srm)
        device = next(self._srm.parameters()).device
        # the base model: only the SRM's attention is used, so its LM head (a quarter of a
        # 0.5B Qwen's weights) is skipped
        base: Any = getattr(self._srm, "base_model", self._srm)
        with torch.no_grad():
            base(
                input_ids=input_ids.to(device),
                position_ids=None if position_ids is None else position_ids.to(device),
                cache=srm_cache,
                use_cache=True,
            )
        state.stacked.clear()

    def _observe_shared(
        self, cache: CompressedCache, conversation: tuple[str, list[int]], new: list[int]
    ) -> None:
        """Bring the assistant's own cache of the conversation to the LRM's tokens plus ``new``:
        crop it where the two differ, run the SRM on what it has not read, and let this cache
        read its statistics up to the LRM's length (the SRM may have read further)."""
        conversation_id, history = conversation
        target = [*history, *new]
        with self.assistant.observed_conversation(conversation_id) as entry:
            if not isinstance(entry.kv, ObservedCache):
                entry.kv = ObservedCache(
                    self.calibration_tokens, keep_last=True, window=self.window
                )
                entry.tokens.clear()
            same = _common_prefix(entry.tokens, target)
            if same < len(entry.tokens) and same < len(target):
                entry.kv.crop_to(same)
                del entry.tokens[same:]
                entry.next_logits = None
            if same < len(target):
                device = next(self._srm.parameters()).device
                ids = torch.tensor([target[same:]], dtype=torch.long, device=device)
                base: Any = getattr(self._srm, "base_model", self._srm)
                with torch.no_grad():
                    base(input_ids=ids, cache=entry.kv, use_cache=True)
                entry.tokens.extend(target[same:])
                entry.next_logits = None
            state = assistant_state(cache)
            state.srm = entry.kv
            state.srm_length = len(target)
        state.stacked.clear()

    def repeat_state(self, cache: CompressedCache, repeats: int) -> None:
        state = assistant_state(cache)
        if state.srm is not None:
            for layer in state.srm.layers:
                layer.batch_repeat_interleave(repeats)
        if state.pending is not None:
            state.pending = state.pending.repeat_interleave(repeats, dim=0)
        if state.pending_positions is not None:
            state.pending_positions = state.pending_positions.repeat_interleave(repeats, dim=0)
        state.stacked.clear()

    def crop_state(self, cache: CompressedCache, keep: int) -> None:
        """Cut the SRM's cache and statistics to the same ``keep`` tokens as the LRM's, so a
        rollback leaves both sides consistent; the head mapping stays (it is about the models)."""
        state = assistant_state(cache)
        if state.srm_length is not None:  # the assistant's own cache: aligned at the next call
            state.srm_length = min(state.srm_length, keep)
        elif state.srm is not None:
            read = state.srm.get_seq_length()  # the rest of the LRM's tokens are pending
            if keep <= read:
                state.srm.crop_to(keep)
                state.pending = state.pending_positions = None
            elif state.pending is not None:
                state.pending = state.pending[..., : keep - read]
                if state.pending_positions is not None:
                    state.pending_positions = state.pending_positions[..., : keep - read]
        state.stacked.clear()

    # ---- 1. attention matching ---------------------------------------------------------------

    def probability_rows(
        self, cache: CompressedCache, layer: KVLayer, q_pos: torch.Tensor
    ) -> slice | None:
        if assistant_state(cache).mapping is not None:
            return None
        return calibration_rows(q_pos.numel(), self.calibration_tokens)

    def observe(
        self,
        cache: CompressedCache,
        layer: KVLayer,
        probs: torch.Tensor,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
    ) -> None:
        if layer.compressed or assistant_state(cache).mapping is not None:
            return
        flat = probs.flatten(1, 2).sum(2).float()  # (B, H, S): these rows' attention per key
        if (
            int(q_pos[0])
            == layer.length
            - layer.q_pos.numel()
            + calibration_rows(layer.q_pos.numel(), self.calibration_tokens).start
        ):  # the call's first calibration chunk: start (or widen) the block
            layer.state.calibration = calibration_start(
                layer.state.calibration, layer.q_pos.numel(), self.calibration_tokens, flat
            )
        assert layer.state.calibration is not None
        layer.state.calibration += flat

    def ready(self, cache: CompressedCache, layer: KVLayer) -> bool:
        if assistant_state(cache).mapping is not None:
            return True
        seen = layer.length - layer.q_pos.numel()
        if seen < self.min_calibration_tokens:
            return False
        self.match_heads(cache)
        return True

    def match_heads(self, cache: CompressedCache) -> None:
        """Map each LRM query head to its most similar SRM head: Jaccard similarity of the
        top-``match_top`` key sets of the calibration block (the last ``calibration_tokens``
        queries' attention over every key seen, so the sets cover the whole context)."""
        state = assistant_state(cache)
        assert state.srm is not None
        blocks = [la.state.calibration for la in cache.layers]
        srm_blocks = [la.calibration for la in state.srm.layers]
        if any(b is None for b in blocks) or any(b is None for b in srm_blocks):
            raise RuntimeError("head matching needs the calibration block of every layer")
        tokens = min(b.shape[-1] for b in [*blocks, *srm_blocks] if b is not None)
        lrm = torch.stack([b[..., :tokens].mean(0) for b in blocks if b is not None])
        small = torch.stack([b[..., :tokens].mean(0) for b in srm_blocks if b is not None])
        n_l, h, _ = lrm.shape
        n_s, hs, _ = small.shape
        k = max(1, round(self.match_top * tokens))
        a = _top_sets(lrm.reshape(n_l * h, tokens), k)
        b = _top_sets(small.reshape(n_s * hs, tokens).to(a.device), k)
        inter = a @ b.T
        jaccard = inter / (2 * k - inter)
        best = jaccard.argmax(dim=1).reshape(n_l, h)
        state.mapping = (best // hs, best % hs)
        state.jaccard = jaccard.max(dim=1).values.reshape(n_l, h)
        for la in state.srm.layers:
            la.calibrating = False

    # ---- 2. SRM-guided, reversible eviction ----------------------------------------------------

    def layout(self, allowance: torch.Tensor, length: int, decoded: int = 0) -> LayerPlan:
        # with keep_decoded the split applies to the prompt's own allowance and every decoded
        # token is kept as one of the recent ones
        d = decoded if self.keep_decoded else 0
        crit, recent, marg = self.split
        total = crit + recent + marg
        a = (allowance - d).double()
        n_recent = (a * recent / total).floor().long() + d
        n_keep = (a * (crit + recent) / total).floor().long() + d
        n_marg = (2 * a * marg / total).floor().long().clamp(max=length - n_keep)
        fits = allowance >= length
        return LayerPlan(
            keep=torch.where(fits, torch.full_like(n_keep, length), n_keep),
            recent=torch.where(fits, torch.zeros_like(n_recent), n_recent),
            marginal=torch.where(fits, torch.zeros_like(n_marg), n_marg),
        )

    def _mapped(self, cache: CompressedCache, name: str) -> torch.Tensor | None:
        """SRM statistic ``name`` of every SRM layer, stacked ``(Ls, B, Hs, ...)`` (once a step)."""
        state = assistant_state(cache)
        if name not in state.stacked:
            assert state.srm is not None
            layers: list[ObservedLayer] = state.srm.layers
            values = [getattr(la, name) for la in layers]
            n = state.srm_length  # a shared SRM cache may have read further
            if n is not None:
                values = [None if v is None else v[..., :n] for v in values]
            state.stacked[name] = None if any(v is None for v in values) else torch.stack(values)
        return state.stacked[name]

    def _per_lrm_head(
        self, cache: CompressedCache, layer: KVLayer, name: str
    ) -> torch.Tensor | None:
        stacked = self._mapped(cache, name)
        if stacked is None:
            return None
        mapping = assistant_state(cache).mapping
        assert mapping is not None
        src_layer, src_head = mapping
        li = src_layer[layer.layer_idx].to(stacked.device)
        hi = src_head[layer.layer_idx].to(stacked.device)
        picked = stacked[li, :, hi]  # (H, B, ...)
        return picked.transpose(0, 1).to(layer.device)

    def token_scores(self, cache: CompressedCache, layer: KVLayer) -> torch.Tensor:
        self._catch_up(cache, layer.length)
        if self.score == "window":
            acc = self._per_lrm_head(cache, layer, "window_sum")  # (B, H, L)
        else:
            acc = self._per_lrm_head(cache, layer, "accumulated")  # (B, H, L)
        assert acc is not None and layer.keys is not None
        if acc.shape[-1] != layer.length:
            raise RuntimeError(
                f"the SRM has seen {acc.shape[-1]} tokens and the LRM {layer.length}; feed both "
                "the same tokens (the forward pre-hook of SmallKV.attach does) and crop or reset "
                "the cache only through CompressedCache.crop / reset, which cut both"
            )
        b, h, n = acc.shape
        hkv = layer.keys.shape[1]
        scores = acc.reshape(b, hkv, h // hkv, n).mean(2)
        if self.score == "window" and self.kernel_size > 1:
            scores = torch.nn.functional.avg_pool1d(
                scores.reshape(b * hkv, 1, n),
                self.kernel_size,
                stride=1,
                padding=self.kernel_size // 2,
                count_include_pad=False,
            ).reshape(b, hkv, n)
        if self.prior > 0:
            scores = self._with_prior(layer, scores)
        if self.value_norm:
            scores = scores * _value_norms(layer).to(scores.device, scores.dtype)
        if self.sinks:
            scores[..., : self.sinks] = float("inf")
        return scores

    def observe_queries(
        self,
        cache: CompressedCache,
        layer: KVLayer,
        module: nn.Module,
        query: torch.Tensor,
        q_pos: torch.Tensor,
    ) -> None:
        if self.prior > 0:
            observe_queries(layer, module, query, q_pos, PRIOR_SINKS)

    def _with_prior(self, layer: KVLayer, srm: torch.Tensor) -> torch.Tensor:
        """``prior * expected + (1 - prior) * srm`` over the prompt, shares of one per row."""
        expected = layer.state.expected
        if expected is None:  # first compression: the device still holds every prompt token
            assert layer.keys is not None
            expected = expected_attention(layer, layer.keys, layer.keys.shape[-2], PRIOR_FUTURE)
            layer.state.expected = expected
        share = srm / srm.sum(-1, keepdim=True).clamp(min=1e-12)
        p = expected.shape[-1]
        mixed = share.clone()
        mixed[..., :p] = self.prior * expected.to(share.device) + (1 - self.prior) * share[..., :p]
        return mixed

    # ---- 3. marginal tokens ----------------------------------------------------------------------

    def add_marginal(
        self, cache: CompressedCache, layer: KVLayer, probs: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        if layer.marginal_values is None or layer.marginal_positions is None:
            return out
        if layer.marginal_positions.shape[-1] == 0:  # no marginal share
            return out
        b, hkv, g, q, _ = out.shape
        last = self._per_lrm_head(cache, layer, "last")  # (B, H, q, L)
        if last is None or last.shape[2] != q:
            last = self._rows_from_queries(cache, layer, q)
        if last is None:
            return out
        assert layer.positions is not None
        w = last.reshape(b, hkv, g, q, -1)
        return marginal_output(
            w,
            out,
            layer.positions,
            layer.marginal_positions,
            layer.marginal_values,
            self.combine,
        )

    def _rows_from_queries(
        self, cache: CompressedCache, layer: KVLayer, q: int
    ) -> torch.Tensor | None:
        """The mapped SRM heads' attention rows ``(B, H, q, L)`` of the last call, recomputed from
        its queries (an SRM call longer than `LAST_ROWS` keeps those instead of the rows)."""
        state = assistant_state(cache)
        assert state.srm is not None and state.mapping is not None
        srm_layers: list[ObservedLayer] = state.srm.layers
        src_layer, src_head = state.mapping
        rows = []
        for li, hi in zip(
            src_layer[layer.layer_idx].tolist(), src_head[layer.layer_idx].tolist(), strict=True
        ):
            sl = srm_layers[li]
            if sl.last_query is None or sl.last_q_pos is None or sl.keys is None:
                return None
            if sl.last_query.shape[2] != q:  # the SRM's last call was not this one
                return None
            group = sl.last_query.shape[1] // sl.keys.shape[1]
            keys = sl.keys[:, hi // group : hi // group + 1]
            n = keys.shape[-2]
            k_pos = torch.arange(n, device=keys.device).expand(keys.shape[0], 1, n)
            probs = attention_probs(
                sl.last_query[:, hi : hi + 1], keys, sl.last_q_pos, k_pos, sl.scaling
            )
            rows.append(probs[:, 0, 0])  # (B, q, L)
        return torch.stack(rows, dim=1).to(layer.device)


def marginal_output(
    srm_weights: torch.Tensor,
    critical_out: torch.Tensor,
    positions: torch.Tensor,
    marginal_positions: torch.Tensor,
    marginal_values: torch.Tensor,
    mode: str,
) -> torch.Tensor:
    """Combine the critical attention output with the marginal tokens' V weighted by the SRM.

    srm_weights ``(B, Hkv, G, q, L)`` are the mapped SRM heads' attention over all tokens;
    critical_out ``(B, Hkv, G, q, D)``; positions / marginal_positions ``(B, Hkv, S|M)``
    (-1 = empty slot); marginal_values ``(B, Hkv, M, D)``.
    """
    b, hkv, g, q, _ = srm_weights.shape

    def gather(pos: torch.Tensor) -> torch.Tensor:
        idx = pos.clamp(min=0)[:, :, None, None, :].expand(b, hkv, g, q, pos.shape[-1])
        w = srm_weights.gather(-1, idx)
        return w.masked_fill((pos < 0)[:, :, None, None, :], 0.0)

    w_marg = gather(marginal_positions)
    o_marg = torch.matmul(w_marg.to(marginal_values.dtype), marginal_values.unsqueeze(2))
    if mode == "paper":
        return critical_out + o_marg
    c = gather(positions).sum(-1, keepdim=True)
    m = w_marg.sum(-1, keepdim=True)
    total = (c + m).clamp(min=1e-9)
    return (c / total).to(critical_out.dtype) * critical_out + o_marg / total.to(o_marg.dtype)


def _value_norms(layer: KVLayer) -> torch.Tensor:
    """``(B, Hkv, L)`` norms of every token's LRM value vector. The norms of earlier tokens are
    kept in the layer's state; this call's tokens are read on the device (their host copy may
    still be in flight) and any others from the host copy after `KVLayer.host_synchronize`."""
    assert layer.host_values is not None and layer.incoming is not None
    norms = layer.state.value_norms
    have = 0 if norms is None else norms.shape[-1]
    old = layer.length - layer.incoming.shape[-2]
    parts = [] if norms is None else [norms.to(layer.device)]
    if have < old:
        layer.host_synchronize()
        host = layer.host_values[..., have:old, :].to(layer.device, torch.float32)
        parts.append(host.norm(dim=-1))
    if have < layer.length:
        parts.append(layer.incoming[..., max(0, have - old) :, :].float().norm(dim=-1))
        norms = torch.cat(parts, dim=-1)
        layer.state.value_norms = norms
    assert norms is not None
    return norms[..., : layer.length]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _top_sets(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of ``scores`` as 0/1 float indicator vectors of their top-``k`` entries."""
    out = torch.zeros_like(scores, dtype=torch.float32)
    out.scatter_(1, torch.topk(scores.float(), k, dim=1).indices, 1.0)
    return out
