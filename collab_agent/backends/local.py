"""A backend that runs a Hugging Face transformers causal LM on this machine, with prefix KV reuse.

TrigReason's edge half runs the small model locally (Sec. 3), and SmallKV runs the large one
locally too. Each conversation keeps its KV cache; a new request is tokenised whole, the cache is
cropped to the longest common token prefix with what it holds, and only the rest is prefilled,
the way vLLM's prefix cache serves a remote model. When the other model wrote a step, only that
step is prefilled; when a step is rejected, the cache rolls back to before it.

The decode loop is our own (one forward per token with the cache, not ``model.generate``), so
that chosen-token logprobs, stop strings and cancellation are exact and cheap; what each sampled
token means (end of turn, stop strings, limits, logprobs, streamed text) is decided by the
`SequenceDecoder` of decoding.py, which the batching backend drives per row too. The
per-conversation cache logic lives in small pieces (`prompt_token_ids`, `ConversationCache.reuse`,
`PrefixCacheStore`) that a batched scheduler can reuse.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from anyio.lowlevel import RunVar

from collab_agent import _checks
from collab_agent._hf import IMPORT_LOCK
from collab_agent.backends.base import GenerateRequest, Generation
from collab_agent.backends.capabilities import Compacting, DeviceMemory
from collab_agent.backends.decoding import SequenceDecoder, sample_next, seeded_generator
from collab_agent.backends.detokenize import find_stop
from collab_agent.errors import BackendError, ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

T = TypeVar("T")

GenerationObserver = Callable[[GenerateRequest, list[int], list[int]], None]
"""``(request, prompt_ids, sampled_ids)`` after each generation."""

TextSink = Callable[[str], None]
"""Called in the worker with each newly showable piece of text (never any of a stop string)."""

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "</s>")
"""Tokens that end a turn in common chat formats (used when the tokenizer knows them)."""


# =========================================================================== prompt rendering
def _with_decoded_arguments(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI-format tool calls carry JSON-string arguments; chat templates (Qwen's) apply
    ``tojson`` to them, so give them the decoded object."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    decoded = []
    for call in calls:
        call = dict(call)
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            with contextlib.suppress(json.JSONDecodeError):
                function["arguments"] = json.loads(arguments) if arguments.strip() else {}
            call["function"] = function
        decoded.append(call)
    return {**message, "tool_calls": decoded}


def render_prompt(tokenizer: PreTrainedTokenizerBase, request: GenerateRequest) -> str:
    """The chat rendered with its template and a generation prompt, then the reasoning verbatim."""
    messages = [_with_decoded_arguments(dict(m)) for m in request.messages]
    tools: list[Any] | None = [dict(t) for t in request.tools] if request.tools else None
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # jinja errors: a message the template cannot render
        raise ConfigError("messages", f"the chat template cannot render them: {exc}") from exc
    return str(text) + request.reasoning


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, request: GenerateRequest) -> list[int]:
    """The token ids of `render_prompt` (the template already holds any special tokens)."""
    ids = tokenizer(render_prompt(tokenizer, request), add_special_tokens=False)["input_ids"]
    return list(ids)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# =========================================================================== per-conversation cache
def _kv_bytes(kv: Any) -> int:
    if isinstance(kv, DeviceMemory):  # a compressed cache counts what stays on the device
        return int(kv.device_bytes())
    total = 0
    for layer in getattr(kv, "layers", ()):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class ConversationCache:
    """The KV cache of one conversation and the tokens it holds.

    Attributes:
        tokens: the token ids whose keys and values are in ``kv``, in order.
        kv: a transformers `DynamicCache` (or any croppable cache) of the model.
        next_logits: the logits after the last token of ``tokens`` when known (float32, 1-D),
            so a request whose prompt is exactly ``tokens`` needs no forward at all.
    """

    tokens: list[int]
    kv: Any
    next_logits: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return _kv_bytes(self.kv)

    def reuse(self, prompt: Sequence[int], *, at_most: int | None = None) -> int:
        """Crop to the longest common prefix with ``prompt`` (and to ``at_most`` tokens) and
        return how many cached tokens are kept.

        When the whole prompt is cached and ``next_logits`` are known they are kept as they are;
        otherwise at least one prompt token is left to prefill, so the caller gets logits.
        """
        keep = common_prefix_length(self.tokens, prompt)
        if at_most is not None:
            keep = min(keep, at_most)
        whole = keep == len(prompt) == len(self.tokens) and self.next_logits is not None
        if not whole:
            keep = min(keep, len(prompt) - 1)
        if keep < len(self.tokens):
            croppable = getattr(self.kv, "is_croppable", True)
            if keep <= 0 or not croppable:
                keep = 0
                self.kv.reset()
            else:
                self.kv.crop(keep - len(self.tokens))  # a negative count removes tokens
            del self.tokens[keep:]
            self.next_logits = None
        return keep


class PrefixCacheStore:
    """The conversations' caches, least recently used first, within a count and a byte cap.

    Not thread-safe by itself: the backend touches it only under its generation lock.
    """

    def __init__(self, max_conversations: int, max_bytes: int) -> None:
        self.max_conversations = max_conversations
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, ConversationCache] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, conversation_id: object) -> bool:
        return conversation_id in self._entries

    @property
    def nbytes(self) -> int:
        """Bytes held by all cached conversations."""
        return sum(entry.nbytes for entry in self._entries.values())

    def take(self, conversation_id: str) -> ConversationCache | None:
        """Remove and return a conversation's cache (put it back with `put`)."""
        return self._entries.pop(conversation_id, None)

    def put(self, conversation_id: str, entry: ConversationCache) -> list[str]:
        """Store ``entry`` as the most recently used and evict beyond the caps; return the ids
        evicted (possibly ``entry``'s own, when it alone exceeds the byte cap)."""
        self._entries[conversation_id] = entry
        self._entries.move_to_end(conversation_id)
        return self.evict()

    def evict(self) -> list[str]:
        """Drop least recently used conversations until both caps hold."""
        evicted: list[str] = []
        sizes = {cid: entry.nbytes for cid, entry in self._entries.items()}
        total = sum(sizes.values())
        while self._entries and (
            len(self._entries) > self.max_conversations or total > self.max_bytes
        ):
            cid, _ = self._entries.popitem(last=False)
            total -= sizes[cid]
            evicted.append(cid)
        return evicted

    def release(self, conversation_id: str) -> bool:
        """Forget a conversation; True when it was cached."""
        return self._entries.pop(conversation_id, None) is not None

    def clear(self) -> None:
        self._entries.clear()


# =========================================================================== decoding helpers
def end_of_turn_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Token ids that end generation: the model's EOS ids, the tokenizer's, end-of-turn tokens."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return frozenset(ids)


class _Cancelled(Exception):
    """The caller went away; the worker stopped at the next token."""


# =========================================================================== the backend
class TransformersBackend:
    """A local transformers causal LM as a `Backend`, with per-conversation prefix KV reuse.

    Generation runs in a worker thread (`anyio.to_thread.run_sync` with a one-slot limiter), one
    at a time per backend; a cancelled caller stops the worker at the next token.

    Args:
        model: a transformers causal LM (``AutoModelForCausalLM``), put in eval mode.
        tokenizer: its tokenizer, with a chat template.
        name: shown in traces (default: the model's ``name_or_path``).
        device: where inputs go (default: the model's device).
        max_cached_conversations: most conversations whose KV cache is kept (LRU).
        max_cache_bytes: most bytes of KV cache kept over all conversations (LRU); a
            conversation whose cache alone is larger is dropped after each call.
        kv_method: a KV method of `collab_agent.cache` (``SmallKV(assistant=small_backend)``,
            ``H2O()``, ...) that compresses every conversation's cache; ``None`` keeps it whole.
            (``cache=`` is its old, deprecated name.)
            Its budget is a share of the whole current context (prompt and reasoning) unless
            the method sets ``budget_of="prompt"``. A rollback crops the compressed cache and
            the method's own state together (SmallKV brings evicted tokens back from its host
            copy), so only the text after the common prefix is prefilled again.

    Attributes:
        processed_tokens: tokens the model has run forward on (prefill and decode), for
            benchmarks; reset it freely.
        on_generation: when set, called in the worker after each generation with the request,
            its prompt token ids and every token sampled (for benchmarks and debugging).
        eos_token_ids: the ids that end a generation with ``stop_reason="eos"``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str | None = None,
        device: Any = None,
        max_cached_conversations: int = 8,
        max_cache_bytes: int = 2 << 30,
        kv_method: Any = None,
        cache: Any = None,
    ) -> None:
        _checks.positive_int("max_cached_conversations", max_cached_conversations)
        _checks.positive_int("max_cache_bytes", max_cache_bytes)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError("tokenizer", "has no chat template; pass a chat model's tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or str(getattr(model.config, "name_or_path", "") or type(model).__name__)
        self.device = device if device is not None else model.device
        self.eos_token_ids = end_of_turn_ids(model, tokenizer)
        self.processed_tokens = 0
        self.on_generation: GenerationObserver | None = None
        self._store = PrefixCacheStore(max_cached_conversations, max_cache_bytes)
        self._lock = threading.Lock()  # one worker on the model and its caches at a time
        self._limiter_var: RunVar[anyio.CapacityLimiter] = RunVar(f"collab-agent-{id(self)}")
        self._closed = False
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # A KV method of collab_agent.cache (SmallKV, H2O, ...) compresses every conversation's
        # cache; it hooks the model once here and hands out a compressed cache per conversation.
        if cache is not None:
            if kv_method is not None:
                raise ConfigError("cache", "is the old name of kv_method; pass only kv_method")
            warnings.warn(
                "TransformersBackend(cache=...) is deprecated; pass kv_method=...",
                DeprecationWarning,
                stacklevel=2,
            )
            kv_method = cache
        self.kv_method: Any = None
        self.use_kv_method(kv_method)
        self._observed: tuple[int, int] | None = None  # see record_attention

    def use_kv_method(self, kv_method: Any) -> None:
        """Compress every conversation's cache with ``kv_method`` from now on (``None``: keep
        caches whole). Conversations cached so far are dropped: their caches were made without
        it."""
        with self._lock:
            detach = getattr(self.kv_method, "detach", None)
            if detach is not None:  # SmallKV's forward pre-hook on this model
                detach()
            self._store.clear()
            self.kv_method = kv_method.attach(self.model) if kv_method is not None else None

    # ------------------------------------------------------------------ SmallKV's assistant
    def record_attention(self, calibration_tokens: int, window: int) -> None:
        """Make every conversation's cache record attention (an `ObservedCache`), so that a
        SmallKV whose assistant this backend is reads the SRM's attention from this backend's
        own forward passes instead of running the model a second time."""
        self._observed = (calibration_tokens, window)

    @contextlib.contextmanager
    def observed_conversation(self, conversation_id: str) -> Iterator[ConversationCache]:
        """Lend one conversation's cache (made if absent) under the generation lock; whoever
        changes its KV keeps ``tokens`` and ``next_logits`` true to it."""
        with self._lock:
            entry = self._store.take(conversation_id)
            if entry is None:
                entry = ConversationCache([], self._new_cache())
            try:
                yield entry
            finally:
                self._store.put(conversation_id, entry)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: Any = "auto",
        device: Any = None,
        trust_remote_code: bool = False,
        **options: Any,
    ) -> TransformersBackend:
        """Load a model by path, hub id (where a hub is reachable) or ``"bundled:NAME"``.

        Args:
            name_or_path: ``"bundled:qwen2.5-coder-0.5b-instruct"``, a local folder or a hub id
                (``"hf:"`` in front is accepted).
            dtype: a torch dtype or its name; ``"auto"`` picks bf16 on CPU and on GPUs that
                support it, fp16 on older GPUs.
            device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available, else CPU.
            trust_remote_code: run the model repository's own code (off unless asked).
            **options: passed to the constructor (``max_cached_conversations``, ...).
        """
        import torch

        with IMPORT_LOCK:
            from transformers import AutoModelForCausalLM, AutoTokenizer

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = _resolve_dtype(dtype, str(device))
        target = name_or_path.removeprefix("hf:")
        if target.startswith("bundled:"):
            from collab_agent.backends import bundled

            bundled_name = bundled.get(target).name
            model = bundled.load_model(bundled_name, dtype=torch_dtype, device=device)
            with IMPORT_LOCK:
                tokenizer = AutoTokenizer.from_pretrained(str(bundled.bundled_path(bundled_name)))
            return cls(model, tokenizer, name=bundled_name, device=device, **options)
        try:
            with IMPORT_LOCK:
                tokenizer = AutoTokenizer.from_pretrained(
                    target, trust_remote_code=trust_remote_code
                )
                model = AutoModelForCausalLM.from_pretrained(
                    target, dtype=torch_dtype, trust_remote_code=trust_remote_code
                )
        except OSError as exc:
            raise ConfigError(
                "name_or_path", f"cannot load {name_or_path!r} with transformers: {exc}"
            ) from exc
        return cls(model.to(device), tokenizer, name=target, device=device, **options)

    # ------------------------------------------------------------------ public API
    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        """The token ids this backend feeds the model for ``request`` (chat + reasoning)."""
        return prompt_token_ids(self.tokenizer, request)

    @property
    def cached_conversations(self) -> int:
        """How many conversations have a KV cache kept."""
        return len(self._store)

    @property
    def cache_bytes(self) -> int:
        """Bytes of KV cache kept over all conversations."""
        return self._store.nbytes

    def is_cached(self, conversation_id: str) -> bool:
        """Whether ``conversation_id`` has a KV cache kept."""
        return conversation_id in self._store

    async def generate(self, request: GenerateRequest) -> Generation:
        """Continue ``request.reasoning`` until a stop string, end of turn or ``max_tokens``.

        Raises:
            CapabilityError: ``request.response_format`` is set: this backend has no
                constrained decoding (no maintained grammar library is a dependency).
        """
        if request.response_format is not None:
            from collab_agent.backends.constraints import missing_constraint

            raise missing_constraint(self.name, request.response_format)
        return await self._in_worker(self._generate_sync, request)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[str | Generation]:
        """`generate`, handing out text deltas as tokens are decoded, then the `Generation`.

        The decode runs in its own worker thread under the generation lock; deltas cross to the
        caller through a memory object stream. A tail that could start a stop string is held
        back until the next token settles it, so no delta shows any of a stop string. Closing
        or cancelling the iteration stops the decode at the next token and waits for the
        worker, so the backend is free for the next call; the conversation's cache is kept.
        """
        if request.response_format is not None:
            from collab_agent.backends.constraints import missing_constraint

            raise missing_constraint(self.name, request.response_format)
        if self._closed:
            raise BackendError(f"backend {self.name!r} is closed")
        send, receive = anyio.create_memory_object_stream[str | Generation | BaseException](
            math.inf
        )
        token = anyio.lowlevel.current_token()
        cancel = threading.Event()
        finished = threading.Event()

        def hand(item: str | Generation | BaseException) -> None:
            try:
                anyio.from_thread.run_sync(send.send_nowait, item, token=token)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, RuntimeError):
                cancel.set()  # the caller went away (or its event loop ended)

        def work() -> None:
            try:
                with self._lock:
                    if cancel.is_set():
                        return
                    hand(self._generate_sync(request, cancel, hand))
            except _Cancelled:
                pass
            except BaseException as exc:  # handed to the caller, raised there
                hand(exc)
            finally:
                finished.set()
                with contextlib.suppress(RuntimeError):
                    anyio.from_thread.run_sync(send.close, token=token)

        threading.Thread(target=work, name=f"collab-agent-stream-{self.name}", daemon=True).start()
        shown = ""
        try:
            async with receive:
                async for item in receive:
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, Generation):
                        if item.text.startswith(shown) and len(item.text) > len(shown):
                            yield item.text[len(shown) :]
                        yield item
                        return
                    shown += item
                    yield item
        finally:
            cancel.set()
            if not finished.is_set():
                with anyio.CancelScope(shield=True):  # stops within one forward
                    await anyio.to_thread.run_sync(finished.wait, 60.0)

    async def score(self, request: GenerateRequest, continuation: str) -> list[float]:
        """The logprob of each token of ``continuation`` appended after ``request.reasoning``
        (one prefill, reusing the conversation's cache; raw logits, no temperature)."""
        return await self._in_worker(self._score_sync, request, continuation)

    async def release(self, conversation_id: str) -> None:
        """Free the conversation's KV cache (waits for a generation in progress to finish)."""
        await self._in_worker(lambda _cancel: self._store.release(conversation_id))

    async def aclose(self) -> None:
        """Free every cache; later calls raise `BackendError`."""
        await self._in_worker(lambda _cancel: self._store.clear())
        self._closed = True

    # ------------------------------------------------------------------ threading
    def _limiter(self) -> anyio.CapacityLimiter:
        try:
            return self._limiter_var.get()
        except LookupError:
            limiter = anyio.CapacityLimiter(1)
            self._limiter_var.set(limiter)
            return limiter

    async def _in_worker(self, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(*args, cancel)`` in a worker thread under the generation lock; when the
        caller is cancelled, set ``cancel`` and wait until the worker has stopped."""
        if self._closed:
            raise BackendError(f"backend {self.name!r} is closed")
        cancel = threading.Event()
        finished = threading.Event()
        state = {"started": False}
        state_lock = threading.Lock()

        def work() -> T:
            with state_lock:
                if cancel.is_set():
                    raise _Cancelled
                state["started"] = True
            try:
                with self._lock:
                    if cancel.is_set():
                        raise _Cancelled
                    return func(*args, cancel)
            finally:
                finished.set()

        try:
            return await anyio.to_thread.run_sync(
                work, abandon_on_cancel=True, limiter=self._limiter()
            )
        except anyio.get_cancelled_exc_class():
            with state_lock:
                cancel.set()
                started = state["started"]
            if started:
                with anyio.CancelScope(shield=True):  # stops within one forward
                    await anyio.to_thread.run_sync(finished.wait, 60.0)
            raise

    # ------------------------------------------------------------------ the model
    def _new_cache(self) -> Any:
        if self.kv_method is not None:
            return self.kv_method.new_cache(budget_of="context")
        if self._observed is not None:
            with IMPORT_LOCK:
                from collab_agent.cache.base import ObservedCache

            tokens, window = self._observed
            return ObservedCache(tokens, keep_last=True, window=window)
        with IMPORT_LOCK:
            from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _forward(self, entry: ConversationCache, new_ids: Sequence[int], keep: int = 1) -> Any:
        """Run the model on ``new_ids`` after ``entry``'s tokens; return the last ``keep``
        rows of logits (float32)."""
        import torch

        inputs = torch.tensor([list(new_ids)], dtype=torch.long, device=self.device)
        kwargs = {self._cache_arg: entry.kv}
        out = self.model(input_ids=inputs, use_cache=True, logits_to_keep=keep, **kwargs)
        entry.tokens.extend(int(i) for i in new_ids)
        self.processed_tokens += len(new_ids)
        logits = out.logits[0, -keep:].float()
        entry.next_logits = logits[-1]
        return logits

    @property
    def context_window(self) -> int | None:
        """The model's ``max_position_embeddings`` (``None`` when its config has none)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        return int(limit) if limit is not None else None

    def local_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer this backend renders prompts with."""
        return self.tokenizer

    def _checkout(self, request: GenerateRequest, prompt: Sequence[int], at_most: int | None):
        """The conversation's cache cropped for ``prompt``, and how many tokens it reuses."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and len(prompt) >= limit:
            raise BackendError(
                f"{self.name}: the prompt has {len(prompt)} tokens, the model's context is {limit}"
            )
        entry = self._store.take(request.conversation_id)
        if entry is None:
            entry = ConversationCache([], self._new_cache())
        if self.kv_method is not None:  # SmallKV may share the assistant's own pass over it
            entry.kv.conversation = (request.conversation_id, entry.tokens)
        reused = entry.reuse(prompt, at_most=at_most)
        return entry, reused

    def _generate_sync(
        self,
        request: GenerateRequest,
        cancel: threading.Event,
        on_text: TextSink | None = None,
    ) -> Generation:
        import torch

        started = time.perf_counter()
        prompt = self.prompt_ids(request)
        entry, reused = self._checkout(request, prompt, None)
        ok = False
        try:
            with torch.inference_mode():
                if reused == len(prompt) and entry.next_logits is not None:
                    logits = entry.next_logits
                else:
                    logits = self._forward(entry, prompt[reused:])[-1]
                decoder = self._decode(logits, entry, request, cancel, on_text)
                if isinstance(entry.kv, Compacting):  # back within budget between calls
                    entry.kv.compact()
            ok = True
        except _Cancelled:
            ok = True  # the cache is consistent: keep it
            raise
        except Exception as exc:
            raise BackendError(f"{self.name}: generation failed: {exc}") from exc
        finally:
            if ok:
                self._store.put(request.conversation_id, entry)
        seconds = time.perf_counter() - started
        if self.on_generation is not None:
            self.on_generation(request, prompt, decoder.sampled)
        return decoder.generation(prompt_tokens=len(prompt), cached_tokens=reused, seconds=seconds)

    def _decode(
        self,
        logits: torch.Tensor,
        entry: ConversationCache,
        request: GenerateRequest,
        cancel: threading.Event,
        on_text: TextSink | None = None,
    ) -> SequenceDecoder:
        """The decode loop: a `SequenceDecoder` samples and checks each token, the model
        forwards it. ``on_text`` gets the settled text as it grows, less a tail that could start
        a stop string (the rest of the final text is the caller's to show)."""
        decoder = SequenceDecoder(
            request,
            self.tokenizer,
            self.eos_token_ids,
            seeded_generator(request.sampling, logits.device),
        )
        while True:
            token = decoder.advance(logits)
            if on_text is not None:
                delta = decoder.take_delta()
                if delta:
                    on_text(delta)
            if token is None:
                return decoder
            if cancel.is_set():
                raise _Cancelled
            logits = self._forward(entry, [token])[-1]

    def _score_sync(
        self, request: GenerateRequest, continuation: str, cancel: threading.Event
    ) -> list[float]:
        import torch

        prompt = self.prompt_ids(request)
        extra = list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if not extra:
            return []
        full = prompt + extra
        entry, reused = self._checkout(request, full, len(prompt))
        if reused == len(prompt) and entry.next_logits is None:
            reused = entry.reuse(full, at_most=len(prompt) - 1)  # the logits after the prompt
        ok = False
        try:
            with torch.inference_mode():
                if reused == len(prompt) and entry.next_logits is not None:
                    first = entry.next_logits
                    rest = self._forward(entry, extra, keep=len(extra))
                    rows = torch.cat([first[None], rest[:-1]])
                else:
                    new = full[reused:]
                    logits = self._forward(entry, new, keep=len(new))
                    rows = logits[len(prompt) - 1 - reused : -1]
                chosen = torch.tensor(extra, device=rows.device)
                values = torch.log_softmax(rows, dim=-1).gather(1, chosen[:, None])[:, 0]
            ok = True
        except Exception as exc:
            raise BackendError(f"{self.name}: scoring failed: {exc}") from exc
        finally:
            if ok:
                self._store.put(request.conversation_id, entry)
        return [float(v) for v in values]


def _resolve_dtype(dtype: Any, device: str) -> Any:
    import torch

    if dtype is None or dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device == "cpu" else torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ConfigError("dtype", f"must be a torch dtype name like 'bfloat16', got {dtype!r}")
        return value
    return dtype


__all__ = [
    "ConversationCache",
    "PrefixCacheStore",
    "TransformersBackend",
    "common_prefix_length",
    "find_stop",
    "prompt_token_ids",
    "render_prompt",
    "sample_next",
]
