"""Continuous batching of many conversations' decode steps on one local transformers model.

`TransformersBackend` (local.py) runs one generation at a time. `BatchedTransformersBackend`
keeps its per-conversation prefix caches, chat rendering, stop strings and logprobs, but runs the
decode steps of all conversations in flight as one forward pass, the way vLLM and TGI serve many
requests (continuous batching at step granularity, Yu et al., OSDI 2022 "Orca"):

- a request that arrives while the batch runs is prefilled (reusing its conversation's cached
  prefix; requests arriving together are prefilled in one forward) and joins the batch at the
  next step; a finished sequence leaves at once;
- the rows' KV caches are stacked along the batch dimension, left-padded to a common length,
  with an attention mask and explicit position ids per row, so every row computes what it
  would compute alone; a leaving row's cache is cut back out (padding dropped) and kept as the
  conversation's prefix cache for its next request;
- a cancelled caller's row leaves at the next step; the other rows never notice;
- at most ``max_batch_size`` rows hold a KV cache in the batch; further requests wait (FIFO,
  bounded by ``max_waiting``), and idle caches are bounded by the LRU store of local.py, so
  1,000 concurrent callers never load 1,000 caches.

On CPU, batching pays because a decode step is dominated by reading the weights, which the rows
share. Greedy texts are the same batched and alone up to floating-point near-ties: in float32 the
tiny test models match exactly; in bfloat16 a different batch shape can flip a near-tied token
(as on any batching server, vLLM and llama.cpp included). With ``large_batch_dtype`` (the CPU
default of `from_pretrained`: bf16 alone, float32 from two rows) a conversation is computed in
the dtype of the batch it is in, so its text follows that dtype's rounding.

There is no extra thread: the caller whose request waits drives the batch, one step at a time in
a worker thread (`anyio.to_thread.run_sync`); when it leaves, another waiting caller takes over.

`stream` hands out each row's text as the batch decodes it: the worker takes the row's deltas from
its `SequenceDecoder` into a thread-safe deque on the row (the decoder is only ever touched by the
worker), and the caller drains that deque on the event loop. A streaming caller drives the batch
only until its own row has new text, so while its consumer is busy with a delta another free
caller drives and the other rows go on.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from collab_agent import _checks
from collab_agent._hf import IMPORT_LOCK
from collab_agent.backends.base import GenerateRequest, Generation
from collab_agent.backends.decoding import SequenceDecoder, seeded_generator
from collab_agent.backends.local import ConversationCache, TransformersBackend
from collab_agent.errors import BackendError, CapabilityError, OverloadedError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(eq=False)
class _Row:
    """One request in flight: waiting, in the batch, or finished."""

    request: GenerateRequest
    started: float
    entry: ConversationCache | None = None
    prompt: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    decoder: SequenceDecoder | None = None  # the generated tokens, their text and logprobs
    pending: int = -1  # sampled, not yet forwarded
    last_logits: Any = None  # logits after the last forwarded token
    cancelled: bool = False  # set by the caller's task, read by the worker between steps
    deltas: deque[str] | None = None  # a streaming row's text deltas: the worker appends
    result: Generation | None = None
    error: BaseException | None = None
    wake: anyio.Event | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    @property
    def ready(self) -> bool:
        """Done, or holding text deltas its streaming caller has not taken."""
        return self.done or bool(self.deltas)


class _PaddedBatch:
    """The rows' KV caches stacked on the batch dimension, left-padded to one length.

    Row ``i`` holds its real tokens in the last ``mask[i].sum()`` columns; the padding columns
    are zeros that the attention mask hides.
    """

    def __init__(self, make_cache: Any) -> None:
        self.rows: list[_Row] = []
        self.cache: Any = None  # a DynamicCache of shape [rows, heads, length, head_dim]
        self.mask: torch.Tensor | None = None  # [rows, length], 1 for real tokens
        self._make_cache = make_cache

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def add(self, row: _Row, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Append a row whose cache is ``kv`` (per layer, ``[1, heads, n, head_dim]``)."""
        import torch
        import torch.nn.functional as F

        n = int(kv[0][0].shape[2])
        if self.cache is None or self.mask is None:
            self.cache = self._make_cache(kv)
            self.mask = torch.ones(1, n, dtype=torch.long, device=kv[0][0].device)
            self.rows.append(row)
            return
        length = self.length
        if n > length:  # pad the batch on the left
            grow = n - length
            for layer in self.cache.layers:
                layer.keys = F.pad(layer.keys, (0, 0, grow, 0))
                layer.values = F.pad(layer.values, (0, 0, grow, 0))
            self.mask = F.pad(self.mask, (grow, 0))
            length = n
        for layer, (k, v) in zip(self.cache.layers, kv, strict=True):
            k, v = k.to(layer.keys.dtype), v.to(layer.values.dtype)
            layer.keys = torch.cat([layer.keys, F.pad(k, (0, 0, length - n, 0))])
            layer.values = torch.cat([layer.values, F.pad(v, (0, 0, length - n, 0))])
        row_mask = torch.zeros(1, length, dtype=self.mask.dtype, device=self.mask.device)
        row_mask[:, length - n :] = 1
        self.mask = torch.cat([self.mask, row_mask])
        self.rows.append(row)

    def row_kv(self, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row ``index``'s cache without padding (views; copy before the batch changes)."""
        assert self.mask is not None
        n = int(self.mask[index].sum())
        return [
            (layer.keys[index : index + 1, :, -n:], layer.values[index : index + 1, :, -n:])
            for layer in self.cache.layers
        ]

    def keep(self, indices: list[int]) -> None:
        """Keep only rows ``indices``, dropping padding columns no row needs any more."""
        import torch

        if not indices:
            self.rows, self.cache, self.mask = [], None, None
            return
        assert self.mask is not None
        if len(indices) < len(self.rows):
            select = torch.tensor(indices, device=self.mask.device)
            self.cache.batch_select_indices(select)
            self.mask = self.mask[select]
            self.rows = [self.rows[i] for i in indices]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start > 0:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, start:].contiguous()
                layer.values = layer.values[:, :, start:].contiguous()
            self.mask = self.mask[:, start:]


class BatchedTransformersBackend(TransformersBackend):
    """`TransformersBackend` with the decode steps of concurrent conversations batched.

    Same outputs as `TransformersBackend` (text, stop reasons, logprobs, token counts, prefix
    reuse, `score`, `release`, the ``on_generation`` observer, called as each row finishes), many
    conversations at once: requests arriving while a batch runs join it at the next step
    (continuous batching). See the module docstring for the scheme.

    Args:
        model: a transformers causal LM with full-attention layers (Qwen2, Llama, ...).
        tokenizer: its tokenizer, with a chat template.
        max_batch_size: most requests decoded together, each holding a KV cache (default 16).
        batch_window_s: how long the first request of an idle batch waits for others to arrive
            (default 5 ms).
        max_waiting: most requests waiting for a batch slot; one more raises `OverloadedError`
            (default ``None``: unbounded; waiting requests hold no cache).
        prefill_tokens: most tokens (rows x longest new part) prefilled in one forward when
            several requests join at once (default 2048); a longer prompt is prefilled alone.
        decode_slice_s: how long the worker thread may go on decoding while nothing changes (no
            row finished, no request waiting, no caller gone) before it returns to the event
            loop (default 0.1 s): fewer thread hops when steps are fast (GPUs, tiny models).
        large_batch_dtype: a second compute dtype for forwards over ``large_batch_from`` rows
            or more (default ``None``: one dtype). The model is copied once in it and the rows'
            KV caches are cast when the batch crosses the line. On CPUs without native bf16
            matrix units bf16 is the faster dtype alone (half the bytes read per step) but does
            not scale with the batch, float32 does (see `cpu_batch_dtypes`).
        large_batch_from: the batch size from which ``large_batch_dtype`` computes (default 2).
        **options: those of `TransformersBackend` (``name``, ``device``,
            ``max_cached_conversations``, ``max_cache_bytes``): the idle caches kept between
            requests.

    Attributes:
        peak_batch_size: the most rows ever decoded in one step.
        decode_steps: batched decode forward passes run so far.
        prefill_passes: prefill forward passes run so far (one per group of joining requests).
        large_batch_steps: decode steps run in ``large_batch_dtype``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int = 16,
        batch_window_s: float = 0.005,
        max_waiting: int | None = None,
        prefill_tokens: int = 2048,
        decode_slice_s: float = 0.1,
        large_batch_dtype: torch.dtype | None = None,
        large_batch_from: int = 2,
        **options: Any,
    ) -> None:
        _checks.positive_int("max_batch_size", max_batch_size)
        _checks.positive_int("prefill_tokens", prefill_tokens)
        _checks.positive_int("large_batch_from", large_batch_from)
        _checks.in_range("batch_window_s", batch_window_s, 0.0, 10.0)
        _checks.in_range("decode_slice_s", decode_slice_s, 0.0, 10.0)
        if max_waiting is not None:
            _checks.non_negative_int("max_waiting", max_waiting)
        options.setdefault("max_cached_conversations", max(8, max_batch_size))
        super().__init__(model, tokenizer, **options)
        self.max_batch_size = max_batch_size
        self.batch_window_s = float(batch_window_s)
        self.max_waiting = max_waiting
        self.prefill_tokens = prefill_tokens
        self.decode_slice_s = float(decode_slice_s)
        self.peak_batch_size = 0
        self.decode_steps = 0
        self.prefill_passes = 0
        self.large_batch_steps = 0
        self.large_batch_from = large_batch_from
        self._large_model: PreTrainedModel | None = None
        if large_batch_dtype is not None and large_batch_dtype != self.model.dtype:
            import copy

            self._large_model = copy.deepcopy(self.model).to(large_batch_dtype).eval()
        self._check_full_attention()
        self._batch = _PaddedBatch(self._cache_from)
        self._waiting: deque[_Row] = deque()
        self._finished: list[_Row] = []
        self._driving = False

    def _check_full_attention(self) -> None:
        with IMPORT_LOCK:
            from transformers.cache_utils import DynamicLayer

        layers = getattr(self._new_cache(), "layers", [])
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            raise CapabilityError(
                f"{self.name}: batching needs a model whose cache layers are all full attention "
                "(DynamicLayer); use TransformersBackend for sliding-window or hybrid models"
            )

    def _cache_from(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        with IMPORT_LOCK:
            from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=kv, config=self.model.config)

    def _model_for(self, rows: int) -> PreTrainedModel:
        """The model copy that computes a forward over ``rows`` rows."""
        if self._large_model is not None and rows >= self.large_batch_from:
            return self._large_model
        return self.model

    def _checkout(self, request: GenerateRequest, prompt: Any, at_most: int | None) -> Any:
        entry, reused = super()._checkout(request, prompt, at_most)
        _cast_cache(entry.kv, self.model.dtype)  # it may have left a batch in the other dtype
        return entry, reused

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, dtype: Any = "auto", device: Any = None, **options: Any
    ) -> TransformersBackend:
        """`TransformersBackend.from_pretrained` with the compute dtype per batch size of
        `cpu_batch_dtypes` (``"auto"`` on CPU: bf16 alone, float32 from two rows); an explicit
        ``dtype`` or ``large_batch_dtype`` wins."""
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        base, large = cpu_batch_dtypes(dtype, str(device))
        options.setdefault("large_batch_dtype", large)
        return super().from_pretrained(name_or_path, dtype=base, device=device, **options)

    # ------------------------------------------------------------------ public API
    @property
    def batch_size(self) -> int:
        """Rows in the batch now."""
        return len(self._batch.rows)

    @property
    def waiting(self) -> int:
        """Requests waiting for a batch slot now."""
        return len(self._waiting)

    async def generate(self, request: GenerateRequest) -> Generation:
        """Continue ``request.reasoning`` in the shared batch until a stop string, end of turn
        or ``max_tokens``; cancelling the caller removes its row at the next step.

        Raises:
            OverloadedError: ``max_waiting`` requests already wait for a slot.
            BackendError: the backend is closed, or the forward pass failed.
        """
        row = self._enqueue(request, streaming=False)
        try:
            while not row.done:
                await self._wait_or_drive(row)
        except BaseException:
            await self._abandon(row)
            raise
        if row.error is not None:
            raise row.error
        assert row.result is not None
        return row.result

    async def stream(self, request: GenerateRequest) -> AsyncIterator[str | Generation]:
        """`generate`, handing out text deltas as the batch decodes them, then the `Generation`.

        The deltas come per decode slice (up to ``decode_slice_s`` of steps, each token its own
        delta) and join to the generation's text; a tail that could start a stop string is
        held back, so no delta shows any of a stop string. While the consumer handles a delta
        another caller drives the batch, so a slow consumer stalls no other row. Closing or
        cancelling the iteration removes the row at the next step, as a cancelled `generate`.

        Raises:
            OverloadedError: ``max_waiting`` requests already wait for a slot.
            BackendError: the backend is closed, or the forward pass failed (raised after the
                deltas decoded before the failure).
        """
        row = self._enqueue(request, streaming=True)
        assert row.deltas is not None
        shown = ""
        try:
            while True:
                finished = row.done  # read first: every delta of a done row is in the deque
                while row.deltas:
                    delta = row.deltas.popleft()
                    shown += delta
                    yield delta
                if finished:
                    break
                await self._wait_or_drive(row)
        except BaseException:
            await self._abandon(row)
            raise
        if row.error is not None:
            raise row.error
        result = row.result
        assert result is not None
        if len(result.text) > len(shown) and result.text.startswith(shown):
            yield result.text[len(shown) :]  # the tail held back until the sequence ended
        yield result

    def _enqueue(self, request: GenerateRequest, *, streaming: bool) -> _Row:
        """A new row at the back of the waiting queue."""
        if self._closed:
            raise BackendError(f"backend {self.name!r} is closed")
        if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
            raise OverloadedError(
                f"{self.name}: {len(self._waiting)} requests already wait for a batch slot "
                f"(max_waiting={self.max_waiting}, max_batch_size={self.max_batch_size})"
            )
        row = _Row(request, time.perf_counter(), deltas=deque() if streaming else None)
        self._waiting.append(row)
        return row

    async def _wait_or_drive(self, row: _Row) -> None:
        """Drive the batch until ``row`` is ready if nobody drives, else wait to be woken."""
        if not self._driving:
            await self._drive(row)
        else:
            row.wake = anyio.Event()
            await row.wake.wait()

    async def _abandon(self, row: _Row) -> None:
        """The caller of ``row`` went away: its row leaves (now, when nobody else drives)."""
        row.cancelled = True
        if row in self._waiting:
            self._waiting.remove(row)
        if not self._driving and any(r.cancelled for r in self._batch.rows):
            with anyio.CancelScope(shield=True):  # nobody else may drive: free it now
                await anyio.to_thread.run_sync(self._drop_cancelled_sync)

    # ------------------------------------------------------------------ the driver
    async def _drive(self, own: _Row) -> None:
        """Run batch steps until ``own`` is done (or, streaming, has new text); then let another
        waiting caller drive."""
        self._driving = True
        try:
            if not self._batch.rows and self.batch_window_s > 0:
                await anyio.sleep(self.batch_window_s)  # let simultaneous requests arrive
            while not own.ready:
                joining = self._admit()
                await anyio.to_thread.run_sync(self._step_sync, joining, limiter=self._limiter())
                self._deliver()
        finally:
            self._driving = False
            self._deliver()
            live = [r for r in [*self._batch.rows, *self._waiting] if not r.cancelled]
            for row in live:
                if row.wake is not None:
                    row.wake.set()
            if not live and self._batch.rows:  # only cancelled rows left: nobody will drive
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._drop_cancelled_sync)

    def _admit(self) -> list[_Row]:
        """Waiting requests that fit in the batch, first come first served."""
        joining: list[_Row] = []
        while self._waiting and len(self._batch.rows) + len(joining) < self.max_batch_size:
            row = self._waiting.popleft()
            if not row.cancelled:
                joining.append(row)
        return joining

    def _deliver(self) -> None:
        """Wake the callers of finished rows and of streaming rows with new text."""
        finished, self._finished = self._finished, []
        for row in [*finished, *(r for r in self._batch.rows if r.deltas)]:
            if row.wake is not None:
                row.wake.set()

    # ------------------------------------------------------------------ one step (worker thread)
    def _step_sync(self, joining: list[_Row]) -> None:
        """Drop cancelled rows, prefill and add the joining ones, then decode a token for
        every row, step after step while nothing changes (within ``decode_slice_s``).

        A failing prompt fails its own row only; a failing batched forward fails the rows in
        the batch (their caches are dropped) and the backend goes on serving.
        """
        import torch

        with self._lock, torch.inference_mode():
            try:
                self._leave([i for i, r in enumerate(self._batch.rows) if r.cancelled])
                self._join(joining)
                until = time.perf_counter() + self.decode_slice_s
                while self._batch.rows:
                    self._decode_step()
                    self._leave(
                        [i for i, r in enumerate(self._batch.rows) if r.done or r.cancelled]
                    )
                    # back to the event loop when a row finished, a request waits, a caller
                    # went away or the slice is over; else decode on without a thread hop
                    if (
                        self._finished
                        or (self._waiting and len(self._batch.rows) < self.max_batch_size)
                        or time.perf_counter() >= until
                        or any(r.cancelled for r in self._batch.rows)
                    ):
                        break
            except Exception as exc:
                for row in [*self._batch.rows, *joining]:
                    if not row.done:
                        self._fail(row, exc)
                self._batch.keep([])

    def _join(self, joining: list[_Row]) -> None:
        """Check out the joining rows' caches, prefill their new tokens (several rows in one
        forward, within ``prefill_tokens``), sample their first tokens and add them to the
        batch unless already done. A failing prompt fails its own row (or prefill group)."""
        ready: list[tuple[_Row, list[int]]] = []
        for row in joining:
            try:
                new_ids = self._checkout_row(row)
            except Exception as exc:
                self._fail(row, exc)
                continue
            if new_ids:
                ready.append((row, new_ids))
            else:  # the whole prompt is cached with its next logits: no forward
                assert row.entry is not None
                self._first_token(row, row.entry.next_logits)
        group: list[tuple[_Row, list[int]]] = []
        for item in ready:
            longest = max(len(ids) for _, ids in [*group, item])
            if group and (len(group) + 1) * longest > self.prefill_tokens:
                self._prefill_group(group)
                group = []
            group.append(item)
        if group:
            self._prefill_group(group)

    def _checkout_row(self, row: _Row) -> list[int]:
        """Tokenise the request and check out its conversation's cache; the ids to prefill."""
        request = row.request
        prompt = self.prompt_ids(request)
        entry, reused = self._checkout(request, prompt, None)
        row.entry, row.prompt, row.cached_tokens = entry, prompt, reused
        row.decoder = SequenceDecoder(
            request,
            self.tokenizer,
            self.eos_token_ids,
            seeded_generator(request.sampling, self.device),
        )
        if reused == len(prompt) and entry.next_logits is not None:
            return []
        return prompt[reused:]

    def _prefill_group(self, group: list[tuple[_Row, list[int]]]) -> None:
        """Prefill ``group`` in one forward (alone when it holds one row)."""
        self.prefill_passes += 1
        try:
            if len(group) == 1:
                row, new_ids = group[0]
                assert row.entry is not None
                logits = [self._forward(row.entry, new_ids)[-1]]
            else:
                logits = self._prefill_together(group)
        except Exception as exc:
            for row, _ in group:
                self._fail(row, exc)
            return
        for (row, _), row_logits in zip(group, logits, strict=True):
            self._first_token(row, row_logits)

    def _prefill_together(self, group: list[tuple[_Row, list[int]]]) -> list[torch.Tensor]:
        """One forward over several rows: each row's cache left-padded to the longest, its new
        tokens right after it and right-padded (so every query sees at least one real key);
        each row's cache is then cut back out without padding."""
        import torch
        import torch.nn.functional as F

        entries = [row.entry for row, _ in group]
        assert all(e is not None for e in entries)
        cached = [len(e.tokens) for e in entries if e is not None]
        news = [len(ids) for _, ids in group]
        width, steps = max(cached), max(news)
        device = self.device
        if width > 0:
            shape = next(e.kv for e in entries if e is not None and len(e.tokens)).layers
            stacked = []
            for index, template in enumerate(shape):
                keys, values = [], []
                for e, c in zip(entries, cached, strict=True):
                    assert e is not None
                    if c:
                        layer = e.kv.layers[index]
                        keys.append(F.pad(layer.keys, (0, 0, width - c, 0)))
                        values.append(F.pad(layer.values, (0, 0, width - c, 0)))
                    else:
                        keys.append(
                            template.keys.new_zeros(
                                *template.keys.shape[:2], width, template.keys.shape[3]
                            )
                        )
                        values.append(
                            template.values.new_zeros(
                                *template.values.shape[:2], width, template.values.shape[3]
                            )
                        )
                stacked.append((torch.cat(keys), torch.cat(values)))
            cache = self._cache_from(stacked)
        else:
            cache = self._new_cache()
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(group), steps), 0 if pad is None else pad, dtype=torch.long)
        mask = torch.zeros(len(group), width + steps, dtype=torch.long)
        positions = torch.zeros(len(group), steps, dtype=torch.long)
        for i, ((_, ids), c) in enumerate(zip(group, cached, strict=True)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, width - c : width + len(ids)] = 1
            positions[i] = torch.arange(c, c + steps)
        last = torch.tensor([[n - 1] for n in news], device=device)
        model = self._model_for(len(group))
        _cast_cache(cache, model.dtype)
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            logits_to_keep=last,
            **{self._cache_arg: cache},
        )
        self.processed_tokens += sum(news)
        logits = out.logits[:, -1].float()
        result = []
        for i, ((_, ids), c, e) in enumerate(zip(group, cached, entries, strict=True)):
            assert e is not None
            e.kv = self._cache_from(
                [
                    (
                        layer.keys[i : i + 1, :, width - c : width + len(ids)],
                        layer.values[i : i + 1, :, width - c : width + len(ids)],
                    )
                    for layer in cache.layers
                ]
            )
            e.tokens.extend(ids)
            e.next_logits = logits[i]
            result.append(logits[i])
        return result

    def _first_token(self, row: _Row, logits: torch.Tensor | None) -> None:
        """Sample the row's first token; add the row to the batch unless it is done."""
        import torch

        assert row.entry is not None and logits is not None
        row.last_logits = logits
        try:
            self._advance(row, logits, torch.log_softmax(logits, dim=-1))
        except Exception as exc:
            self._fail(row, exc)
            return
        if row.done:
            self._store_entry(row)
            return
        self._batch.add(row, [(layer.keys, layer.values) for layer in row.entry.kv.layers])
        row.entry.kv = None  # the batch holds the only copy now

    def _drop_cancelled_sync(self) -> None:
        with self._lock:
            self._leave([i for i, r in enumerate(self._batch.rows) if r.cancelled])

    def _decode_step(self) -> None:
        """One forward pass over every row's pending token."""
        import torch

        batch = self._batch
        assert batch.mask is not None
        rows = batch.rows
        device = batch.mask.device
        input_ids = torch.tensor([[r.pending] for r in rows], dtype=torch.long, device=device)
        positions = torch.tensor([[len(r.entry.tokens)] for r in rows], device=device)  # type: ignore[union-attr]
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], dim=1)
        model = self._model_for(len(rows))
        _cast_cache(batch.cache, model.dtype)
        if model is not self.model:
            self.large_batch_steps += 1
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: batch.cache},
        )
        batch.mask = mask
        self.decode_steps += 1
        self.processed_tokens += len(rows)
        self.peak_batch_size = max(self.peak_batch_size, len(rows))
        logits = out.logits[:, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for i, row in enumerate(rows):
            assert row.entry is not None
            row.entry.tokens.append(row.pending)
            row.last_logits = logits[i]
            if row.cancelled:
                continue
            self._advance(row, logits[i], logprobs[i])

    def _advance(self, row: _Row, logits: torch.Tensor, logprobs: torch.Tensor) -> None:
        """Sample the row's next token with its `SequenceDecoder` (the same rules as
        `TransformersBackend`); finish the row when its sequence ended."""
        assert row.decoder is not None
        token = row.decoder.advance(logits, logprobs)
        if row.deltas is not None:  # before `_finish`: a done row's deltas are all in the deque
            delta = row.decoder.take_delta()
            if delta:
                row.deltas.append(delta)
        if token is None:
            self._finish(row)
        else:
            row.pending = token

    def _finish(self, row: _Row) -> None:
        assert row.decoder is not None
        row.result = row.decoder.generation(
            prompt_tokens=len(row.prompt),
            cached_tokens=row.cached_tokens,
            seconds=time.perf_counter() - row.started,
        )
        if self.on_generation is not None:
            self.on_generation(row.request, row.prompt, row.decoder.sampled)
        self._finished.append(row)

    def _fail(self, row: _Row, exc: Exception) -> None:
        if isinstance(exc, BackendError):
            row.error = exc
        else:
            row.error = BackendError(f"{self.name}: generation failed: {exc}")
            row.error.__cause__ = exc
        row.entry = None  # its cache may be inconsistent: drop it
        self._finished.append(row)

    def _leave(self, indices: list[int]) -> None:
        """Take rows out of the batch and keep their caches as their conversations' caches."""
        if not indices:
            return
        for i in indices:
            row = self._batch.rows[i]
            if row.entry is not None:
                row.entry.kv = self._cache_from(self._batch.row_kv(i))  # copies the tensors
            self._store_entry(row)
        gone = set(indices)
        self._batch.keep([i for i in range(len(self._batch.rows)) if i not in gone])

    def _store_entry(self, row: _Row) -> None:
        entry = row.entry
        if entry is None or entry.kv is None:
            return
        logits = row.last_logits
        entry.next_logits = None if logits is None else logits.clone()
        self._store.put(row.request.conversation_id, entry)
        row.entry = None


def _cast_cache(cache: Any, dtype: torch.dtype) -> None:
    """Cast a cache's keys and values to ``dtype`` in place (no-op when they are already)."""
    for layer in getattr(cache, "layers", ()):
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.dtype != dtype:
            layer.keys = keys.to(dtype)
            layer.values = layer.values.to(dtype)


def cpu_batch_dtypes(dtype: Any, device: str) -> tuple[Any, Any]:
    """``(dtype alone, dtype from two rows)`` for `BatchedTransformersBackend.from_pretrained`.

    ``"auto"`` on CPU gives ``(bfloat16, float32)``: without native bf16 matrix units a bf16
    decode step reads half the bytes (faster alone) but its matrix products do not speed up
    with more rows, while float32's do. The plain forward-loop ceiling that ``collab-agent
    bench batch`` prints for both dtypes at each batch size is the measurement behind this
    table (README, "Batching on CPU"). Any other device or an explicit dtype: one dtype, no switch.
    """
    import torch

    from collab_agent.backends.local import _resolve_dtype

    if (dtype is None or dtype == "auto") and device == "cpu":
        return torch.bfloat16, torch.float32
    return _resolve_dtype(dtype, device), None


__all__ = ["BatchedTransformersBackend", "cpu_batch_dtypes"]
