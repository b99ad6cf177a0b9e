"""Faults against real servers on 127.0.0.1: every request ends within its bounds, typed.

Bound: ``(max_retries + 1) * timeout + backoffs`` (plus a little scheduling slack); nothing is
left behind: no open connection on the server side, no task in the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import pytest
from servers import SMOL, Reply, chat_body, scripted

from collab_agent.backends.base import GREEDY, GenerateRequest
from collab_agent.backends.llamacpp import LlamaCppServer
from collab_agent.backends.openai import (
    BackendConnectionError,
    BackendRateLimitError,
    BackendServerError,
    BackendTimeoutError,
    OpenAIBackend,
)
from collab_agent.errors import BackendUnavailableError

FAKE_KEY = "sk-fault-test-SECRET-0987654321"
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def request(**overrides: Any) -> GenerateRequest:
    fields: dict[str, Any] = {
        "conversation_id": "c",
        "messages": MESSAGES,
        "sampling": GREEDY,
        "max_tokens": 16,
    }
    fields.update(overrides)
    return GenerateRequest(**fields)


def other_tasks() -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_nothing_listening_fails_fast_as_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    backend = OpenAIBackend(
        "m",
        f"http://127.0.0.1:{free_port()}/v1",
        api_key=FAKE_KEY,
        mode="chat",
        max_retries=2,
        backoff_s=0.05,
    )
    start = time.perf_counter()
    with pytest.raises(BackendConnectionError) as caught:
        await backend.generate(request())
    await backend.aclose()
    assert time.perf_counter() - start < 10
    error = caught.value
    assert isinstance(error, BackendUnavailableError)
    assert "3 attempt(s)" in str(error)
    assert caplog.text.count("retrying") == 2
    assert FAKE_KEY not in str(error) and FAKE_KEY not in caplog.text


async def test_500_then_200_is_retried_to_success() -> None:
    async with scripted(
        Reply(status=500, body={"error": "boom"}), Reply(body=chat_body("ok"))
    ) as server:
        backend = OpenAIBackend("m", server.base_url, mode="chat", max_retries=2, backoff_s=0.05)
        generation = await backend.generate(request())
        await backend.aclose()
        assert await server.wait_idle()
    assert generation.text == "ok"
    assert len(server.requests) == 2


async def test_persistent_500_is_unavailable_after_bounded_retries() -> None:
    async with scripted(Reply(status=503, body={"error": "down"})) as server:
        backend = OpenAIBackend("m", server.base_url, mode="chat", max_retries=3, backoff_s=0.02)
        with pytest.raises(BackendServerError) as caught:
            await backend.generate(request())
        await backend.aclose()
    assert isinstance(caught.value, BackendUnavailableError)
    assert len(server.requests) == 4


async def test_stall_past_the_timeout_ends_within_timeout_plus_retries() -> None:
    timeout, retries, backoff = 0.5, 1, 0.05
    async with scripted(Reply(stall_s=float("inf"))) as server:
        backend = OpenAIBackend(
            "m",
            server.base_url,
            mode="chat",
            timeout=timeout,
            max_retries=retries,
            backoff_s=backoff,
        )
        before = other_tasks()
        start = time.perf_counter()
        with pytest.raises(BackendTimeoutError):
            await backend.generate(request())
        elapsed = time.perf_counter() - start
        await backend.aclose()
        assert await server.wait_idle(), "the stalled connections were not closed"
        assert other_tasks() - before == set()
    bound = (retries + 1) * timeout + retries * 2 * backoff
    assert bound - 0.1 < elapsed < bound + 2.0  # slack for a loaded machine
    assert len(server.requests) == retries + 1


async def test_429_honours_retry_after() -> None:
    limited = Reply(status=429, body={"error": "slow down"}, headers={"Retry-After": "1"})
    async with scripted(limited, Reply(body=chat_body("ok"))) as server:
        backend = OpenAIBackend("m", server.base_url, mode="chat", max_retries=2, backoff_s=0.01)
        start = time.perf_counter()
        generation = await backend.generate(request())
        elapsed = time.perf_counter() - start
        await backend.aclose()
    assert generation.text == "ok"
    assert 1.0 <= elapsed < 4.0  # waited the server's 1 s, not the 10 ms backoff


async def test_429_asking_too_long_a_wait_gives_up_at_once() -> None:
    limited = Reply(status=429, body={"error": "quota"}, headers={"Retry-After": "120"})
    async with scripted(limited) as server:
        backend = OpenAIBackend(
            "m", server.base_url, mode="chat", max_retries=3, max_retry_after_s=5
        )
        start = time.perf_counter()
        with pytest.raises(BackendRateLimitError) as caught:
            await backend.generate(request())
        await backend.aclose()
    assert time.perf_counter() - start < 3
    assert caught.value.retry_after == 120
    assert len(server.requests) == 1


async def test_dropped_connection_is_a_connection_error() -> None:
    async with scripted(Reply(drop=True)) as server:
        backend = OpenAIBackend("m", server.base_url, mode="chat", max_retries=1, backoff_s=0.01)
        with pytest.raises(BackendConnectionError):
            await backend.generate(request())
        await backend.aclose()
    assert len(server.requests) == 2


async def test_cancellation_closes_the_http_request() -> None:
    async with scripted(Reply(stall_s=float("inf"))) as server:
        backend = OpenAIBackend("m", server.base_url, mode="chat", timeout=30)
        before = other_tasks()
        task = asyncio.create_task(backend.generate(request()))
        await server.wait_request()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await server.wait_idle(2.0), "cancelling left the HTTP connection open"
        await backend.aclose()
        assert other_tasks() - before == set()


@pytest.mark.server
async def test_server_killed_mid_request_is_unavailable_quickly() -> None:
    pytest.importorskip("xllamacpp")
    server = LlamaCppServer(f"bundled:{SMOL}", n_parallel=1, ctx_size=2048, threads=1)
    await server.astart()
    try:
        backend = OpenAIBackend(
            "m", server.base_url, mode="completions", max_retries=2, backoff_s=0.1, timeout=20
        )
        task = asyncio.create_task(backend.generate(request(max_tokens=1500, stop=())))
        await asyncio.sleep(1.0)
        assert not task.done()
        start = time.perf_counter()
        server.kill()
        with pytest.raises(BackendUnavailableError) as caught:
            await task
        assert time.perf_counter() - start < 15
        assert isinstance(caught.value, (BackendConnectionError, BackendServerError))
        await backend.aclose()
    finally:
        server.stop()
    assert not server.running


async def test_degrade_mode_answers_with_the_degraded_steps_counted() -> None:
    from collab_agent.policies import TrigReason
    from collab_agent.reasoner import Reasoner
    from collab_agent.testing import ScriptedBackend

    small = ScriptedBackend(["Two plus three is five.", "Final answer: 5"], name="srm")
    large = OpenAIBackend(
        "lrm", f"http://127.0.0.1:{free_port()}/v1", mode="chat", max_retries=1, backoff_s=0.01
    )
    reasoner = Reasoner(
        small, large, policy=TrigReason(priming_steps=1), on_large_unavailable="degrade"
    )
    trace = await reasoner.run(MESSAGES)
    await large.aclose()
    assert trace.answer == "5"
    assert trace.degraded_steps == 1 and trace.steps[0].degraded
    assert {s.author for s in trace.steps} == {"small"}


async def test_fail_mode_raises_the_typed_error() -> None:
    from collab_agent.policies import TrigReason
    from collab_agent.reasoner import Reasoner
    from collab_agent.testing import ScriptedBackend

    large = OpenAIBackend(
        "lrm", f"http://127.0.0.1:{free_port()}/v1", mode="chat", max_retries=0, api_key=FAKE_KEY
    )
    reasoner = Reasoner(ScriptedBackend(["x"]), large, policy=TrigReason(priming_steps=1))
    with pytest.raises(BackendConnectionError) as caught:
        await reasoner.run(MESSAGES)
    await large.aclose()
    assert FAKE_KEY not in str(caught.value)
