"""HTTP to an OpenAI-compatible server: one SDK client per event loop, a deadline on every
request, typed errors, bounded retries.

Each event loop gets one HTTP client, closed by `HttpClient.aclose` / `HttpClient.close` or when
that loop shuts down (a sync call's loop, ``asyncio.run``), so no socket outlives its loop. The
SDK's own retries are off so they do not stack with ours (tenacity: exponential backoff with
jitter, a readable ``Retry-After`` honoured up to a bound). No API key reaches a message.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import httpx2
import openai
from pydantic import SecretStr
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from collab_agent.backends.openai import errors
from collab_agent.backends.openai.errors import RETRYABLE, BackendProtocolError
from collab_agent.errors import BackendError

logger = logging.getLogger(__name__)

T = TypeVar("T")

NO_KEY = "EMPTY"
"""The key sent to servers that need none (the SDK insists on one)."""
CLOSE_WAIT_S = 5.0
"""How long `HttpClient.close` waits for another thread's loop to close its client."""
DETAIL_CHARS = 500
"""How much of a server's error body an error message quotes."""
BODY_CHARS = 300
"""How much of a malformed answer an error message quotes."""
PROBLEM_CHARS = 200
"""How much of a decoding problem (or an unusable answer) an error message quotes."""
_OVERFLOW_WORDS = ("exceed", "length", "too long", "maximum", "overflow")


POOL_LIMITS = httpx2.Limits(
    max_connections=1000, max_keepalive_connections=100, keepalive_expiry=2.0
)
"""The SDK's pool sizes, with idle connections dropped after 2 s: llama.cpp's server closes an
idle keep-alive connection after 5 s, the SDK's own expiry, so a connection reused at that
moment failed with "Server disconnected without sending a response" (seen under load)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: ``max_retries`` after the first attempt, backoff doubling from
    ``backoff_s`` (plus up to ``backoff_s`` of jitter) to ``max_backoff_s``; a server's
    ``Retry-After`` is honoured up to ``max_retry_after_s`` and a longer one ends the retries."""

    max_retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 30.0

    def wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, errors.BackendRateLimitError) and error.retry_after is not None:
            return min(error.retry_after, self.max_retry_after_s)
        backoff = wait_exponential_jitter(
            multiplier=self.backoff_s, max=self.max_backoff_s, jitter=self.backoff_s
        )
        return float(backoff(state))

    def stop(self, state: RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome else None
        if (
            isinstance(error, errors.BackendRateLimitError)
            and (error.retry_after or 0) > self.max_retry_after_s
        ):
            return True  # the server asks us to wait longer than we may
        return bool(stop_after_attempt(self.max_retries + 1)(state))


@dataclass
class _LoopClient:
    """The HTTP client of one event loop, with the generator that closes it when the loop
    shuts down (asyncio finalises live async generators at loop end) and the probe lock."""

    loop: asyncio.AbstractEventLoop
    client: openai.AsyncOpenAI
    closer: AsyncGenerator[None, None]
    probe_lock: anyio.Lock


class HttpClient:
    """The HTTP side of one `OpenAIBackend`.

    Args:
        name: the backend's name, for messages and logs.
        model: the model id, named when the server does not know it.
        base_url: the API root (no trailing slash).
        api_key: the key, or ``None`` for servers that need none.
        timeout: deadline of one attempt in seconds.
        retry: the retry bounds.
        default_headers: extra HTTP headers for every request.
    """

    def __init__(
        self,
        name: str,
        model: str,
        base_url: str,
        api_key: SecretStr | None,
        timeout: float,
        retry: RetryPolicy,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.name, self.model, self.base_url = name, model, base_url
        self.timeout, self.retry = timeout, retry
        self._api_key = api_key
        self._options: dict[str, Any] = {
            "api_key": api_key.get_secret_value() if api_key else NO_KEY,
            "base_url": base_url,
            "timeout": timeout,
            "max_retries": 0,
            "default_headers": dict(default_headers or {}),
        }
        # One HTTP pool per event loop (a pool bound to a closed loop cannot be reused), each
        # closed by `aclose`/`close` or, at the latest, when its loop shuts down.
        self._clients: dict[int, _LoopClient] = {}
        self._clients_lock = threading.Lock()

    # ------------------------------------------------------------------ clients per loop
    async def loop_client(self) -> _LoopClient:
        """The running event loop's HTTP client, made on first use in that loop."""
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            entry = self._clients.get(id(loop))
            if entry is not None and entry.loop is loop:
                return entry
            http = openai.DefaultAsyncHttpxClient(limits=POOL_LIMITS)
            client = openai.AsyncOpenAI(**self._options, http_client=http)
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
        """Close the running loop's client; clients of loops in other threads close there."""
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            entry = self._clients.get(id(loop))
        if entry is not None and entry.loop is loop:
            await entry.closer.aclose()
        await anyio.to_thread.run_sync(self._close_other_loops, loop)

    def close(self) -> None:
        """Close every client from sync code, waiting at most `CLOSE_WAIT_S` per other loop."""
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
                    future.result(timeout=CLOSE_WAIT_S)
                except Exception as error:  # a loop stuck or shutting down: it closes at its end
                    future.cancel()
                    logger.warning("%s: could not close an HTTP client: %r", self.name, error)
            # a loop that is not running now closes its client when it shuts down

    # ------------------------------------------------------------------ errors
    def scrub(self, text: str) -> str:
        """``text`` with the API key masked."""
        if self._api_key is not None:
            text = text.replace(self._api_key.get_secret_value(), "**********")
        return text

    def typed(self, error: BaseException, what: str) -> BackendError:
        """Map an SDK error (or our deadline) to the typed error that names what happened."""
        where = f"{self.name} ({what} at {self.base_url})"
        if isinstance(error, (openai.APITimeoutError, TimeoutError)):
            return errors.BackendTimeoutError(f"{where}: no answer within timeout={self.timeout}s")
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__ or error
            return errors.BackendConnectionError(
                self.scrub(f"{where}: cannot reach the server ({type(cause).__name__}: {cause})")
            )
        if isinstance(error, openai.APIStatusError):
            status = error.status_code
            detail = self.scrub(str(error.body if error.body is not None else error.message))
            detail = detail[:DETAIL_CHARS]
            message = f"{where}: HTTP {status}: {detail}"
            if status == 429:
                return errors.BackendRateLimitError(message, retry_after=errors.retry_after(error))
            if status >= 500:
                return errors.BackendServerError(message)
            lowered = detail.lower()
            if "context" in lowered and any(w in lowered for w in _OVERFLOW_WORDS):
                return errors.BackendContextOverflowError(
                    message + "; shorten the conversation or lower max_tokens"
                )
            if status == 401:
                return errors.BackendAuthenticationError(
                    f"{where}: HTTP 401: the API key was rejected"
                )
            if status == 403:
                return errors.BackendPermissionError(message)
            if status == 404:
                return errors.BackendNotFoundError(
                    message + f"; check model={self.model!r} and base_url"
                )
            return errors.BackendRequestError(message)
        return BackendError(self.scrub(f"{where}: {type(error).__name__}: {error}"))

    def malformed(self, data: Any, problem: str) -> BackendProtocolError:
        """The error for a 2xx answer that is not a valid completion."""
        return BackendProtocolError(
            self.scrub(
                f"{self.name} ({self.base_url}): malformed answer: {problem}: "
                f"{str(data)[:BODY_CHARS]}"
            )
        )

    # ------------------------------------------------------------------ requests
    async def post(self, path: str, body: dict[str, Any], what: str) -> Any:
        """POST a JSON body within one attempt's deadline; typed errors on failure."""
        client = (await self.loop_client()).client
        return await self.request(what, lambda: client.post(path, body=body, cast_to=object))

    async def get(self, path: str, what: str) -> Any:
        """GET within one attempt's deadline; typed errors on failure."""
        client = (await self.loop_client()).client
        return await self.request(what, lambda: client.get(path, cast_to=object))

    async def request(self, what: str, send: Callable[[], Awaitable[Any]]) -> Any:
        """``await send()`` within one attempt's deadline. The typed error is raised outside the
        ``except`` block, so the SDK's exception (which holds the request and its
        ``Authorization`` header) is neither its cause nor its context."""
        typed: BackendError
        try:
            with anyio.fail_after(self.timeout):
                return await send()
        except (openai.OpenAIError, TimeoutError) as error:
            typed = self.typed(error, what)
        except ValueError as error:  # the SDK could not decode the body (truncated, empty)
            typed = BackendProtocolError(
                self.scrub(f"{self.name} ({what} at {self.base_url}): the body is not JSON "
                           f"({type(error).__name__}: {str(error)[:PROBLEM_CHARS]})")
            )  # fmt: skip
        raise typed

    async def with_retries(self, attempt_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``attempt_fn(*args)`` with bounded retries on transient failures."""
        start = time.perf_counter()
        attempts = 0
        retrying = AsyncRetrying(
            stop=self.retry.stop,
            wait=self.retry.wait,
            retry=retry_if_exception_type(RETRYABLE),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    result = await attempt_fn(*args)
        except RETRYABLE as error:
            error.args = (
                f"{error.args[0]} (gave up after {attempts} attempt(s), "
                f"{time.perf_counter() - start:.1f}s)",
            )
            raise
        return result

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
