"""Soak: 32 threads of sync and async calls through one `CollabChatModel` over a flaky server.

The large model is a fake OpenAI-compatible server on 127.0.0.1 (in this process, on its own
event loop) that fails 10% of requests: a 500, a stall past the request deadline, or a malformed
body (truncated JSON, ``choices: [null]``, a string message). The small model is in-process.
Threads call ``invoke``, ``asyncio.run(ainvoke)`` and ``batch`` in turn until the time is up.

Prints one JSON object: calls, answers, typed errors by type, untyped errors (must be 0), open
file descriptors and threads before and after (must be equal), peak RSS growth. Bounded: calls
start for ``--seconds`` (default 40), and the whole run ends within 60 s.

    collab-agent bench soak-reliability > benchmarks/results/soak_reliability.json
"""

from __future__ import annotations

import collections
import json
import os
import random
import resource
import sys
import threading
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from collab_agent.backends.base import GenerateRequest, Generation
from collab_agent.errors import CollabError, ConfigError

if TYPE_CHECKING:
    import asyncio

THREADS = 32
FAILURE_SHARE = 0.10
REQUEST_TIMEOUT_S = 2.0


def _body(text: str) -> bytes:
    return json.dumps(
        {
            "id": "soak",
            "object": "chat.completion",
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "stop_reason": "\n\n",  # vLLM names the stop string that ended the step
                }
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": 6, "total_tokens": 26},
        }
    ).encode()


FAULTS: list[tuple[str, int, bytes]] = [
    ("500", 500, b'{"error": "overloaded"}'),
    ("stall", 200, b""),
    ("truncated", 200, _body("2 + 2 = 4")[:40]),
    ("choices-null", 200, b'{"choices": [null]}'),
    ("message-string", 200, b'{"choices": [{"message": "4", "finish_reason": "stop"}]}'),
]


class FlakyServer:
    """HTTP/1.1 keep-alive server answering every request with a good step, except
    ``FAILURE_SHARE`` of them, which get one of `FAULTS` at random."""

    def __init__(self, seed: int = 0) -> None:
        self.random = random.Random(seed)
        self.requests = 0
        self.faults: collections.Counter[str] = collections.Counter()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio  # here, not at module level: `collab-agent --help` loads this module

        try:
            while await reader.readline():
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode().partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.requests += 1
                status, body = 200, _body("2 + 2 = 4")
                if self.random.random() < FAILURE_SHARE:
                    kind, status, body = self.random.choice(FAULTS)
                    self.faults[kind] += 1
                    # a stall outlasts the client's deadline; it ends when the client hangs up
                    if kind == "stall" and not await reader.read(1):
                        return
                head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


class SmallModel:
    """The small model: in-process, answers at once (the server is what is being soaked)."""

    name = "soak-small"

    async def generate(self, request: GenerateRequest) -> Generation:
        import asyncio

        await asyncio.sleep(0.001)
        return Generation(text="Final answer: 4", stop_reason="step", completion_tokens=4)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def soak_reliability(
    seconds: Annotated[float, typer.Option(help="How long calls start.")] = 40.0,
) -> None:
    """Soak: 32 threads of sync and async calls through one CollabChatModel over a server that
    fails 10% of requests; prints calls, typed and untyped errors, leaked descriptors."""
    if not 0 < seconds <= 45:
        raise ConfigError("--seconds", "must lie in (0, 45] so the run ends within 60 s")
    import asyncio

    from collab_agent.chat_model import CollabChatModel
    from collab_agent.policies.trigreason import TrigReason

    fds_before, threads_before, rss_before = open_fds(), threading.active_count(), peak_rss_mib()
    server = FlakyServer()
    ready = threading.Event()
    control: dict[str, Any] = {}

    async def serve() -> None:
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        server.port = listener.sockets[0].getsockname()[1]
        control["loop"], control["stop"] = asyncio.get_running_loop(), asyncio.Event()
        ready.set()
        async with listener:
            await control["stop"].wait()

    server_thread = threading.Thread(
        target=asyncio.run, args=(serve(),), name="flaky-server", daemon=True
    )
    server_thread.start()
    ready.wait(10)

    model = CollabChatModel(
        small=SmallModel(),
        large=f"openai:m@http://127.0.0.1:{server.port}/v1",
        policy=TrigReason(priming_steps=1),
        max_retries=1,
        backend_options={
            "mode": "chat-continue",
            "timeout": REQUEST_TIMEOUT_S,
            "backoff_s": 0.05,
            "max_backoff_s": 0.2,
        },
        on_large_unavailable="fail",
        timeout=8.0,
    )
    counts: collections.Counter[str] = collections.Counter()
    typed: collections.Counter[str] = collections.Counter()
    untyped: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def note(answers: list[Any], error: BaseException | None, calls: int) -> None:
        with lock:
            counts["calls"] += calls
            counts["answers"] += sum(str(getattr(a, "content", "")).endswith("4") for a in answers)
            if error is None:
                return
            bucket = typed if isinstance(error, CollabError) else untyped
            bucket[type(error).__name__] += 1

    def worker(index: int) -> None:
        turn = index
        while time.monotonic() < deadline:
            kind = turn % 3
            turn += 1
            calls = 3 if kind == 2 else 1
            try:
                if kind == 0:
                    answers = [model.invoke("What is 2 + 2?")]
                elif kind == 1:
                    answers = [asyncio.run(model.ainvoke("What is 2 + 2?"))]
                else:
                    results = model.batch(["What is 2 + 2?"] * 3, return_exceptions=True)
                    answers = [r for r in results if not isinstance(r, BaseException)]
                    for failure in (r for r in results if isinstance(r, BaseException)):
                        note([], failure, 0)
                note(answers, None, calls)
            except Exception as error:
                note([], error, calls)

    started = time.monotonic()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(max(1.0, 58.0 - (time.monotonic() - started)))
    hung = sum(thread.is_alive() for thread in workers)
    model.close()
    control["loop"].call_soon_threadsafe(control["stop"].set)
    server_thread.join(5)
    time.sleep(0.5)  # sockets the server closed last are released by now
    report = {
        "seconds": round(time.monotonic() - started, 1),
        "threads": THREADS,
        "server_requests": server.requests,
        "server_faults": dict(server.faults),
        "calls": counts["calls"],
        "answers": counts["answers"],
        "typed_errors": dict(typed),
        "untyped_errors": dict(untyped),
        "untyped_error_count": sum(untyped.values()),
        "hung_threads": hung,
        "open_fds": {"before": fds_before, "after": open_fds()},
        "threads_alive": {"before": threads_before, "after": threading.active_count()},
        "peak_rss_growth_mib": round(peak_rss_mib() - rss_before, 1),
    }
    print(json.dumps(report, indent=2))
    sys.stdout.flush()


def register(bench: typer.Typer) -> None:
    """Add ``soak-reliability`` to the ``bench`` sub-app."""
    bench.command("soak-reliability")(soak_reliability)


if __name__ == "__main__":
    from collab_agent.cli.entry import run_alone

    run_alone(soak_reliability)
