"""A managed llama.cpp server: the spec ``llamacpp:bundled:NAME`` or ``llamacpp:PATH.gguf``.

llama.cpp's C++ server (continuous batching over ``n_parallel`` slots, prefix cache, 3-8x the
speed of transformers on a CPU) ships prebuilt in the ``xllamacpp`` package, which starts it
*inside* the calling process. `LlamaCppServer` runs it in a child process instead
(``python -m collab_agent.backends.llamacpp serve ...``) in its own process group, so that it can
be stopped cleanly and never outlives us:

- `stop` (or leaving the ``with``/``async with`` block, also on errors and Ctrl-C) sends SIGTERM
  to the whole group, then SIGKILL after a grace period;
- an ``atexit`` hook stops every server still running when the interpreter exits;
- the child asks Linux for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``, only when
  started from the main thread, since the signal follows the thread that forked) and also polls
  its parent pid, so even ``kill -9`` of the parent leaves no orphan.

The server listens on a free loopback port chosen by the OS; `start` waits until ``/health``
answers ``ok`` (with a deadline) and raises `BackendUnavailableError` with the log tail otherwise.

`LlamaCppBackend` is an `OpenAIBackend` bound to such a server (``mode="completions"`` with the
server's own chat template, exact llama.cpp logprobs and prefix cache), closing it on `aclose`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Any

from collab_agent import _checks
from collab_agent.backends.openai import OpenAIBackend
from collab_agent.errors import BackendUnavailableError, ConfigError

__all__ = ["LlamaCppBackend", "LlamaCppServer", "llamacpp_backend", "resolve_gguf"]

_LIVE: weakref.WeakSet[LlamaCppServer] = weakref.WeakSet()


def resolve_gguf(model: str | os.PathLike[str]) -> Path:
    """The GGUF file for ``bundled:NAME`` (joined and verified once) or a path.

    Raises:
        ConfigError: the path does not exist or is not a ``.gguf`` file.
        ModelNotInstalledError: a bundled model's packages are missing (the message gives pip).
    """
    text = str(model)
    if text.startswith("bundled:"):
        from collab_agent.backends import bundled

        return bundled.bundled_gguf(text.removeprefix("bundled:"))
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(
            "model_path", f"no GGUF file at {str(path)!r}; give a .gguf path or bundled:NAME"
        )
    return path


class LlamaCppServer:
    """llama.cpp's server for one GGUF model, in a child process on a free loopback port.

    Args:
        model_path: a ``.gguf`` file or ``bundled:NAME``.
        n_parallel: slots served at once (continuous batching).
        ctx_size: context window per slot, tokens (the server allocates ``n_parallel * ctx_size``).
        threads: CPU threads for generation and prompt processing. On a CPU shared with other
            busy processes use 1: llama.cpp's threads meet at a barrier after every operation,
            and when the OS deschedules one of them decoding slows by an order of magnitude
            (README, "Model specs", gives the figures).
        poll: how hard llama.cpp's threads busy-wait for work, 0-100 (llama.cpp's default is
            50). 0 sleeps instead: on a shared, oversubscribed CPU spinning threads starve each
            other and decoding slows by an order of magnitude.
        port: a fixed port; ``None`` lets the OS choose a free one.
        host: the address to listen on (loopback by default).
        alias: the model id the server reports (default: the file name without ``.gguf``).
        startup_timeout: seconds to wait for ``/health`` to answer.
        log_path: where the server's log goes (default: a temporary file, removed on stop).

    Use as ``with LlamaCppServer(path) as server:`` / ``async with ...`` or call `start` and
    `stop`; ``base_url`` is the OpenAI-compatible root (``http://127.0.0.1:PORT/v1``).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_parallel: int = 2,
        ctx_size: int = 8192,
        threads: int = 2,
        poll: int = 0,
        port: int | None = None,
        host: str = "127.0.0.1",
        alias: str | None = None,
        startup_timeout: float = 120.0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model_path = resolve_gguf(model_path)
        self.n_parallel = _checks.positive_int("n_parallel", n_parallel)
        self.ctx_size = _checks.positive_int("ctx_size", ctx_size)
        self.threads = _checks.positive_int("threads", threads)
        self.poll = int(_checks.in_range("poll", poll, 0, 100))
        if port is not None and (not isinstance(port, int) or not 0 <= port < 65536):
            raise ConfigError("port", f"must be an integer in [0, 65535] or None, got {port!r}")
        self.port = port or 0
        self.host = host
        self.alias = alias or self.model_path.name.removesuffix(".gguf")
        self.startup_timeout = _checks.in_range(
            "startup_timeout", startup_timeout, 0.0, 3600.0, low_open=True
        )
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else None
        self._process: subprocess.Popen[bytes] | None = None
        self._ready_file: Path | None = None
        self.url: str | None = None

    def __repr__(self) -> str:
        state = f"pid={self.pid}, url={self.url!r}" if self.running else "stopped"
        return f"LlamaCppServer({str(self.model_path)!r}, n_parallel={self.n_parallel}, {state})"

    # ------------------------------------------------------------------ state
    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1`` once started."""
        if self.url is None:
            raise BackendUnavailableError(
                f"{self!r}: not started; call start() or use it as a context manager"
            )
        return f"{self.url}/v1"

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's log (for error messages)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    # ------------------------------------------------------------------ starting
    def _spawn(self) -> None:
        if self.running:
            return
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="collab-agent-llamacpp-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        fd, ready = tempfile.mkstemp(prefix="collab-agent-llamacpp-", suffix=".ready")
        os.close(fd)
        self._ready_file = Path(ready)
        self._ready_file.unlink()
        command = [
            sys.executable, "-m", "collab_agent.backends.llamacpp", "serve",
            "--model", str(self.model_path),
            "--host", self.host,
            "--port", str(self.port),
            "--n-parallel", str(self.n_parallel),
            "--ctx-size", str(self.ctx_size),
            "--threads", str(self.threads),
            "--poll", str(self.poll),
            "--alias", self.alias,
            "--ready-file", str(self._ready_file),
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        if threading.current_thread() is threading.main_thread():
            command.append("--pdeathsig")
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() kills the whole group
                close_fds=True,
            )
        _LIVE.add(self)

    def _check_ready(self) -> bool:
        """Whether the server answers ``/health``; raises if the child died."""
        assert self._process is not None and self._ready_file is not None
        code = self._process.poll()
        if code is not None:
            tail = self.log_tail()
            self._cleanup_files()
            raise BackendUnavailableError(
                f"llama.cpp server for {self.model_path.name} exited with code {code} while "
                f"starting; log tail:\n{tail}"
            )
        if self.url is None:
            if not self._ready_file.exists():
                return False
            text = self._ready_file.read_text().strip()
            if not text:
                return False
            self.url = text.rstrip("/")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return bool(json.loads(response.read() or b"{}").get("status") == "ok")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _fail_start(self) -> None:
        tail = self.log_tail()
        self.stop()
        raise BackendUnavailableError(
            f"llama.cpp server for {self.model_path.name} did not answer /health within "
            f"startup_timeout={self.startup_timeout}s; log tail:\n{tail}"
        )

    def start(self) -> LlamaCppServer:
        """Start the server and block until it answers (at most ``startup_timeout`` seconds)."""
        self._spawn()
        deadline = time.monotonic() + self.startup_timeout
        try:
            while not self._check_ready():
                if time.monotonic() > deadline:
                    self._fail_start()
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    async def astart(self) -> LlamaCppServer:
        """`start` without blocking the event loop while the model loads."""
        import anyio

        self._spawn()
        deadline = time.monotonic() + self.startup_timeout
        try:
            while not await anyio.to_thread.run_sync(self._check_ready):
                if time.monotonic() > deadline:
                    self._fail_start()
                await anyio.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    # ------------------------------------------------------------------ stopping
    def _cleanup_files(self) -> None:
        if self._ready_file is not None:
            self._ready_file.unlink(missing_ok=True)
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds; idempotent."""
        process, self._process = self._process, None
        self.url = None
        _LIVE.discard(self)
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=grace)
            # anything else left in the group (there should be nothing)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        self._cleanup_files()

    def kill(self) -> None:
        """SIGKILL the process group at once (for fault tests); `stop` still cleans up."""
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=10)

    async def aclose(self) -> None:
        import anyio

        await anyio.to_thread.run_sync(self.stop)

    def __enter__(self) -> LlamaCppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> LlamaCppServer:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if self._process is not None and self._process.poll() is None:
                os.killpg(self._process.pid, signal.SIGKILL)


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(grace=2.0)


class LlamaCppBackend(OpenAIBackend):
    """An `OpenAIBackend` on a `LlamaCppServer` it starts at once and stops on `aclose`.

    ``LlamaCppBackend("bundled:qwen2.5-coder-1.5b-instruct")`` is what the spec
    ``llamacpp:bundled:qwen2.5-coder-1.5b-instruct`` builds. Server options (``n_parallel``,
    ``ctx_size``, ``threads``, ``port``, ``startup_timeout``) go to the server, the rest to
    `OpenAIBackend` (``timeout``, ``max_retries``, ``price``, ``on_unavailable``, ...). The mode is
    ``"completions"`` with the server's chat template unless ``tokenizer``/``mode`` say otherwise,
    and the per-attempt ``timeout`` defaults to 600 s (a local CPU server shared with other work
    can be slow; a remote API keeps `OpenAIBackend`'s 60 s).
    """

    @property
    def can_score(self) -> bool:
        """llama.cpp's server ignores ``echo``: it returns no prompt logprobs to score a text."""
        return False

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        n_parallel: int = 2,
        ctx_size: int = 8192,
        threads: int = 2,
        port: int | None = None,
        startup_timeout: float = 120.0,
        server: LlamaCppServer | None = None,
        **options: Any,
    ) -> None:
        own = server is None
        if server is None:
            server = LlamaCppServer(
                model,
                n_parallel=n_parallel,
                ctx_size=ctx_size,
                threads=threads,
                port=port,
                startup_timeout=startup_timeout,
            )
        if not server.running:
            server.start()
        try:
            options.setdefault("mode", "completions")
            options.setdefault("timeout", 600.0)  # a local CPU server under load can be slow
            options.setdefault("name", f"llamacpp:{server.alias}")
            super().__init__(server.alias, server.base_url, None, **options)
        except BaseException:
            if own:
                server.stop()
            raise
        self.llama_server = server
        self._owns_server = own
        self.known_dialect = "llama.cpp"  # with mode="completions" it is never probed
        self._model_source = (
            str(model) if str(model).startswith("bundled:") else str(server.model_path)
        )
        if self.context_window is None:
            self.context_window = server.ctx_size  # per slot: what one conversation may use

    def local_tokenizer(self) -> Any:
        """The ``tokenizer=`` given, else the tokenizer inside the GGUF file (offline)."""
        given = super().local_tokenizer()
        if given is not None:
            return given
        from collab_agent.backends.gguf import gguf_tokenizer

        return gguf_tokenizer(self._model_source)

    async def aclose(self) -> None:
        """Close the HTTP pool and stop the server (when this backend started it)."""
        try:
            await super().aclose()
        finally:
            if self._owns_server:
                await self.llama_server.aclose()


def llamacpp_backend(target: str, **options: Any) -> LlamaCppBackend:
    """The backend of the spec ``llamacpp:TARGET`` (``bundled:NAME`` or ``PATH.gguf``).

    ``options`` go to `LlamaCppBackend` (server options and `OpenAIBackend` options)."""
    if not target:
        raise ConfigError("model spec", "llamacpp: needs bundled:NAME or a PATH.gguf")
    return LlamaCppBackend(target, **options)


# ============================================================================ the child process
def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(0.5)


def _serve(args: argparse.Namespace) -> None:
    """Run in the child: start xllamacpp's server, report its URL, wait for a signal."""
    if args.pdeathsig and sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != args.parent_pid:  # the parent died before prctl took effect
        os._exit(0)
    threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}
    params.n_parallel = args.n_parallel
    params.n_ctx = args.ctx_size * args.n_parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.cpuparams.poll = args.poll
    params.cpuparams_batch.poll = args.poll
    params.hostnames = [args.host]
    params.port = args.port
    params.cont_batching = True
    params.cache_prompt = True
    params.warmup = False
    server = xllamacpp.Server(params)
    address = str(server.listening_address)
    tmp = Path(args.ready_file + ".tmp")
    tmp.write_text(address + "\n")
    os.replace(tmp, args.ready_file)
    print(f"collab-agent: llama.cpp server ready at {address}", flush=True)
    while not stop.wait(0.5):
        pass
    os._exit(0)  # skip interpreter teardown: nothing to flush, and the group is being killed


def main(argv: list[str] | None = None) -> None:
    """``python -m collab_agent.backends.llamacpp serve --model PATH ...`` (used by the parent)."""
    parser = argparse.ArgumentParser(prog="python -m collab_agent.backends.llamacpp")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run llama.cpp's server for one GGUF model")
    serve.add_argument("--model", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--n-parallel", type=int, default=2)
    serve.add_argument("--ctx-size", type=int, default=8192)
    serve.add_argument("--threads", type=int, default=2)
    serve.add_argument("--poll", type=int, default=0)
    serve.add_argument("--alias", default="model")
    serve.add_argument("--ready-file", required=True)
    serve.add_argument("--parent-pid", type=int, required=True)
    serve.add_argument("--pdeathsig", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "serve":
        _serve(args)


if __name__ == "__main__":
    main()
