"""Any OpenAI-compatible server as a backend: vLLM, SGLang, llama.cpp, llama-cpp-python, DeepSeek.

TrigReason's edge-cloud setting (Zhao, Peng, Nguyen et al., 2026, Sec. "Edge-cloud
collaboration") puts the large model behind an API: collab-agent is the client. The reasoner asks
a backend to *continue* an assistant text written so far by either model; servers offer that in
different ways, chosen by ``mode``:

- ``"completions"``: the raw ``/v1/completions`` endpoint with a prompt rendered from the chat
  template (a local Hugging Face tokenizer, or llama.cpp's ``/apply-template``) plus the
  reasoning. Works everywhere a completions endpoint exists; exact and prefix-cache friendly.
- ``"chat-continue"``: the chat endpoint with a trailing assistant message and
  ``continue_final_message`` (vLLM, SGLang).
- ``"chat-prefill"``: the chat endpoint with a trailing assistant message, which llama.cpp's
  server continues on its own (its non-streaming content repeats the prefix; we strip it).
- ``"deepseek-prefix"``: a trailing assistant message with ``"prefix": true`` (DeepSeek's beta
  chat prefix completion; use ``base_url="https://api.deepseek.com/beta"``).
- ``"chat"``: plain chat, for hosted APIs that cannot continue; only requests without reasoning.
- ``"auto"`` (default): ``completions`` when a tokenizer is given; otherwise the server is
  probed once (``GET /models``): llama.cpp -> ``completions`` with the server's template,
  vLLM/SGLang -> ``chat-continue``, DeepSeek -> ``deepseek-prefix``, anything else -> ``chat``.
  llama-cpp-python ignores a trailing assistant message and has no template endpoint, so it needs
  ``tokenizer=``; without one, a request that continues reasoning raises `CapabilityError`.

Faults: every attempt has a deadline (``timeout``); connection errors, timeouts, 429 (honouring
a readable ``Retry-After``), 5xx and malformed answers (`BackendProtocolError`) are retried with
exponential backoff and jitter (tenacity), at most ``max_retries`` times; 4xx never. Each event
loop gets one HTTP client, closed by `OpenAIBackend.aclose` / `OpenAIBackend.close` or when that
loop shuts down (a sync call's loop, ``asyncio.run``), so no socket outlives its loop. The SDK's own retries are off so the two do not stack. Errors
are typed twice: our `BackendError` family and LangChain's ``langchain_core.exceptions`` model
errors, so code catching either works. Retryable failures that outlast the retries raise a
`BackendUnavailableError` subclass: with ``on_unavailable="degrade"`` the reasoner catches it and
lets the small model write the step, marking it degraded; with ``"fail"`` it propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

import anyio
import httpx
import openai
from langchain_core.exceptions import (
    ContextOverflowError,
    ModelAPIError,
    ModelAuthenticationError,
    ModelConnectionError,
    ModelInvalidRequestError,
    ModelNotFoundError,
    ModelPermissionDeniedError,
    ModelRateLimitError,
    ModelTimeoutError,
)
from pydantic import SecretStr
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from collab_agent import _checks
from collab_agent.backends.base import GenerateRequest, Generation, StopReason
from collab_agent.backends.detokenize import stop_holdback
from collab_agent.backends.network import Price
from collab_agent.backends.sse import StreamedBody
from collab_agent.backends.toolcalls import parse_tool_calls
from collab_agent.errors import (
    BackendError,
    BackendUnavailableError,
    CapabilityError,
    CollabError,
    ConfigError,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "BackendAuthenticationError",
    "BackendConnectionError",
    "BackendContextOverflowError",
    "BackendNotFoundError",
    "BackendPermissionError",
    "BackendProtocolError",
    "BackendRateLimitError",
    "BackendRequestError",
    "BackendServerError",
    "BackendTimeoutError",
    "Mode",
    "OpenAIBackend",
    "Price",
    "ServerInfo",
]

logger = logging.getLogger(__name__)

Mode = Literal["auto", "completions", "chat-continue", "chat-prefill", "deepseek-prefix", "chat"]
_MODES = ("auto", "completions", "chat-continue", "chat-prefill", "deepseek-prefix", "chat")
_NO_KEY = "EMPTY"


# ============================================================================ typed errors
class BackendTimeoutError(BackendUnavailableError, ModelTimeoutError):
    """The server did not answer within the deadline (after the retries)."""


class BackendConnectionError(BackendUnavailableError, ModelConnectionError):
    """The server could not be reached (refused, reset, closed mid-response)."""


class BackendRateLimitError(BackendUnavailableError, ModelRateLimitError):
    """The server answered 429 (after the retries). ``retry_after`` is its hint, seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendServerError(BackendUnavailableError, ModelAPIError):
    """The server answered 5xx (after the retries)."""


class BackendProtocolError(BackendUnavailableError, ModelAPIError):
    """The server answered 2xx with a body that is not a valid completion (truncated or empty
    JSON, ``choices`` missing or ``null``, a message or ``usage`` of the wrong type, a
    non-numeric logprob). Retried like a 5xx: a flaky proxy or an overloaded server answers
    garbage now and then; after the retries it is unavailable (so ``degrade`` applies)."""


class BackendContextOverflowError(BackendError, ContextOverflowError):
    """The prompt plus ``max_tokens`` exceed the model's context window (never retried)."""


class BackendAuthenticationError(BackendError, ModelAuthenticationError):
    """The server rejected the API key (401; never retried)."""


class BackendPermissionError(BackendError, ModelPermissionDeniedError):
    """The key lacks permission for this request (403; never retried)."""


class BackendNotFoundError(BackendError, ModelNotFoundError):
    """The model or endpoint does not exist on this server (404; never retried)."""


class BackendRequestError(BackendError, ModelInvalidRequestError):
    """The server rejected the request as invalid (other 4xx; never retried)."""


T = TypeVar("T")

_RETRYABLE = (
    BackendTimeoutError,
    BackendConnectionError,
    BackendRateLimitError,
    BackendServerError,
    BackendProtocolError,
)


# ============================================================================ server facts
@dataclass(frozen=True)
class ServerInfo:
    """What a probe learned about the server.

    Attributes:
        dialect: ``"llama.cpp"``, ``"llama-cpp-python"``, ``"vllm"``, ``"sglang"``,
            ``"deepseek"`` or ``"unknown"``.
        model_ids: the ids ``GET /models`` listed.
        continues_assistant: whether a trailing assistant message is continued by the chat
            endpoint (``False`` for llama-cpp-python, which starts a new turn).
        template_endpoint: whether the server renders chat templates (llama.cpp
            ``/apply-template``).
        names_stop_string: whether a response says which stop string ended it (vLLM's
            ``stop_reason``, SGLang's ``matched_stop``); otherwise it is inferred.
        echoes_prompt_logprobs: whether completions with ``echo`` return the prompt tokens'
            logprobs (vLLM, llama-cpp-python), which `OpenAIBackend.score` needs; llama.cpp's
            own server ignores ``echo``.
    """

    dialect: str
    model_ids: tuple[str, ...] = ()
    continues_assistant: bool = False
    template_endpoint: bool = False
    names_stop_string: bool = False
    echoes_prompt_logprobs: bool = True


_DIALECTS: dict[str, ServerInfo] = {
    "llama.cpp": ServerInfo(
        "llama.cpp", continues_assistant=True, template_endpoint=True, echoes_prompt_logprobs=False
    ),
    "llama-cpp-python": ServerInfo("llama-cpp-python"),
    "vllm": ServerInfo("vllm", continues_assistant=True, names_stop_string=True),
    "sglang": ServerInfo("sglang", continues_assistant=True, names_stop_string=True),
    "deepseek": ServerInfo("deepseek", continues_assistant=True, echoes_prompt_logprobs=False),
    "unknown": ServerInfo("unknown"),
}
_OWNERS = {"llamacpp": "llama.cpp", "me": "llama-cpp-python", "vllm": "vllm", "sglang": "sglang"}


def _dialect_of(base_url: str, models: Any) -> str:
    if "deepseek.com" in (urlsplit(base_url).hostname or ""):
        return "deepseek"
    data = models.get("data") if isinstance(models, Mapping) else None
    if isinstance(data, list) and data and isinstance(data[0], Mapping):
        owner = str(data[0].get("owned_by", ""))
        return _OWNERS.get(owner, "unknown")
    return "unknown"


# ============================================================================ response parsing
def _chosen_logprobs(logprobs: Any) -> list[float] | None:
    """Chosen-token logprobs from either dialect: ``{"content": [{"logprob": x}, ...]}``
    (OpenAI chat, llama.cpp completions) or legacy ``{"token_logprobs": [x, ...]}``."""
    if not isinstance(logprobs, Mapping):
        return None
    content = logprobs.get("content")
    if isinstance(content, list):
        return [
            _logprob(e["logprob"])
            for e in content
            if isinstance(e, Mapping) and e.get("logprob") is not None
        ]
    legacy = logprobs.get("token_logprobs")
    if isinstance(legacy, list):
        return [_logprob(x) for x in legacy if x is not None]
    return None


def _ran_into_stop(logprobs: Any, text: str, stops: Sequence[str]) -> bool:
    """Whether the chosen tokens' own text runs past ``text`` into a stop string: the last token
    held both the answer's end and the stop's start (``":\n"`` with stop ``"\n"``), so the
    server sent its logprob though it cut the text before the stop."""
    if not isinstance(logprobs, Mapping) or not stops:
        return False
    content = logprobs.get("content")
    if isinstance(content, list):
        pieces = [e.get("token") for e in content if isinstance(e, Mapping)]
    else:
        pieces = logprobs.get("tokens") or []
    if not isinstance(pieces, list) or not all(isinstance(p, str) for p in pieces):
        return False
    joined = "".join(str(p) for p in pieces)
    if len(joined) <= len(text) or not joined.startswith(text):
        return False
    rest = joined[len(text) :]
    return any(stop and (rest.startswith(stop) or stop.startswith(rest)) for stop in stops)


def _logprob(value: Any) -> float:
    """A logprob as the server must send it: a JSON number, at most 0 (``-inf`` allowed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a logprob is {type(value).__name__} {value!r}, not a number")
    if math.isnan(value) or value > 1e-6:
        raise ValueError(f"a logprob is {value!r}, not a number <= 0")
    return float(value)


def _top_logprobs(logprobs: Any) -> list[dict[str, float]] | None:
    """Per generated token, ``{token: logprob}`` of the alternatives, from either dialect."""
    if not isinstance(logprobs, Mapping):
        return None
    content = logprobs.get("content")
    if isinstance(content, list):
        return [
            {str(t.get("token")): _logprob(t["logprob"]) for t in e.get("top_logprobs") or []
             if isinstance(t, Mapping) and t.get("logprob") is not None}
            for e in content if isinstance(e, Mapping)
        ]  # fmt: skip
    legacy = logprobs.get("top_logprobs")
    if isinstance(legacy, list):
        return [{str(k): _logprob(v) for k, v in (e or {}).items()} for e in legacy]
    return None


def _usage(data: Mapping[str, Any]) -> tuple[int, int, int]:
    """(prompt, cached, completion) tokens; prompt includes cached."""
    usage = data.get("usage") or {}
    if not isinstance(usage, Mapping):
        raise TypeError(f"usage is {type(usage).__name__}, not an object")
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    if cached is None:
        timings = data.get("timings") or {}
        cached = timings.get("cache_n", data.get("tokens_cached"))
    cached = int(cached or 0)
    if not prompt:
        timings = data.get("timings") or {}
        prompt = int(timings.get("prompt_n") or 0) + cached
    return prompt, min(cached, prompt) if prompt else cached, completion


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """Cut text at the first stop string a server left in (some return it)."""
    found = [(text.find(s), s) for s in stop if s and s in text]
    if not found:
        return text, None
    index, string = min(found)
    return text[:index], string


def _retry_after(error: openai.APIStatusError) -> float | None:
    """The server's wait hint in seconds: ``Retry-After-Ms``, ``Retry-After`` as seconds or an
    HTTP date. Anything unreadable (``soon``, ``nan``, a malformed date) is no hint at all."""
    headers = error.response.headers
    value = headers.get("retry-after-ms")
    if value:
        seconds = _finite(value)
        if seconds is not None:
            return max(seconds / 1000.0, 0.0)
    value = headers.get("retry-after")
    if not value:
        return None
    seconds = _finite(value)
    if seconds is not None:
        return max(seconds, 0.0)
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(parsed.timestamp() - time.time(), 0.0)


def _finite(value: str) -> float | None:
    """``float(value)`` when it is a number other than NaN (infinity stays: "wait forever")."""
    try:
        number = float(value)
    except ValueError:
        return None
    return None if math.isnan(number) else number


@dataclass
class _LoopClient:
    """The HTTP client of one event loop, with the generator that closes it when the loop
    shuts down (asyncio finalises live async generators at loop end) and the probe lock."""

    loop: asyncio.AbstractEventLoop
    client: openai.AsyncOpenAI
    closer: AsyncGenerator[None, None]
    probe_lock: anyio.Lock


# ============================================================================ the backend
class OpenAIBackend:
    """A model behind an OpenAI-compatible HTTP API (paper's edge-cloud LRM, or a local server).

    Args:
        model: the model id sent in each request.
        base_url: the API root, e.g. ``http://127.0.0.1:8080/v1``.
        api_key: the key (``None``: no key, for local servers). Never shown in ``repr``, logs,
            traces or error messages.
        mode: how reasoning is continued (see the module docstring); default ``"auto"``.
        tokenizer: renders the chat template for ``mode="completions"``: a Hugging Face
            tokenizer, a path or bundled name (``"bundled:NAME"``) to load one from, or
            ``"server"`` for llama.cpp's ``/apply-template``. ``None``: chosen by ``auto``.
        timeout: deadline of one attempt in seconds (connect, send, generate, receive).
        max_retries: retries after the first attempt, for connection errors, timeouts, 429, 5xx.
        backoff_s: first backoff wait; doubles per retry, plus up to ``backoff_s`` of jitter.
        max_backoff_s: the longest backoff wait.
        max_retry_after_s: the longest ``Retry-After`` honoured; a longer one ends the retries.
        on_unavailable: ``"fail"`` or ``"degrade"``: what the reasoner does when this backend
            raises `BackendUnavailableError` (the backend itself raises in both cases).
        price: API price per million tokens; each `Generation` carries its cost.
        name: shown in traces (default ``"MODEL@HOST:PORT"``).
        default_headers: extra HTTP headers for every request.
        context_window: the model's context in tokens, when known: calls whose prompt plus
            reasoning budget cannot fit are refused before any request (``None``: unchecked).
    """

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key: str | Any | None = None,
        *,
        mode: Mode = "auto",
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        max_retry_after_s: float = 30.0,
        on_unavailable: Literal["fail", "degrade"] = "fail",
        price: Price | None = None,
        name: str | None = None,
        default_headers: Mapping[str, str] | None = None,
        context_window: int | None = None,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ConfigError("model", f"must be a non-empty model id, got {model!r}")
        if not isinstance(base_url, str) or urlsplit(base_url).scheme not in ("http", "https"):
            raise ConfigError(
                "base_url",
                f"must be an http(s) URL such as http://127.0.0.1:8080/v1, got {base_url!r}",
            )
        if mode not in _MODES:
            raise ConfigError("mode", f"must be one of {list(_MODES)}, got {mode!r}")
        if on_unavailable not in ("fail", "degrade"):
            raise ConfigError(
                "on_unavailable", f"must be 'fail' or 'degrade', got {on_unavailable!r}"
            )
        if mode == "completions" and tokenizer is None:
            tokenizer = "server"
        _checks.in_range("timeout", timeout, 0.0, 86400.0, low_open=True)
        _checks.non_negative_int("max_retries", max_retries)
        _checks.in_range("backoff_s", backoff_s, 0.0, 3600.0)
        _checks.in_range("max_backoff_s", max_backoff_s, 0.0, 3600.0)
        _checks.in_range("max_retry_after_s", max_retry_after_s, 0.0, 86400.0)
        if price is not None and not isinstance(price, Price):
            raise ConfigError(
                "price", f"must be a Price(input, cached, output), got {type(price).__name__}"
            )

        getter = getattr(api_key, "get_secret_value", None)
        secret = getter() if callable(getter) else api_key
        self._api_key = SecretStr(secret) if secret else None  # shown as '**********'
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.mode: Mode = mode
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self.on_unavailable = on_unavailable
        self.price = price
        parts = urlsplit(self.base_url)
        self.name = name or f"{model}@{parts.hostname}{f':{parts.port}' if parts.port else ''}"
        self.server: ServerInfo | None = None
        self._tokenizer_source = tokenizer
        self.known_dialect: str | None = None  # a subclass that starts its server knows it
        self.context_window: int | None = (
            None
            if context_window is None
            else _checks.positive_int("context_window", context_window)
        )
        self._tokenizer: Any = None if isinstance(tokenizer, str) else tokenizer
        self._resolved_mode: str | None = None if mode == "auto" else mode
        self._templates: dict[str, str] = {}  # rendered server templates, by request
        self._client_options: dict[str, Any] = {
            "api_key": secret or _NO_KEY,
            "base_url": self.base_url,
            "timeout": self.timeout,
            "max_retries": 0,
            "default_headers": dict(default_headers or {}),
        }
        # One HTTP pool per event loop (a pool bound to a closed loop cannot be reused), each
        # closed by `aclose`/`close` or, at the latest, when its loop shuts down.
        self._clients: dict[int, _LoopClient] = {}
        self._clients_lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing
    def __repr__(self) -> str:
        key = "'**********'" if self._api_key is not None else "None"
        return (
            f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, api_key={key}, "
            f"mode={self.mode!r}, timeout={self.timeout}, max_retries={self.max_retries}, "
            f"on_unavailable={self.on_unavailable!r})"
        )

    @property
    def root_url(self) -> str:
        """The server root (``base_url`` without a trailing ``/v1``)."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    async def _loop_client(self) -> _LoopClient:
        """The running event loop's HTTP client, made on first use in that loop."""
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            entry = self._clients.get(id(loop))
            if entry is not None and entry.loop is loop:
                return entry
            client = openai.AsyncOpenAI(**self._client_options)
            entry = _LoopClient(loop, client, self._close_at_loop_end(loop, client), anyio.Lock())
            self._clients[id(loop)] = entry
        await entry.closer.__anext__()  # runs to its yield: now the loop finalises it at its end
        return entry

    async def _close_at_loop_end(
        self, loop: asyncio.AbstractEventLoop, client: openai.AsyncOpenAI
    ) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            with self._clients_lock:
                entry = self._clients.get(id(loop))
                if entry is not None and entry.client is client:
                    del self._clients[id(loop)]
            await client.close()

    @property
    def open_clients(self) -> int:
        """HTTP clients (one per event loop that used this backend) not closed yet."""
        with self._clients_lock:
            return len(self._clients)

    async def aclose(self) -> None:
        """Close the running event loop's HTTP client; clients of loops running in other
        threads are closed there (`close`). A later request opens a new client."""
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            entry = self._clients.get(id(loop))
        if entry is not None and entry.loop is loop:
            await entry.closer.aclose()
        await anyio.to_thread.run_sync(self._close_other_loops, loop)

    def close(self) -> None:
        """Close every HTTP client of this backend from sync code (not from inside a running
        event loop that has one: use ``await aclose()`` there). Clients of loops running in
        other threads are closed on their loop, waiting at most 5 s each."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        self._close_other_loops(running)

    def _close_other_loops(self, skip: asyncio.AbstractEventLoop | None) -> None:
        with self._clients_lock:
            entries = [e for e in self._clients.values() if e.loop is not skip]
        for entry in entries:
            if entry.loop.is_closed():
                with self._clients_lock:
                    self._clients.pop(id(entry.loop), None)
            elif entry.loop.is_running():
                future = asyncio.run_coroutine_threadsafe(entry.closer.aclose(), entry.loop)
                try:
                    future.result(timeout=5.0)
                except Exception as error:  # a loop stuck or shutting down: it closes at its end
                    future.cancel()
                    logger.warning("%s: could not close an HTTP client: %r", self.name, error)
            # a loop that is not running now closes its client when it shuts down

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _scrub(self, text: str) -> str:
        if self._api_key is not None:
            text = text.replace(self._api_key.get_secret_value(), "**********")
        return text

    # ------------------------------------------------------------------ errors
    def _typed(self, error: BaseException, what: str) -> BackendError:
        """Map an SDK error (or our deadline) to the typed error that names what happened."""
        where = f"{self.name} ({what} at {self.base_url})"
        if isinstance(error, (openai.APITimeoutError, TimeoutError)):
            return BackendTimeoutError(f"{where}: no answer within timeout={self.timeout}s")
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__ or error
            return BackendConnectionError(
                self._scrub(f"{where}: cannot reach the server ({type(cause).__name__}: {cause})")
            )
        if isinstance(error, openai.APIStatusError):
            status = error.status_code
            detail = self._scrub(str(error.body if error.body is not None else error.message))[:500]
            message = f"{where}: HTTP {status}: {detail}"
            if status == 429:
                return BackendRateLimitError(message, retry_after=_retry_after(error))
            if status >= 500:
                return BackendServerError(message)
            lowered = detail.lower()
            if "context" in lowered and any(
                w in lowered for w in ("exceed", "length", "too long", "maximum", "overflow")
            ):
                return BackendContextOverflowError(
                    message + "; shorten the conversation or lower max_tokens"
                )
            if status == 401:
                return BackendAuthenticationError(f"{where}: HTTP 401: the API key was rejected")
            if status == 403:
                return BackendPermissionError(message)
            if status == 404:
                return BackendNotFoundError(message + f"; check model={self.model!r} and base_url")
            return BackendRequestError(message)
        return BackendError(self._scrub(f"{where}: {type(error).__name__}: {error}"))

    async def _post(self, path: str, body: dict[str, Any], what: str) -> Any:
        """POST a JSON body within one attempt's deadline; typed errors on failure."""
        client = (await self._loop_client()).client
        return await self._request(what, lambda: client.post(path, body=body, cast_to=object))

    async def _get(self, path: str, what: str) -> Any:
        client = (await self._loop_client()).client
        return await self._request(what, lambda: client.get(path, cast_to=object))

    async def _request(self, what: str, send: Callable[[], Awaitable[Any]]) -> Any:
        """``await send()`` within one attempt's deadline. The typed error is raised outside the
        ``except`` block, so the SDK's exception (which holds the request and its
        ``Authorization`` header) is neither its cause nor its context."""
        typed: BackendError
        try:
            with anyio.fail_after(self.timeout):
                return await send()
        except (openai.OpenAIError, TimeoutError) as error:
            typed = self._typed(error, what)
        except ValueError as error:  # the SDK could not decode the body (truncated, empty)
            typed = BackendProtocolError(
                self._scrub(f"{self.name} ({what} at {self.base_url}): the body is not JSON "
                            f"({type(error).__name__}: {str(error)[:200]})")
            )  # fmt: skip
        raise typed

    # ------------------------------------------------------------------ probing
    async def probe(self) -> ServerInfo:
        """Ask the server what it is (``GET /models``), once; sets ``server`` and the mode."""
        async with (await self._loop_client()).probe_lock:
            if self.server is not None:
                return self.server
            try:
                models = await self._get("/models", "probe")
            except _RETRYABLE:
                raise  # retried by generate(); probing again next attempt
            except BackendError:
                models = None
            dialect = _dialect_of(self.base_url, models)
            ids = (
                tuple(
                    str(m.get("id"))
                    for m in (models or {}).get("data", [])
                    if isinstance(m, Mapping)
                )
                if isinstance(models, Mapping)
                else ()
            )
            info = _DIALECTS[dialect]
            self.server = ServerInfo(
                info.dialect,
                ids,
                info.continues_assistant,
                info.template_endpoint,
                info.names_stop_string,
                info.echoes_prompt_logprobs,
            )
            if self._resolved_mode is None:
                self._resolved_mode = self._auto_mode(self.server)
            logger.info("%s: server dialect %s, mode %s", self.name, dialect, self._resolved_mode)
            return self.server

    def _auto_mode(self, server: ServerInfo) -> str:
        if self._tokenizer_source is not None:
            return "completions"
        if server.dialect == "llama.cpp":
            self._tokenizer_source = "server"
            return "completions"
        if server.dialect in ("vllm", "sglang"):
            return "chat-continue"
        if server.dialect == "deepseek":
            return "deepseek-prefix"
        if server.dialect == "llama-cpp-python":
            return "completions-needs-tokenizer"
        return "chat"

    @property
    def resolved_mode(self) -> str | None:
        """The mode in use (``None`` until ``auto`` has probed the server)."""
        return self._resolved_mode

    # ------------------------------------------------------------------ prompts
    def local_tokenizer(self) -> Any:
        """The tokenizer given as ``tokenizer=`` (loaded offline), else ``None``: the server's
        own tokenizer is not read here."""
        if self._tokenizer is None and self._tokenizer_source in (None, "server"):
            return None
        return self._local_tokenizer()

    def _local_tokenizer(self) -> Any:
        if self._tokenizer is None:
            source = self._tokenizer_source
            assert isinstance(source, str)
            if source.startswith("bundled:"):
                from collab_agent.backends import bundled

                self._tokenizer = bundled.load_tokenizer(source.removeprefix("bundled:"))
            else:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(source)
        return self._tokenizer

    async def _prompt(self, request: GenerateRequest) -> str:
        """The chat template applied to the messages with a generation prompt, plus reasoning."""
        messages = [dict(m) for m in request.messages]
        tools = [dict(t) for t in request.tools] if request.tools else None
        if self._tokenizer_source == "server":
            body: dict[str, Any] = {"messages": messages}
            if tools:
                body["tools"] = tools
            key = json.dumps(body, sort_keys=True, default=str)
            cached = self._templates.get(key)
            if cached is not None:
                return cached + request.reasoning
            data = await self._post(f"{self.root_url}/apply-template", body, "apply-template")
            if not isinstance(data, Mapping) or not isinstance(data.get("prompt"), str):
                raise CapabilityError(
                    f"{self.name}: the server has no /apply-template endpoint; pass tokenizer= "
                    "(a Hugging Face tokenizer or its path) to render the chat template locally"
                )
            rendered = data["prompt"]
            if len(self._templates) >= 256:
                self._templates.pop(next(iter(self._templates)))
            self._templates[key] = rendered
        else:
            tokenizer = self._local_tokenizer()
            kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
            if tools:
                kwargs["tools"] = tools
            rendered = tokenizer.apply_chat_template(messages, **kwargs)
        return rendered + request.reasoning

    # ------------------------------------------------------------------ one attempt
    def _sampling(self, request: GenerateRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "temperature": request.sampling.temperature,
            "top_p": request.sampling.top_p,
        }
        if request.sampling.seed is not None:
            body["seed"] = request.sampling.seed
        if request.stop:
            body["stop"] = list(request.stop)
        return body

    def constrains(self, response_format: Mapping[str, Any]) -> bool:
        """Whether the server enforces ``response_format`` while decoding: llama.cpp (its
        ``json_schema`` grammar), vLLM and SGLang (guided decoding) and hosted OpenAI-style
        APIs (``response_format`` on chat); llama-cpp-python's completions do not."""
        return self._dialect() != "llama-cpp-python"

    def _dialect(self) -> str | None:
        """The server's dialect once probed, else what the backend knows of its server."""
        return self.server.dialect if self.server else self.known_dialect

    def _constrain(self, body: dict[str, Any], request: GenerateRequest, mode: str | None) -> None:
        """Put ``request.response_format`` into the request body in the server's own terms."""
        rf = request.response_format
        if rf is None:
            return
        from collab_agent.structured import llamacpp_schema, missing_constraint

        if not self.constrains(rf):
            raise missing_constraint(self.name, rf)
        if self._dialect() == "llama.cpp":
            body["json_schema"] = llamacpp_schema(rf)
        else:
            body["response_format"] = dict(rf)

    def _wants_logprobs(self, request: GenerateRequest) -> bool:
        """Logprobs are also asked for internally where they tell a stop string from EOS."""
        if request.logprobs or request.top_logprobs:
            return True
        names = self.server.names_stop_string if self.server else False
        return bool(request.stop) and not names

    async def _body(self, request: GenerateRequest) -> tuple[str | None, dict[str, Any]]:
        """The mode used for ``request`` and the request body (without ``stream``)."""
        if self._resolved_mode is None:
            await self.probe()
        mode = self._resolved_mode
        want_logprobs = self._wants_logprobs(request)
        if mode == "completions-needs-tokenizer":
            if request.reasoning:
                raise CapabilityError(
                    f"{self.name}: llama-cpp-python ignores a trailing assistant message and has no "
                    "template endpoint; pass tokenizer= (a Hugging Face tokenizer or its path) so the "
                    "prompt is rendered locally and sent to /completions"
                )
            mode = "chat"
        if mode == "completions" and self._native_tool_turn(request):
            mode = "chat"
        if mode == "completions":
            body = self._sampling(request)
            body["prompt"] = await self._prompt(request)
            self._constrain(body, request, mode)
            if want_logprobs:
                body["logprobs"] = max(1, request.top_logprobs)
        else:
            body = self._sampling(request)
            messages = [dict(m) for m in request.messages]
            if request.reasoning:
                if mode == "chat":
                    raise CapabilityError(
                        f"{self.name}: mode 'chat' cannot continue a partial assistant text on this "
                        f"server (dialect {self.server.dialect if self.server else 'unknown'}); pass "
                        "mode='completions' with tokenizer=, or mode='chat-continue' (vLLM, SGLang), "
                        "'chat-prefill' (llama.cpp) or 'deepseek-prefix' (DeepSeek)"
                    )
                last: dict[str, Any] = {"role": "assistant", "content": request.reasoning}
                if mode == "deepseek-prefix":
                    last["prefix"] = True
                messages.append(last)
                if mode == "chat-continue":
                    body["continue_final_message"] = True
                    body["add_generation_prompt"] = False
            body["messages"] = messages
            self._constrain(body, request, mode)
            if request.tools:
                body["tools"] = [dict(t) for t in request.tools]
            if want_logprobs:
                body["logprobs"] = True
                body["top_logprobs"] = max(1, request.top_logprobs)
        return mode, body

    async def _attempt(self, request: GenerateRequest) -> Generation:
        mode, body = await self._body(request)
        if mode == "completions":
            data = await self._post("/completions", body, "completion")
        else:
            data = await self._post("/chat/completions", body, "chat completion")
        return self._parse(request, mode, data)

    def _parse(self, request: GenerateRequest, mode: str | None, data: Any) -> Generation:
        """The `Generation` of an unstreamed answer body of ``mode``."""
        if mode == "completions":
            choice = self._choice(data, "completion")
            text = self._text(choice.get("text"), data, "choices[0].text")
            reasoning_text = ""
            native_calls: list[Any] = []
        else:
            choice = self._choice(data, "chat completion")
            message = choice.get("message") or {}
            if not isinstance(message, Mapping):
                raise self._malformed(data, "choices[0].message is not an object")
            text = self._text(message.get("content"), data, "choices[0].message.content")
            if request.reasoning and mode == "chat-prefill" and text.startswith(request.reasoning):
                text = text[len(request.reasoning) :]  # llama.cpp repeats the prefix
            reasoning_text = message.get("reasoning_content") or message.get("reasoning") or ""
            native_calls = message.get("tool_calls") or []
            if not isinstance(reasoning_text, str) or not isinstance(native_calls, list):
                raise self._malformed(data, "reasoning_content or tool_calls of the wrong type")
        return self._finish(request, data, choice, text, reasoning_text, native_calls)

    def _finish(
        self,
        request: GenerateRequest,
        data: Any,
        choice: Mapping[str, Any],
        text: str,
        reasoning_text: str,
        native_calls: list[Any],
    ) -> Generation:
        """`_generation`, with a malformed field of the answer raised as a protocol error."""
        try:
            return self._generation(request, data, choice, text, reasoning_text, native_calls)
        except CollabError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as error:
            problem = f"{type(error).__name__}: {str(error)[:200]}"
        raise self._malformed(data, problem)

    def _native_tool_turn(self, request: GenerateRequest) -> bool:
        """Whether an answer that offers tools with no reasoning to continue goes to llama.cpp's
        chat endpoint, so the engine's own tool calling (its template's call parser, with
        ``--jinja``, xllamacpp's default) returns the calls natively."""
        return (
            request.purpose == "answer"
            and bool(request.tools)
            and not request.reasoning
            and request.response_format is None
            and self._dialect() == "llama.cpp"
        )

    def _choice(self, data: Any, what: str) -> Mapping[str, Any]:
        """The first choice of a completion body; `BackendProtocolError` when there is none."""
        if not isinstance(data, Mapping):
            raise self._malformed(data, f"the {what} body is not a JSON object")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            raise self._malformed(data, "the answer has no choices")
        if not isinstance(choices[0], Mapping):
            raise self._malformed(data, "choices[0] is not an object")
        return choices[0]

    def _text(self, value: Any, data: Any, where: str) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self._malformed(data, f"{where} is {type(value).__name__}, not a string")
        return value

    def _malformed(self, data: Any, problem: str) -> BackendProtocolError:
        return BackendProtocolError(
            self._scrub(
                f"{self.name} ({self.base_url}): malformed answer: {problem}: {str(data)[:300]}"
            )
        )

    def _generation(
        self,
        request: GenerateRequest,
        data: Mapping[str, Any],
        choice: Mapping[str, Any],
        text: str,
        reasoning_text: str,
        native_calls: list[Any],
    ) -> Generation:
        prompt, cached, completion = _usage(data)
        logprobs = _chosen_logprobs(choice.get("logprobs"))
        text, left_in = _cut_at_stop(text, request.stop)
        finish = choice.get("finish_reason")
        stop_string: str | None = left_in
        reason: StopReason
        if left_in is not None:
            reason = "step"
        elif finish == "length":
            reason = "length"
        elif finish == "tool_calls":
            reason = "eos"
        else:
            named = choice.get("stop_reason", choice.get("matched_stop"))
            if isinstance(named, str) and named:
                reason, stop_string = "step", named
            elif isinstance(named, int) or not request.stop:
                reason = "eos"
            elif logprobs is not None and completion > len(logprobs):
                # llama.cpp counts the stop string's tokens but returns logprobs only up to it
                reason = "step"
            elif _ran_into_stop(choice.get("logprobs"), text, request.stop):
                reason = "step"
            else:
                reason = "eos"
            if reason == "step" and stop_string is None and len(request.stop) == 1:
                stop_string = request.stop[0]
        tool_calls: list[dict[str, Any]] = []
        for call in native_calls:
            found = _native_call(call)
            if found is not None:
                tool_calls.append(found)
        if not tool_calls and request.purpose == "answer" and request.tools:
            parsed = parse_tool_calls(text, request.tools)
            if parsed.tool_calls:
                tool_calls = parsed.tool_calls
                text = parsed.content
        cost = self.price.cost(prompt, cached, completion) if self.price else 0.0
        return Generation(
            text=text,
            stop_reason=reason,
            logprobs=logprobs if request.logprobs else None,
            top_logprobs=_top_logprobs(choice.get("logprobs")) if request.top_logprobs else None,
            prompt_tokens=prompt,
            cached_tokens=cached,
            completion_tokens=completion,
            cost=cost,
            tool_calls=tool_calls,
            reasoning_text=reasoning_text,
            stop_string=stop_string if reason == "step" else None,
        )

    # ------------------------------------------------------------------ the contract
    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, BackendRateLimitError) and error.retry_after is not None:
            return min(error.retry_after, self.max_retry_after_s)
        backoff = wait_exponential_jitter(
            multiplier=self.backoff_s, max=self.max_backoff_s, jitter=self.backoff_s
        )
        return float(backoff(state))

    def _stop(self, state: RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome else None
        if (
            isinstance(error, BackendRateLimitError)
            and (error.retry_after or 0) > self.max_retry_after_s
        ):
            return True  # the server asks us to wait longer than we may
        return bool(stop_after_attempt(self.max_retries + 1)(state))

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        logger.warning(
            "%s: attempt %d failed (%s); retrying in %.2fs",
            self.name,
            state.attempt_number,
            type(error).__name__,
            wait,
        )

    async def generate(self, request: GenerateRequest) -> Generation:
        """Continue ``request.reasoning``; retries transient failures within bounds.

        Raises:
            BackendUnavailableError: (a subclass naming timeout, connection, rate limit or server
                error) the server stayed unreachable through the retries.
            BackendError: a non-retryable rejection (context overflow, 4xx, bad answer).
            CapabilityError: the server cannot continue reasoning in the chosen mode.
        """
        start = time.perf_counter()
        generation = await self._with_retries(self._attempt, request)
        generation.seconds = time.perf_counter() - start
        return generation

    async def stream(self, request: GenerateRequest) -> AsyncIterator[str | Generation]:
        """`generate` over SSE (``stream=True``): text deltas as the server sends them, then the
        `Generation` that ``generate`` would return (same text, stop reason, token counts; usage
        is asked for with ``stream_options``).

        Each attempt has the same deadline as ``generate``'s (``timeout`` for the whole answer)
        and the same bounded retries, but only until the first text arrives: once a delta was
        shown, a failure raises. A tail that could start a stop string is held back. Requests
        with ``tools`` and the ``chat-prefill`` mode are answered unstreamed (one delta), since
        their text is rewritten once whole (tool calls parsed out, a repeated prefix cut).
        """
        start = time.perf_counter()
        opened = await self._with_retries(self._open_stream, request)
        if isinstance(opened, Generation):
            opened.seconds = time.perf_counter() - start
            if opened.text:
                yield opened.text
            yield opened
            return
        shown = ""
        try:
            while True:
                visible, cut = _cut_at_stop(opened.merged.text, request.stop)
                if cut is None:
                    visible = visible[: len(visible) - stop_holdback(visible, request.stop)]
                if len(visible) > len(shown) and visible.startswith(shown):
                    yield visible[len(shown) :]
                    shown = visible
                if not await opened.read():
                    break
        finally:
            await opened.close()
        merged = opened.merged
        await self._settle_stop(request, merged)
        generation = self._finish(
            request, merged.data, merged.choice, merged.text, merged.reasoning_text, []
        )
        generation.seconds = time.perf_counter() - start
        if generation.text.startswith(shown) and len(generation.text) > len(shown):
            yield generation.text[len(shown) :]
        yield generation

    async def _settle_stop(self, request: GenerateRequest, merged: StreamedBody) -> None:
        """Make a streamed llama.cpp answer read as its unstreamed one: there, the tokens of a
        stop string have no logprobs entries (which is how a stop is told from an end of turn);
        streamed, they come as entries without text, like the end-of-turn token. The server's
        ``/detokenize`` tells them apart (one short call, only when such entries end a stop).
        A stop inside the last token cuts that entry's text; its ``top_logprobs`` restore it."""
        if not request.stop or merged.choice.get("finish_reason") != "stop":
            return
        held = merged.textless_tail()
        if not held:
            merged.restore_cut_token()
            return
        server = self.server or await self.probe()
        if server.dialect != "llama.cpp":
            return
        data = await self._post(f"{self.root_url}/detokenize", {"tokens": held}, "detokenize")
        content = data.get("content") if isinstance(data, Mapping) else None
        if isinstance(content, str) and any(s and s in content for s in request.stop):
            merged.drop_tail(len(held))

    async def _open_stream(self, request: GenerateRequest) -> _OpenStream | Generation:
        """One attempt: send the streamed request and read it until its first text (or its
        end); a request that is not streamed gets its whole `Generation` instead."""
        mode, body = await self._body(request)
        if request.tools or mode == "chat-prefill":
            return await self._attempt(request)
        chat = mode != "completions"
        path, what = (
            ("/chat/completions", "chat completion") if chat else ("/completions", "completion")
        )
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        client = (await self._loop_client()).client
        deadline = anyio.current_time() + self.timeout
        sse = await self._request(
            what,
            lambda: client.post(
                path, body=body, cast_to=object, stream=True, stream_cls=openai.AsyncStream[object]
            ),
        )
        if "json" in sse.response.headers.get("content-type", ""):
            # a server or proxy that ignores stream=True sends the whole answer as one body
            try:
                raw = await sse.response.aread()
            finally:
                await sse.close()
            try:
                data = json.loads(raw)
            except ValueError as error:
                raise self._malformed(None, f"the answer is not JSON ({error})") from None
            return self._parse(request, mode, data)
        opened = _OpenStream(self, sse, StreamedBody(chat=chat), deadline, what)
        try:
            while not opened.merged.text and await opened.read():
                pass
        except BaseException:
            await opened.close()
            raise
        return opened

    async def score(self, request: GenerateRequest, continuation: str) -> list[float]:
        """The logprob of each token of ``continuation`` written after ``request.reasoning``:
        one completions call with ``echo`` over the rendered prompt (vLLM, llama-cpp-python
        started with ``--logits_all true``), no generation to speak of (one token).

        Raises:
            CapabilityError: the server does not return prompt logprobs (llama.cpp's own server,
                DeepSeek), or there is no way to render the prompt (pass ``tokenizer=``).
        """
        return await self._with_retries(self._score_attempt, request, continuation)

    @property
    def can_score(self) -> bool | None:
        """Whether `score` can work here: ``False`` once the server is known not to echo prompt
        logprobs, ``None`` before the first call has probed it."""
        if self.server is None:
            return None
        return self.server.echoes_prompt_logprobs

    async def _with_retries(self, attempt_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``attempt_fn(*args)`` with bounded tenacity retries on transient failures."""
        start = time.perf_counter()
        attempts = 0
        retrying = AsyncRetrying(
            stop=self._stop,
            wait=self._wait,
            retry=retry_if_exception_type(_RETRYABLE),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    result = await attempt_fn(*args)
        except _RETRYABLE as error:
            error.args = (
                f"{error.args[0]} (gave up after {attempts} attempt(s), "
                f"{time.perf_counter() - start:.1f}s)",
            )
            raise
        return result

    async def _score_attempt(self, request: GenerateRequest, continuation: str) -> list[float]:
        server = self.server or await self.probe()
        if not server.echoes_prompt_logprobs:
            raise CapabilityError(
                f"{self.name}: this server ({server.dialect}) does not return prompt logprobs "
                "(completions with echo), so it cannot score a given text; use vLLM, "
                "llama-cpp-python with --logits_all true, or a local large model"
            )
        if self._resolved_mode == "completions-needs-tokenizer" or (
            self._tokenizer_source is None and not server.template_endpoint
        ):
            raise CapabilityError(
                f"{self.name}: scoring renders the prompt for /completions; pass tokenizer= "
                "(a Hugging Face tokenizer, its path or bundled:NAME)"
            )
        if not continuation:
            return []
        prefix = await self._prompt(request)
        body = {
            "model": self.model,
            "prompt": prefix + continuation,
            "max_tokens": 1,
            "temperature": 0.0,
            "echo": True,
            "logprobs": 1,
        }
        data = await self._post("/completions", body, "score")
        choice = self._choice(data, "score")
        logprobs = choice.get("logprobs")
        tokens = logprobs.get("tokens") if isinstance(logprobs, Mapping) else None
        values = logprobs.get("token_logprobs") if isinstance(logprobs, Mapping) else None
        if not isinstance(tokens, list) or not isinstance(values, list) or not tokens:
            raise CapabilityError(
                self._scrub(
                    f"{self.name}: the server answered echo without prompt logprobs "
                    f"(tokens, token_logprobs): {str(data)[:200]}"
                )
            )
        return _suffix_logprobs(tokens, values, continuation, _completion_tokens(data))


class _OpenStream:
    """An SSE answer being read: the chunks merged so far and the attempt's deadline."""

    def __init__(
        self,
        backend: OpenAIBackend,
        sse: openai.AsyncStream[object],
        merged: StreamedBody,
        deadline: float,
        what: str,
    ) -> None:
        self.backend = backend
        self.sse = sse
        self.merged = merged
        self.deadline = deadline
        self.what = what

    async def read(self) -> bool:
        """Merge the next chunk; False at the end of the stream. Typed errors, raised outside
        the ``except`` block (the SDK's exception holds the request's headers)."""
        backend = self.backend
        typed: BackendError
        try:
            with anyio.fail_after(max(0.0, self.deadline - anyio.current_time())):
                chunk = await self.sse.__anext__()
        except StopAsyncIteration:
            return False
        except (openai.OpenAIError, TimeoutError) as error:
            typed = backend._typed(error, self.what)
        except httpx.HTTPError as error:  # the connection broke mid-stream
            typed = BackendConnectionError(
                backend._scrub(f"{backend.name} ({self.what} at {backend.base_url}): the stream "
                               f"broke ({type(error).__name__}: {error})")
            )  # fmt: skip
        except ValueError as error:  # a chunk that is not JSON
            typed = backend._malformed(None, f"a stream chunk is not JSON ({error})")
        else:
            try:
                self.merged.add(chunk)
                return True
            except TypeError as error:
                typed = backend._malformed(chunk, str(error))
        raise typed

    async def close(self) -> None:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self.sse.close()


def _completion_tokens(data: Any) -> int:
    """Tokens the server generated after the echoed prompt (``usage``; 1 when it says nothing,
    as a ``max_tokens=1`` call generates one)."""
    usage = data.get("usage") if isinstance(data, Mapping) else None
    count = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
    return count if isinstance(count, int) and count >= 0 else 1


def _suffix_logprobs(
    tokens: Sequence[Any], values: Sequence[Any], continuation: str, generated: int
) -> list[float]:
    """The logprobs of the echoed prompt tokens that spell ``continuation``, the prompt's end.

    Walks back from the last prompt token (the ``generated`` ones after it dropped) while the
    token texts fit in the continuation. Token texts, not ``text_offset``: llama-cpp-python
    counts offsets in the text with special tokens removed, vLLM in the full prompt."""
    pairs = list(zip(tokens, values, strict=False))
    pairs = pairs[: max(0, len(pairs) - generated)]
    picked: list[float] = []
    covered = 0
    for token, value in reversed(pairs):
        width = len(str(token))
        if covered + width > len(continuation) or value is None:
            break
        covered += width
        picked.append(float(value))
    picked.reverse()
    return picked


def _native_call(call: Any) -> dict[str, Any] | None:
    """A server's native tool call (``{"id", "function": {"name", "arguments"}}``) as
    ``{"id", "name", "args", "type"}``; ``None`` when its arguments are not a JSON object."""
    if not isinstance(call, Mapping):
        return None
    parsed = parse_tool_calls(json.dumps([call]))
    return parsed.tool_calls[0] if parsed.tool_calls else None


def from_env(
    model: str, base_url: str, *, api_key_env: str = "OPENAI_API_KEY", **options: Any
) -> OpenAIBackend:
    """An `OpenAIBackend` whose key comes from the environment variable ``api_key_env``."""
    return OpenAIBackend(model, base_url, os.environ.get(api_key_env), **options)
