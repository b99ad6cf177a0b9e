"""`OpenAIBackend`: a model behind an OpenAI-compatible server, tying the HTTP client, the
request modes, the answer readers and the stop rules together."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import anyio
import openai
from pydantic import SecretStr

from collab_agent import _checks
from collab_agent.backends.detokenize import stop_holdback
from collab_agent.backends.network import Price
from collab_agent.backends.openai import answers
from collab_agent.backends.openai.client import PROBLEM_CHARS, HttpClient, RetryPolicy
from collab_agent.backends.openai.dialects import ServerInfo, server_info
from collab_agent.backends.openai.errors import RETRYABLE
from collab_agent.backends.openai.modes import MODES, BodyInput, RequestMode
from collab_agent.backends.openai.prompts import Prompts
from collab_agent.backends.openai.stops import cut_at_stop, settle_streamed, stop_reason
from collab_agent.backends.openai.stream import OpenStream, StreamedBody
from collab_agent.backends.toolcalls import parse_tool_calls
from collab_agent.errors import BackendError, CapabilityError, CollabError, ConfigError
from collab_agent.types import GenerateRequest, Generation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Mode", "OpenAIBackend"]

logger = logging.getLogger(__name__)

CLOSE_AFTER_STREAM: Mapping[str, str] = {"Connection": "close"}
"""Headers of a streamed request to llama.cpp's server. It closes the connection after every
streamed answer while announcing ``Keep-Alive``, so the pool kept that connection as reusable and
the next request sent on it before the server's FIN arrived failed with "Server disconnected
without sending a response". Asking for the close makes both ends agree: the client drops the
connection once the answer is read."""

Mode = Literal["auto", "completions", "chat-continue", "chat-prefill", "deepseek-prefix", "chat"]
_MODES = ("auto", "completions", "chat-continue", "chat-prefill", "deepseek-prefix", "chat")
_HOUR_S, _DAY_S = 3600.0, 86400.0
"""Upper bounds of the waits a backend accepts (longer is a typo, not a setting)."""


class OpenAIBackend:
    """A model behind an OpenAI-compatible HTTP API (paper's edge-cloud LRM, or a local server).

    Args:
        model: the model id sent in each request.
        base_url: the API root, e.g. ``http://127.0.0.1:8080/v1``.
        api_key: the key (``None``: no key, for local servers). Never shown in ``repr``, logs,
            traces or error messages.
        mode: how reasoning is continued (see `collab_agent.backends.openai`); default ``"auto"``.
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
        _checks.in_range("timeout", timeout, 0.0, _DAY_S, low_open=True)
        _checks.non_negative_int("max_retries", max_retries)
        _checks.in_range("backoff_s", backoff_s, 0.0, _HOUR_S)
        _checks.in_range("max_backoff_s", max_backoff_s, 0.0, _HOUR_S)
        _checks.in_range("max_retry_after_s", max_retry_after_s, 0.0, _DAY_S)
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
        self.on_unavailable = on_unavailable
        self.price = price
        parts = urlsplit(self.base_url)
        self.name = name or f"{model}@{parts.hostname}{f':{parts.port}' if parts.port else ''}"
        self.server: ServerInfo | None = None
        self._prompts = Prompts(tokenizer, self.name)
        self.known_dialect: str | None = None  # a subclass that starts its server knows it
        self.context_window: int | None = (
            None
            if context_window is None
            else _checks.positive_int("context_window", context_window)
        )
        self._resolved_mode: str | None = None if mode == "auto" else mode
        retry = RetryPolicy(max_retries, float(backoff_s), float(max_backoff_s),
                            float(max_retry_after_s))  # fmt: skip
        self._http = HttpClient(
            self.name, model, self.base_url, self._api_key, float(timeout), retry, default_headers
        )

    # ------------------------------------------------------------------ plumbing
    def __repr__(self) -> str:
        key = "'**********'" if self._api_key is not None else "None"
        return (
            f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, api_key={key}, "
            f"mode={self.mode!r}, timeout={self.timeout}, max_retries={self.max_retries}, "
            f"on_unavailable={self.on_unavailable!r})"
        )

    @property
    def timeout(self) -> float:
        """Deadline of one attempt, seconds."""
        return self._http.timeout

    @property
    def max_retries(self) -> int:
        """Retries after the first attempt."""
        return self._http.retry.max_retries

    @property
    def root_url(self) -> str:
        """The server root (``base_url`` without a trailing ``/v1``)."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    @property
    def open_clients(self) -> int:
        """HTTP clients (one per event loop that used this backend) not closed yet."""
        return self._http.open_clients

    async def aclose(self) -> None:
        """Close the running event loop's HTTP client; clients of loops running in other
        threads are closed there (`close`). A later request opens a new client."""
        await self._http.aclose()

    def close(self) -> None:
        """Close every HTTP client of this backend from sync code (not from inside a running
        event loop that has one: use ``await aclose()`` there). Clients of loops running in
        other threads are closed on their loop, waiting a few seconds at most each."""
        self._http.close()

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ probing
    async def probe(self) -> ServerInfo:
        """Ask the server what it is (``GET /models``), once; sets ``server`` and the mode."""
        async with (await self._http.loop_client()).probe_lock:
            if self.server is not None:
                return self.server
            try:
                models = await self._http.get("/models", "probe")
            except RETRYABLE:
                raise  # retried by generate(); probing again next attempt
            except BackendError:
                models = None
            self.server = server_info(self.base_url, models)
            if self._resolved_mode is None:
                self._resolved_mode = self._auto_mode(self.server)
            logger.info(
                "%s: server dialect %s, mode %s",
                self.name,
                self.server.dialect,
                self._resolved_mode,
            )
            return self.server

    def _auto_mode(self, server: ServerInfo) -> str:
        if self._prompts.source is not None:
            return "completions"
        if server.dialect == "llama.cpp":
            self._prompts.source = "server"
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
        return self._prompts.local_tokenizer()

    async def _prompt(self, request: GenerateRequest) -> str:
        """The chat template applied to the messages with a generation prompt, plus reasoning."""
        return await self._prompts.render(request, self._http.post, self.root_url)

    # ------------------------------------------------------------------ request bodies
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

    def _constrain(self, body: dict[str, Any], request: GenerateRequest) -> None:
        """Put ``request.response_format`` into the request body in the server's own terms."""
        rf = request.response_format
        if rf is None:
            return
        from collab_agent.backends.constraints import llamacpp_schema, missing_constraint

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

    async def _body(self, request: GenerateRequest) -> tuple[RequestMode, dict[str, Any]]:
        """The mode used for ``request`` and the request body (without ``stream``)."""
        if self._resolved_mode is None:
            await self.probe()
        assert self._resolved_mode is not None
        mode = MODES[self._resolved_mode]
        if mode.renders_prompt and self._native_tool_turn(request):
            mode = MODES["chat"]
        given = BodyInput(
            request=request,
            sampling=self._sampling(request),
            prompt=await self._prompt(request) if mode.renders_prompt else None,
            want_logprobs=self._wants_logprobs(request),
            backend=self.name,
            dialect=self.server.dialect if self.server else None,
        )
        body = mode.body(given)
        self._constrain(body, request)
        return mode, body

    # ------------------------------------------------------------------ answers
    async def _attempt(self, request: GenerateRequest) -> Generation:
        mode, body = await self._body(request)
        data = await self._http.post(mode.path, body, mode.what)
        return self._parse(request, mode, data)

    def _parse(self, request: GenerateRequest, mode: RequestMode, data: Any) -> Generation:
        """The `Generation` of an unstreamed answer body of ``mode``."""
        try:
            choice = answers.first_choice(data, mode.what)
            answer = mode.read(request, choice)
        except TypeError as error:
            raise self._http.malformed(data, str(error)) from None
        return self._finish(
            request, data, choice, answer.text, answer.reasoning_text, list(answer.native_calls)
        )

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
            problem = f"{type(error).__name__}: {str(error)[:PROBLEM_CHARS]}"
        raise self._http.malformed(data, problem)

    def _generation(
        self,
        request: GenerateRequest,
        data: Mapping[str, Any],
        choice: Mapping[str, Any],
        text: str,
        reasoning_text: str,
        native_calls: list[Any],
    ) -> Generation:
        prompt, cached, completion = answers.usage(data)
        logprobs = answers.chosen_logprobs(choice.get("logprobs"))
        text, reason, stop_string = stop_reason(
            choice,
            text,
            request.stop,
            completion_tokens=completion,
            logprob_count=None if logprobs is None else len(logprobs),
        )
        tool_calls = [c for c in map(answers.native_call, native_calls) if c is not None]
        if not tool_calls and request.purpose == "answer" and request.tools:
            parsed = parse_tool_calls(text, request.tools)
            if parsed.tool_calls:
                tool_calls = parsed.tool_calls
                text = parsed.content
        cost = self.price.cost(prompt, cached, completion) if self.price else 0.0
        top = answers.top_logprobs(choice.get("logprobs")) if request.top_logprobs else None
        return Generation(
            text=text,
            stop_reason=reason,
            logprobs=logprobs if request.logprobs else None,
            top_logprobs=top,
            prompt_tokens=prompt,
            cached_tokens=cached,
            completion_tokens=completion,
            cost=cost,
            tool_calls=tool_calls,
            reasoning_text=reasoning_text,
            stop_string=stop_string,
        )

    # ------------------------------------------------------------------ the contract
    async def generate(self, request: GenerateRequest) -> Generation:
        """Continue ``request.reasoning``; retries transient failures within bounds.

        Raises:
            BackendUnavailableError: (a subclass naming timeout, connection, rate limit or server
                error) the server stayed unreachable through the retries.
            BackendError: a non-retryable rejection (context overflow, 4xx, bad answer).
            CapabilityError: the server cannot continue reasoning in the chosen mode.
        """
        start = time.perf_counter()
        generation = await self._http.with_retries(self._attempt, request)
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
        opened = await self._http.with_retries(self._open_stream, request)
        if isinstance(opened, Generation):
            opened.seconds = time.perf_counter() - start
            if opened.text:
                yield opened.text
            yield opened
            return
        shown = ""
        try:
            while True:
                visible, cut = cut_at_stop(opened.merged.text, request.stop)
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
        await settle_streamed(merged.choice, request.stop, self._detokenize)
        generation = self._finish(
            request, merged.data, merged.choice, merged.text, merged.reasoning_text, []
        )
        generation.seconds = time.perf_counter() - start
        if generation.text.startswith(shown) and len(generation.text) > len(shown):
            yield generation.text[len(shown) :]
        yield generation

    async def _detokenize(self, ids: list[int]) -> str | None:
        """The text of token ids (llama.cpp's ``/detokenize``; ``None`` on other servers).
        Idempotent, so a dropped connection (of the probe too) is retried like a request."""
        return await self._http.with_retries(self._detokenize_once, ids)

    async def _detokenize_once(self, ids: list[int]) -> str | None:
        server = self.server or await self.probe()
        if server.dialect != "llama.cpp":
            return None
        data = await self._http.post(f"{self.root_url}/detokenize", {"tokens": ids}, "detokenize")
        content = data.get("content") if isinstance(data, Mapping) else None
        return content if isinstance(content, str) else None

    async def _open_stream(self, request: GenerateRequest) -> OpenStream | Generation:
        """One attempt: send the streamed request and read it until its first text (or its
        end); a request that is not streamed gets its whole `Generation` instead."""
        mode, body = await self._body(request)
        if request.tools or not mode.streams:
            return await self._attempt(request)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        client = (await self._http.loop_client()).client
        deadline = anyio.current_time() + self.timeout
        headers = dict(CLOSE_AFTER_STREAM) if self._dialect() == "llama.cpp" else {}
        sse = await self._http.request(
            mode.what,
            lambda: client.post(
                mode.path, body=body, cast_to=object, stream=True,
                stream_cls=openai.AsyncStream[object], options={"headers": headers},
            ),
        )  # fmt: skip
        if "json" in sse.response.headers.get("content-type", ""):
            # a server or proxy that ignores stream=True sends the whole answer as one body
            try:
                raw = await sse.response.aread()
            finally:
                await sse.close()
            try:
                data = json.loads(raw)
            except ValueError as error:
                raise self._http.malformed(None, f"the answer is not JSON ({error})") from None
            return self._parse(request, mode, data)
        opened = OpenStream(self._http, sse, StreamedBody(chat=mode.chat), deadline, mode.what)
        try:
            while not opened.merged.text and await opened.read():
                pass
        except BaseException:
            await opened.close()
            raise
        return opened

    # ------------------------------------------------------------------ scoring
    async def score(self, request: GenerateRequest, continuation: str) -> list[float]:
        """The logprob of each token of ``continuation`` written after ``request.reasoning``:
        one completions call with ``echo`` over the rendered prompt (vLLM, llama-cpp-python
        started with ``--logits_all true``), no generation to speak of (one token).

        Raises:
            CapabilityError: the server does not return prompt logprobs (llama.cpp's own server,
                DeepSeek), or there is no way to render the prompt (pass ``tokenizer=``).
        """
        return await self._http.with_retries(self._score_attempt, request, continuation)

    @property
    def can_score(self) -> bool | None:
        """Whether `score` can work here: ``False`` once the server is known not to echo prompt
        logprobs, ``None`` before the first call has probed it."""
        if self.server is None:
            return None
        return self.server.echoes_prompt_logprobs

    async def _score_attempt(self, request: GenerateRequest, continuation: str) -> list[float]:
        server = self.server or await self.probe()
        if not server.echoes_prompt_logprobs:
            raise CapabilityError(
                f"{self.name}: this server ({server.dialect}) does not return prompt logprobs "
                "(completions with echo), so it cannot score a given text; use vLLM, "
                "llama-cpp-python with --logits_all true, or a local large model"
            )
        if self._resolved_mode == "completions-needs-tokenizer" or (
            self._prompts.source is None and not server.template_endpoint
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
        data = await self._http.post("/completions", body, "score")
        try:
            choice = answers.first_choice(data, "score")
        except TypeError as error:
            raise self._http.malformed(data, str(error)) from None
        logprobs = choice.get("logprobs")
        tokens = logprobs.get("tokens") if isinstance(logprobs, Mapping) else None
        values = logprobs.get("token_logprobs") if isinstance(logprobs, Mapping) else None
        if not isinstance(tokens, list) or not isinstance(values, list) or not tokens:
            raise CapabilityError(
                self._http.scrub(
                    f"{self.name}: the server answered echo without prompt logprobs "
                    f"(tokens, token_logprobs): {str(data)[:PROBLEM_CHARS]}"
                )
            )
        return answers.suffix_logprobs(
            tokens, values, continuation, answers.completion_tokens(data)
        )
