"""A client that leaves cancels its reasoning and frees its slot; SIGTERM drains the server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_harness import REASONING, free_port, scripted_server
from servers import wait_until

from collab_agent.testing import ScriptedBackend

QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]
BODY = {"model": "small-only", "messages": QUESTION}
ROOT = Path(__file__).resolve().parents[1]
EXITED_ON_SIGTERM = (0, -signal.SIGTERM)
"""uvicorn re-raises the signal after its graceful shutdown, so the exit status says SIGTERM."""


def test_disconnect_mid_stream_cancels_the_reasoning_and_frees_the_slot() -> None:
    small = ScriptedBackend(REASONING * 5, name="small", delay=3.0)
    with scripted_server(small=small, max_in_flight=1, max_queued=0) as server:
        with httpx.stream(
            "POST", server.base_url + "/chat/completions", json={**BODY, "stream": True}
        ) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert '"role": "assistant"' in first
            if server.admission.in_flight != 1:  # say how the stream ended, to tell why
                pytest.fail(f"the stream ended early: {[first, *lines]}")
            # leave while the small model is inside its (3 s) step
            assert wait_until(lambda: small.calls == 1, within_s=10)
        started = time.monotonic()
        assert wait_until(lambda: server.admission.in_flight == 0, within_s=2)
        assert time.monotonic() - started < 2.5  # at once, not after the 3 s step
        assert small.cancelled == 1
        fast = ScriptedBackend(REASONING, name="small")
        server.app.state.engine.models["small-only"].small = fast
        after = httpx.post(server.base_url + "/chat/completions", json=BODY, timeout=10)
    assert after.status_code == 200  # the only slot is free again


def test_disconnect_without_streaming_cancels_the_reasoning() -> None:
    small = ScriptedBackend(REASONING * 5, name="small", delay=3.0)
    with scripted_server(small=small) as server:
        with contextlib.suppress(httpx.ReadTimeout):
            httpx.post(server.base_url + "/chat/completions", json=BODY, timeout=0.5)
        assert wait_until(lambda: small.cancelled == 1, within_s=2)
        assert wait_until(lambda: server.admission.in_flight == 0, within_s=2)


SERVER_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from serve_harness import REASONING, scripted_config
    from collab_agent.serve import create_app
    from collab_agent.serve.command import serve_forever
    from collab_agent.testing import ScriptedBackend

    class Freed(ScriptedBackend):
        async def aclose(self):
            print("freed", self.name, flush=True)

    small = Freed(REASONING * 10, name="small", delay={delay})
    app = create_app(scripted_config(grace_s={grace}), small, Freed([], name="large"))
    serve_forever(app, "127.0.0.1", {port}, {grace})
    """
)


def _start(delay: float, grace: float) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    script = SERVER_SCRIPT.format(tests=str(ROOT / "tests"), delay=delay, grace=grace, port=port)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    root = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(root + "/v1/models", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_until(up, within_s=60), "the server did not start"
    return process, root


def _stream_in_thread(root: str) -> tuple[threading.Thread, dict, threading.Event]:
    result: dict = {"lines": []}
    first = threading.Event()

    def run() -> None:
        try:
            with httpx.stream(
                "POST", root + "/v1/chat/completions", json={**BODY, "stream": True}, timeout=30
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        result["lines"].append(line)
                        first.set()
        except httpx.HTTPError as error:
            result["error"] = error
        first.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result, first


@pytest.mark.slow  # a fresh interpreter: about 10 s on the shared CPU
def test_sigterm_lets_requests_in_flight_finish_then_frees_the_models() -> None:
    process, root = _start(delay=0.5, grace=20)
    try:
        thread, result, first = _stream_in_thread(root)
        assert first.wait(30)
        process.send_signal(signal.SIGTERM)
        thread.join(30)
        code = process.wait(30)
    finally:
        process.kill()
    output = process.stdout.read() if process.stdout else ""
    assert result["lines"][-1] == "data: [DONE]"
    assert any('"content": "4"' in line for line in result["lines"])
    assert code in EXITED_ON_SIGTERM
    assert "freed small" in output and "freed large" in output


@pytest.mark.slow  # a fresh interpreter: about 10 s on the shared CPU
def test_sigterm_cancels_what_outlasts_the_grace_period() -> None:
    process, root = _start(delay=30, grace=1)
    try:
        thread, result, first = _stream_in_thread(root)
        assert first.wait(30)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
        stopped = time.monotonic() - signalled
        thread.join(30)
    finally:
        process.kill()
    assert code in EXITED_ON_SIGTERM
    assert stopped < 10  # the grace period, not the 30 s step
    assert "data: [DONE]" not in result["lines"]
