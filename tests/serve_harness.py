"""Run a `collab-agent serve` app in-process: real uvicorn on 127.0.0.1, a free port, its own
event loop in a background thread, so sync clients (the OpenAI SDK, ChatOpenAI) can call it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from collab_agent.policies.fixed import LargeOnly, SmallOnly
from collab_agent.serve import ServeConfig, create_app
from collab_agent.testing import ScriptedBackend

REASONING = ["Two plus two is four.", "Final answer: 4"]
"""One small-only conversation: a reasoning step, then a step that ends with the answer."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningServer:
    def __init__(self, app: Any, port: int) -> None:
        self.app, self.port = app, port
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.root = f"http://127.0.0.1:{port}"

    @property
    def admission(self) -> Any:
        return self.app.state.admission


@contextlib.contextmanager
def running(app: Any) -> Iterator[RunningServer]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield RunningServer(app, port)
    finally:
        server.should_exit = True
        thread.join(20)


def scripted_config(**overrides: Any) -> ServeConfig:
    options: dict[str, Any] = {
        "policies": {"small-only": SmallOnly(), "large-only": LargeOnly()},
        "temperature": 0.0,
    }
    options.update(overrides)
    return ServeConfig(**options)


@contextlib.contextmanager
def scripted_server(
    small: ScriptedBackend | None = None,
    large: ScriptedBackend | None = None,
    **overrides: Any,
) -> Iterator[RunningServer]:
    """A server over scripted models; by default each small-only request reads two steps."""
    small = small or ScriptedBackend(REASONING * 100, name="small")
    large = large or ScriptedBackend(REASONING * 100, name="large")
    with running(create_app(scripted_config(**overrides), small, large)) as server:
        yield server
