"""``collab-agent bench serve``: what the HTTP layer of ``collab-agent serve`` costs.

One model loaded once serves as both the small and the large model (default: the bundled 0.5B
on llama.cpp with one slot per client). ``--clients`` streaming clients send chat completions
to the server on 127.0.0.1 for ``--seconds``; then the same number of concurrent callers run
the same requests through `CollabChatModel.astream` in-process on the same backend. The two
phases alternate for ``--rounds`` rounds (server and clients share one event loop, so the
clients' own parsing counts against the HTTP side) and the medians are reported.

JSON keys: ``clients``, ``seconds``, ``requests``, ``errors``, ``requests_per_s``,
``latency_p50_s``, ``latency_p99_s``, ``ttft_p50_s``, ``ttft_p99_s``, ``tokens_per_s``,
``tokens_per_s_in_process``, ``http_vs_in_process``; also ``rounds`` (per-round figures of
both phases), ``http_vs_in_process_min`` / ``_max``, ``model``, ``policy``, ``budget``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from collab_agent.cli.backends import run_then_close
from collab_agent.cli.options import JsonOption, ThreadsOption

QUESTIONS = tuple(
    f"What is {a} + {b}? Answer with the number."
    for a, b in [(17, 25), (3, 9), (120, 45), (8, 8), (61, 14), (7, 93), (250, 250), (11, 12)]
)


@dataclass
class Phase:
    """What one phase measured."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


Ask = Callable[[str, Callable[[], None]], Awaitable[int | None]]
"""One request: send ``question``, call the second argument at the first text, return the
generated tokens, or ``None`` for an error."""


async def _phase(clients: int, seconds: float, ask: Ask) -> Phase:
    """``clients`` callers, each asking one question after another until ``seconds`` have passed."""
    import anyio

    phase = Phase()
    deadline = time.monotonic() + seconds

    async def worker(index: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            question = QUESTIONS[(index + n) % len(QUESTIONS)]
            n += 1
            started = time.perf_counter()
            first: list[float] = []

            def on_text(started: float = started, first: list[float] = first) -> None:
                if not first:
                    first.append(time.perf_counter() - started)

            tokens = await ask(question, on_text)
            if tokens is None:
                phase.errors += 1
                continue
            phase.latencies.append(time.perf_counter() - started)
            phase.ttfts.extend(first)
            phase.tokens += tokens

    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for i in range(clients):
            group.start_soon(worker, i)
    phase.seconds = time.perf_counter() - started
    return phase


async def _http_phase(base_url: str, clients: int, seconds: float, body: dict[str, Any]) -> Phase:
    """``clients`` streaming clients, each sending requests until ``seconds`` have passed."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def ask(question: str, on_text: Callable[[], None]) -> int | None:
            request = {**body, "messages": [{"role": "user", "content": question}]}
            tokens = 0
            try:
                async with client.stream(
                    "POST", f"{base_url}/chat/completions", json=request
                ) as response:
                    if response.status_code != 200:
                        await response.aread()
                        return None
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            return tokens
                        chunk = json.loads(data)
                        if "error" in chunk:
                            return None
                        delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
                        if delta.get("reasoning_content") or delta.get("content"):
                            on_text()
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
            except httpx.HTTPError:
                return None
            return None  # the stream ended without [DONE]

        return await _phase(clients, seconds, ask)


async def _in_process_phase(model: Any, clients: int, seconds: float, options: dict) -> Phase:
    """The same requests through `CollabChatModel.astream`, ``clients`` at once."""

    async def ask(question: str, on_text: Callable[[], None]) -> int | None:
        tokens = 0
        try:
            async for chunk in model.astream(question, **options):
                if chunk.content or chunk.additional_kwargs.get("reasoning_content"):
                    on_text()
                if chunk.usage_metadata:
                    tokens = chunk.usage_metadata["output_tokens"]
        except Exception:  # counted, like an HTTP error
            return None
        return tokens

    return await _phase(clients, seconds, ask)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_bench(
    models: str = "llamacpp",
    clients: int = 64,
    seconds: float = 60.0,
    rounds: int = 1,
    budget: int = 64,
    max_tokens: int = 32,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return the figures (the JSON object of ``--json``)."""
    import anyio
    import uvicorn

    from collab_agent.backends.specs import resolve_pair
    from collab_agent.policies.trigreason import TrigReason
    from collab_agent.serve.app import create_app
    from collab_agent.serve.config import ServeConfig
    from collab_agent.serve.launch import load_served_backend

    spec = resolve_pair(models, None, None)[0]
    print(f"bench serve: loading {spec} (both models) ...", file=sys.stderr)
    backend = load_served_backend(spec, clients, threads, "OPENAI_API_KEY")
    policy = "trigreason"
    config = ServeConfig(
        policies={policy: TrigReason(priming_steps=1)},
        max_in_flight=clients,
        max_queued=clients,
        max_per_key=clients,
        temperature=0.0,
        reasoning_budget=budget,
    )
    app = create_app(config, backend, backend, close_backends=False)
    model = app.state.engine.models[policy]
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    body = {
        "model": policy,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
    }

    async def work() -> list[tuple[Phase, Phase]]:
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        results = []
        async with anyio.create_task_group() as group:
            group.start_soon(server.serve)
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
                await anyio.sleep(0.05)
            await _http_phase(base_url, min(clients, 2), 1.0, body)  # warm-up
            for r in range(rounds):
                http = await _http_phase(base_url, clients, seconds, body)
                direct = await _in_process_phase(
                    model, clients, seconds, {"max_tokens": max_tokens}
                )
                print(
                    f"  round {r + 1}: http {http.tokens_per_s:.1f} tok/s "
                    f"({len(http.latencies)} requests, {http.errors} errors), in-process "
                    f"{direct.tokens_per_s:.1f} tok/s ({len(direct.latencies)} requests)",
                    file=sys.stderr,
                )
                results.append((http, direct))
            server.should_exit = True
        return results

    results = run_then_close(work, backend)
    http_all = Phase(
        seconds=sum(h.seconds for h, _ in results),
        latencies=[x for h, _ in results for x in h.latencies],
        ttfts=[x for h, _ in results for x in h.ttfts],
        tokens=sum(h.tokens for h, _ in results),
        errors=sum(h.errors for h, _ in results),
    )
    ratios = [h.tokens_per_s / d.tokens_per_s if d.tokens_per_s else 0.0 for h, d in results]
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": len(http_all.latencies) + http_all.errors,
        "errors": http_all.errors,
        "requests_per_s": round(len(http_all.latencies) / http_all.seconds, 3),
        "latency_p50_s": _round(_percentile(http_all.latencies, 0.5)),
        "latency_p99_s": _round(_percentile(http_all.latencies, 0.99)),
        "ttft_p50_s": _round(_percentile(http_all.ttfts, 0.5)),
        "ttft_p99_s": _round(_percentile(http_all.ttfts, 0.99)),
        "tokens_per_s": round(statistics.median(h.tokens_per_s for h, _ in results), 3),
        "tokens_per_s_in_process": round(statistics.median(d.tokens_per_s for _, d in results), 3),
        "http_vs_in_process": round(statistics.median(ratios), 3),
        "http_vs_in_process_min": round(min(ratios), 3),
        "http_vs_in_process_max": round(max(ratios), 3),
        "rounds": [
            {
                "http_tokens_per_s": round(h.tokens_per_s, 3),
                "http_requests": len(h.latencies),
                "in_process_tokens_per_s": round(d.tokens_per_s, 3),
                "in_process_requests": len(d.latencies),
                "in_process_errors": d.errors,
                "in_process_latency_p50_s": _round(_percentile(d.latencies, 0.5)),
                "in_process_ttft_p50_s": _round(_percentile(d.ttfts, 0.5)),
            }
            for h, d in results
        ],
        "model": spec,
        "policy": "trigreason (priming 1), small = large",
        "budget": budget,
        "max_tokens": max_tokens,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def register(bench: typer.Typer) -> None:
    """Add ``serve`` to the ``bench`` sub-app."""

    @bench.command("serve")
    def serve(
        models: Annotated[
            str, typer.Option("--models", help="llamacpp (default), bundled or tiny.")
        ] = "llamacpp",
        clients: Annotated[int, typer.Option(help="Concurrent streaming clients.")] = 64,
        seconds: Annotated[float, typer.Option(help="Seconds of each phase.")] = 60.0,
        rounds: Annotated[int, typer.Option(help="Alternating HTTP / in-process rounds.")] = 1,
        budget: Annotated[int, typer.Option(help="Reasoning tokens per request.")] = 64,
        max_tokens: Annotated[int, typer.Option(help="Answer tokens per request.")] = 32,
        threads: ThreadsOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Requests/s, latency and TTFT through the server, and its tokens/s against the same
        backend called in-process at the same concurrency."""
        from collab_agent.errors import ConfigError

        for name, value in (("--clients", clients), ("--rounds", rounds), ("--budget", budget)):
            if value <= 0:
                raise ConfigError(name, f"must be a positive integer, got {value}")
        if not 0 < seconds <= 3600:
            raise ConfigError("--seconds", f"must be in (0, 3600], got {seconds}")
        if models not in ("llamacpp", "bundled", "tiny"):
            raise ConfigError("--models", f"must be llamacpp, bundled or tiny, got {models!r}")
        figures = run_bench(models, clients, seconds, rounds, budget, max_tokens, threads)
        if as_json:
            print(json.dumps(figures))
            return
        print(
            f"{figures['requests']} requests ({figures['errors']} errors), "
            f"{figures['requests_per_s']:.2f}/s; latency p50 {figures['latency_p50_s']} s, "
            f"p99 {figures['latency_p99_s']} s; TTFT p50 {figures['ttft_p50_s']} s, "
            f"p99 {figures['ttft_p99_s']} s"
        )
        print(
            f"tokens/s: {figures['tokens_per_s']:.1f} over HTTP, "
            f"{figures['tokens_per_s_in_process']:.1f} in-process = "
            f"{figures['http_vs_in_process']:.2f}x"
        )
