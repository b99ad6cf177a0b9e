"""The ASGI app: routes, auth, admission, metrics, and errors as OpenAI's error JSON."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from collab_agent.backends.base import Backend, GenerateRequest, Sampling, release_conversation
from collab_agent.serve.auth import authenticate
from collab_agent.serve.config import ServeConfig
from collab_agent.serve.engine import Engine, Part, PreparedCall
from collab_agent.serve.errors import APIError, error_response, to_api_error
from collab_agent.serve.limits import Admission, Ticket
from collab_agent.serve.metrics import ServeMetrics
from collab_agent.serve.schema import ChatCompletionRequest
from collab_agent.serve.streaming import CompletionWriter

COMPLETIONS = "/v1/chat/completions"


def create_app(
    config: ServeConfig, small: Backend, large: Backend, *, close_backends: bool = True
) -> FastAPI:
    """The server of ``config.policies`` over the loaded ``small`` and ``large`` backends;
    with ``close_backends`` the app frees them when it shuts down."""
    engine = Engine(small, large, config)
    admission = Admission(
        config.max_in_flight, config.max_queued, config.max_per_key, config.retry_after_s
    )
    metrics = ServeMetrics(admission)
    health = _Health(small, large, config.health_ttl_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if close_backends:
                with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                    for backend in {id(small): small, id(large): large}.values():
                        close = getattr(backend, "aclose", None)
                        if close is not None:
                            await close()

    app = FastAPI(title="collab-agent", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.admission, app.state.metrics, app.state.engine = admission, metrics, engine
    app.add_middleware(_StatusCounter, metrics=metrics)

    @app.exception_handler(APIError)
    @app.exception_handler(RequestValidationError)
    @app.exception_handler(Exception)
    async def _errors(_: Request, error: Exception) -> Response:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def _http_errors(_: Request, error: HTTPException) -> Response:
        kind = "not_found" if error.status_code == 404 else "invalid_request_error"
        return error_response(APIError(error.status_code, str(error.detail), type=kind))

    @app.get("/health")
    async def _health() -> Response:
        ready, detail = await health.check()
        return JSONResponse(
            {"status": "ok" if ready else "unavailable", "models": detail},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics")
    async def _metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def _models(request: Request) -> Response:
        authenticate(request.headers.get("authorization"), config.api_keys)
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "collab-agent"}
            for name in engine.models
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.post(COMPLETIONS)
    async def _chat(request: Request) -> Response:
        try:
            return await _completion(request, config, engine, admission, metrics)
        except Exception as error:  # answered here, as OpenAI's error JSON, never re-raised
            return error_response(error)

    return app


async def _completion(
    request: Request,
    config: ServeConfig,
    engine: Engine,
    admission: Admission,
    metrics: ServeMetrics,
) -> Response:
    started = time.perf_counter()
    key = authenticate(request.headers.get("authorization"), config.api_keys)
    body = await _read_body(request, config.max_body_bytes)
    try:
        parsed = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None
    call = engine.prepare(parsed)
    ticket = admission.reserve(key)
    writer = CompletionWriter(parsed.model)
    if parsed.stream:
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        events = _stream(engine, call, ticket, writer, metrics, started, include_usage)
        return _TicketedEventSource(
            events, ticket, shutdown_event=anyio.Event(), shutdown_grace_period=config.grace_s
        )
    try:
        parts = await _until_disconnect(request, _collect(engine, call, ticket))
    finally:
        ticket.close()
    if parts is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    _record(metrics, parts, started)
    return JSONResponse(writer.completion(parts))


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for piece in request.stream():
        body.extend(piece)
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> APIError:
    return APIError(
        413, f"the request body is over this server's limit of {limit} bytes", code="too_large"
    )


async def _collect(engine: Engine, call: PreparedCall, ticket: Ticket) -> list[Part]:
    await ticket.wait()
    return [part async for part in engine.stream(call)]


async def _until_disconnect(request: Request, work: Any) -> list[Part] | None:
    """Run ``work``; if the client disconnects first, cancel it and return ``None``."""
    result: list[list[Part]] = []

    async def run(scope: anyio.CancelScope) -> None:
        result.append(await work)
        scope.cancel()

    async def watch(scope: anyio.CancelScope) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(run, group.cancel_scope)
            group.start_soon(watch, group.cancel_scope)
    except BaseExceptionGroup as group:  # the one error of the work, as itself
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    return result[0] if result else None


async def _stream(
    engine: Engine,
    call: PreparedCall,
    ticket: Ticket,
    writer: CompletionWriter,
    metrics: ServeMetrics,
    started: float,
    include_usage: bool,
) -> AsyncIterator[str]:
    parts: list[Part] = []
    try:
        await ticket.wait()
        yield writer.first()
        async for part in engine.stream(call):
            if not parts and part.kind != "end":
                metrics.ttft.observe(time.perf_counter() - started)
            parts.append(part)
            for data in writer.events(part, include_usage):
                yield data
        _record(metrics, parts, started)
        yield "[DONE]"
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as error:  # headers are sent: the error travels as the last event
        api = to_api_error(error)
        yield CompletionWriter.error_event(api)
    finally:
        ticket.close()


def _record(metrics: ServeMetrics, parts: list[Part], started: float) -> None:
    metrics.latency.observe(time.perf_counter() - started)
    end = next((p for p in parts if p.kind == "end"), None)
    if end is not None and end.collab is not None:
        metrics.record_trace(end.collab)


class _TicketedEventSource(EventSourceResponse):
    """An SSE response that gives its admission ticket back however the response ends (also
    when the client left before the stream began)."""

    def __init__(self, content: Any, ticket: Ticket, **options: Any) -> None:
        super().__init__(content, **options)
        self.ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.close()


class _StatusCounter:
    """Counts chat completion responses by status (pure ASGI: streams pass untouched)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != COMPLETIONS:
            await self.app(scope, receive, send)
            return

        async def counting(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting)


class _Health:
    """Both models answer a one-token request; the result is reused for ``ttl`` seconds."""

    def __init__(self, small: Backend, large: Backend, ttl: float) -> None:
        self.backends = {"small": small, "large": large}
        self.ttl = ttl
        self.checked_at = -float("inf")
        self.last: tuple[bool, dict[str, str]] = (False, {})
        self.lock = anyio.Lock()

    async def check(self) -> tuple[bool, dict[str, str]]:
        async with self.lock:
            if time.monotonic() - self.checked_at < self.ttl:
                return self.last
            detail = {}
            for role, backend in self.backends.items():
                detail[role] = await _probe(backend)
            self.last = (all(v == "ok" for v in detail.values()), detail)
            self.checked_at = time.monotonic()
            return self.last


async def _probe(backend: Backend) -> str:
    request = GenerateRequest(
        conversation_id="health-probe",
        messages=[{"role": "user", "content": "ping"}],
        max_tokens=1,
        sampling=Sampling(temperature=0.0, top_p=1.0),
    )
    try:
        with anyio.fail_after(30):
            await backend.generate(request)
        return "ok"
    except Exception as error:  # any failure means not ready; the type says which
        return f"unavailable: {type(error).__name__}"
    finally:
        with anyio.move_on_after(5):
            await release_conversation(backend, "health-probe")
