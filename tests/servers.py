"""Real servers on 127.0.0.1 for the backend tests.

- `ScriptedServer`: a small HTTP/1.1 server (asyncio streams) that answers each request with the
  next scripted action: a JSON reply with any status and headers, a stall, or a dropped
  connection. It counts requests and open connections, so tests can check that nothing leaks.
- fixtures starting llama.cpp's server (xllamacpp) on the bundled GGUF files, stopped after.
- `LlamaCppPythonServer`: llama-cpp-python's server, the legacy-dialect engine, the same way.

Export the fixtures with ``pytest_plugins = ["tests.servers"]`` in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from collab_agent.backends import bundled
from collab_agent.backends.llamacpp import LlamaCppServer

SMOL = "smollm2-135m-instruct"
QWEN_SMALL = "qwen2.5-coder-0.5b-instruct"
QWEN_LARGE = "qwen2.5-coder-1.5b-instruct"


# ============================================================================ scripted HTTP server
@dataclass
class Reply:
    """One scripted answer.

    Attributes:
        status: HTTP status.
        body: JSON body (``None``: the default completion body of the server).
        headers: extra headers (e.g. ``{"Retry-After": "1"}``).
        stall_s: seconds to wait before answering (``float('inf')``: never answer).
        drop: close the connection without answering.
        raw: the body's exact bytes instead of JSON (truncated or empty answers).
    """

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    stall_s: float = 0.0
    drop: bool = False
    raw: bytes | None = None


def chat_body(text: str = "Paris.", **extra: Any) -> dict[str, Any]:
    """A chat completion answer in OpenAI's format."""
    message = {"role": "assistant", "content": text, **extra.pop("message", {})}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": extra.pop("finish_reason", "stop"),
                     **extra.pop("choice", {})}],
        "usage": extra.pop("usage", {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}),
        **extra,
    }  # fmt: skip


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 replaying a script; the last reply repeats."""

    def __init__(self, *replies: Reply) -> None:
        self.script = list(replies) or [Reply()]
        self.requests: list[dict[str, Any]] = []
        self.open_connections = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self._changed = asyncio.Event()  # set on every new request and closed connection

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _next(self) -> Reply:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def wait_idle(self, within_s: float = 2.0) -> bool:
        """Wait until no client connection is open; whether that happened in time."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while self.open_connections:
                    self._changed.clear()
                    await self._changed.wait()
        return self.open_connections == 0

    async def wait_request(self, within_s: float = 5.0) -> None:
        """Wait until the server has received a request."""
        async with asyncio.timeout(within_s):
            while not self.requests:
                self._changed.clear()
                await self._changed.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                raw = await reader.readexactly(length) if length else b""
                self.requests.append(
                    {"method": method, "path": path, "headers": headers,
                     "json": json.loads(raw) if raw else None}
                )  # fmt: skip
                self._changed.set()
                reply = self._next()
                if reply.stall_s:
                    # stall, but notice a client that hangs up (read returns EOF)
                    stall = reply.stall_s if reply.stall_s != float("inf") else 3600.0
                    with contextlib.suppress(TimeoutError):
                        if not await asyncio.wait_for(reader.read(1), stall):
                            return
                if reply.drop:
                    return
                body = (
                    reply.raw
                    if reply.raw is not None
                    else json.dumps(reply.body if reply.body is not None else chat_body()).encode()
                )
                headers = {"Content-Type": "application/json", **reply.headers}
                head = [f"HTTP/1.1 {reply.status} X", f"Content-Length: {len(body)}"]
                head += [f"{k}: {v}" for k, v in headers.items()]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            self.open_connections -= 1
            self._changed.set()
            self._writers.discard(writer)
            writer.close()


@contextlib.asynccontextmanager
async def scripted(*replies: Reply) -> AsyncIterator[ScriptedServer]:
    async with ScriptedServer(*replies) as server:
        yield server


@contextlib.contextmanager
def threaded(*replies: Reply) -> Iterator[ScriptedServer]:
    """A `ScriptedServer` on its own event loop in a background thread, for sync callers
    (``invoke``, ``batch``, ``asyncio.run``) that would block a server on their own loop."""
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        async with ScriptedServer(*replies) as server:
            holder["server"], holder["stop"] = server, asyncio.Event()
            holder["loop"] = asyncio.get_running_loop()
            started.set()
            await holder["stop"].wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the scripted server did not start")
    try:
        yield holder["server"]
    finally:
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(10)


def wait_until(predicate: Any, within_s: float = 5.0) -> bool:
    """Poll ``predicate()`` from sync code until it is true or the time is up."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ============================================================================ llama.cpp fixtures
def _gguf_or_skip(name: str) -> str:
    if not bundled.is_installed(name):
        pytest.skip(f"bundled model {name} is not installed: {bundled.get(name).pip_command}")
    return f"bundled:{name}"


def _server(name: str, **options: Any) -> Iterator[LlamaCppServer]:
    pytest.importorskip("xllamacpp")
    server = LlamaCppServer(_gguf_or_skip(name), threads=1, **options)
    with server:
        yield server


@pytest.fixture(scope="session")
def smol_server() -> Iterator[LlamaCppServer]:
    """llama.cpp serving SmolLM2-135M (98 MB, starts in about a second), 2 slots of 2048."""
    yield from _server(SMOL, n_parallel=2, ctx_size=2048)


@pytest.fixture(scope="module")
def qwen_small_server() -> Iterator[LlamaCppServer]:
    """llama.cpp serving the bundled Qwen2.5-Coder-0.5B (Q4_K_M)."""
    yield from _server(QWEN_SMALL, n_parallel=1, ctx_size=4096)


@pytest.fixture(scope="module")
def qwen_large_server() -> Iterator[LlamaCppServer]:
    """llama.cpp serving the bundled Qwen2.5-Coder-1.5B (Q4_K_M)."""
    yield from _server(QWEN_LARGE, n_parallel=1, ctx_size=4096)


# ============================================================================ server processes
@dataclass
class ServerProcess:
    """An OpenAI-compatible server started as ``command(port)`` on a free loopback port, in its
    own process group, ready when ``GET {base_url}{ready_path}`` answers 200 within
    ``startup_timeout`` seconds, and stopped (the whole group: SIGTERM, then SIGKILL) on exit."""

    name: str = "server"
    startup_timeout: float = 120.0
    ready_path: str = "/models"
    env: dict[str, str] = field(default_factory=dict)
    base_url: str = ""
    process: subprocess.Popen[bytes] | None = None

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def __enter__(self) -> ServerProcess:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.log = tempfile.NamedTemporaryFile(prefix=f"{self.name}-", suffix=".log")
        self.process = subprocess.Popen(
            self.command(port),
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **self.env},
        )
        self.root_url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.root_url}/v1"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(
                    f"{self.base_url}{self.ready_path}", timeout=2
                ) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]

    def kill(self) -> None:
        """Stop the server at once (SIGKILL to its group), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def __exit__(self, *exc: object) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


# ============================================================================ llama-cpp-python
@dataclass
class LlamaCppPythonServer(ServerProcess):
    """``python -m llama_cpp.server`` (llama-cpp-python's OpenAI-compatible server). It serves one
    request at a time, sends legacy completions logprobs and ignores a trailing assistant
    message: the other dialect `OpenAIBackend` must read."""

    model_path: str = ""
    name: str = "llama-cpp-python"

    def command(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "llama_cpp.server",
            "--model", self.model_path,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--n_threads", "1",
            "--n_ctx", "2048",
            "--interrupt_requests", "false",
            "--logits_all", "true",  # prompt logprobs for echo (OpenAIBackend.score)
        ]  # fmt: skip


@pytest.fixture(scope="module")
def llama_cpp_python_server() -> Iterator[LlamaCppPythonServer]:
    """llama-cpp-python's server on SmolLM2-135M (``make install`` builds and caches its wheel)."""
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed")
    _gguf_or_skip(SMOL)
    with LlamaCppPythonServer(model_path=str(bundled.bundled_gguf(SMOL))) as server:
        yield server


# ============================================================================ vLLM
VLLM_PYTHON = Path(
    os.environ.get("COLLAB_VLLM_PYTHON", Path(__file__).parents[1] / ".venv-vllm/bin/python")
)
VLLM_MODEL = "qwen-small"


@dataclass
class VllmServer(ServerProcess):
    """vLLM's OpenAI-compatible server (its CPU build, in the venv ``make install-vllm`` builds)
    on the bundled Qwen2.5-Coder-0.5B in bf16, eager mode (no torch.compile: it starts in about a
    minute instead of five)."""

    model_path: str = ""
    name: str = "vllm"
    startup_timeout: float = 600.0
    ready_path: str = "/models"
    env: dict[str, str] = field(
        default_factory=lambda: {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
    )

    def command(self, port: int) -> list[str]:
        return [
            str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_path,
            "--served-model-name", VLLM_MODEL,
            "--dtype", "bfloat16",
            "--max-model-len", "4096",
            "--max-logprobs", "20",
            "--enforce-eager",
            "--host", "127.0.0.1",
            "--port", str(port),
        ]  # fmt: skip


@pytest.fixture(scope="session")
def vllm_server() -> Iterator[VllmServer]:
    """vLLM serving the bundled Qwen2.5-Coder-0.5B; skipped (failed under CI) without its venv."""
    if not VLLM_PYTHON.is_file():
        message = f"vLLM's venv is missing ({VLLM_PYTHON}); build it with `make install-vllm`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    _gguf_or_skip(QWEN_SMALL)
    with VllmServer(model_path=str(bundled.bundled_path(QWEN_SMALL))) as server:
        yield server
