"""Production faults: an app's traffic and a flaky server against the chat model and backends.

Each test is one failure that was seen (keys crossing models, sockets leaking per sync call,
threads deadlocking on a shared limiter, degrade mode losing its answer, malformed answers and
headers escaping untyped, orphan batch tasks, Ctrl-C, untyped timeouts, unchecked inputs, secrets
reachable from errors). Servers are real HTTP servers on 127.0.0.1; every test is bounded.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import threading
import time
from typing import Any

import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from servers import Reply, chat_body, scripted, threaded, wait_until

from collab_agent.backends.base import GREEDY, GenerateRequest, Generation
from collab_agent.backends.openai import BackendProtocolError, OpenAIBackend
from collab_agent.breaker import CircuitBreaker
from collab_agent.chat_model import CollabChatModel
from collab_agent.errors import (
    BackendUnavailableError,
    CallTimeoutError,
    CollabError,
    ConfigError,
    InvalidMessagesError,
)
from collab_agent.limits import LimitedBackend
from collab_agent.policies.fixed import LargeOnly, SmallOnly
from collab_agent.testing import ScriptedBackend

KEY_A = "sk-model-A-secret-111111"
KEY_B = "sk-model-B-secret-222222"
ANSWER = chat_body("Final answer: 4")
REASONED = "2 + 2 = 4\n\nFinal answer: 4"


class Steady:
    """A backend that always writes the same text (any number of calls, any thread)."""

    def __init__(self, text: str = "Final answer: 4", *, delay: float = 0.0, name: str = "srm"):
        self.text, self.delay, self.name = text, delay, name
        self.calls = 0
        self._lock = threading.Lock()

    async def generate(self, request: GenerateRequest) -> Generation:
        with self._lock:
            self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return Generation(text=self.text, stop_reason="step", completion_tokens=3)


def spec(url: str) -> str:
    return f"openai:m@{url}"


def server_model(url: str, **fields: Any) -> CollabChatModel:
    """A chat model whose large model is the server at ``url`` (no probe: chat-continue)."""
    options = {"mode": "chat-continue", "backoff_s": 0.01, "max_backoff_s": 0.02}
    fields.setdefault("small", Steady())
    fields.setdefault("policy", LargeOnly())
    return CollabChatModel(large=spec(url), backend_options=options, **fields)


def backend_at(url: str, **options: Any) -> OpenAIBackend:
    return OpenAIBackend("m", url, **({"mode": "chat", "backoff_s": 0.01} | options))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def request(**overrides: Any) -> GenerateRequest:
    fields: dict[str, Any] = {
        "conversation_id": "c",
        "messages": [{"role": "user", "content": "2 + 2?"}],
        "sampling": GREEDY,
        "max_tokens": 8,
    }
    return GenerateRequest(**(fields | overrides))


# ============================================================================ 1. keys
async def test_a_second_model_with_another_api_key_sends_its_own_key() -> None:
    async with scripted(Reply(body=ANSWER)) as server:
        for key in (KEY_A, KEY_B):
            async with server_model(server.base_url, api_key=key) as model:
                assert (await model.ainvoke("2 + 2?")).content == "4"
        sent = [r["headers"]["authorization"] for r in server.requests]
    assert sent == [f"Bearer {KEY_A}", f"Bearer {KEY_B}"]


# ============================================================================ 2. sockets
def test_sync_calls_and_asyncio_run_leave_no_socket_open() -> None:
    with threaded(Reply(body=ANSWER)) as server:
        model = server_model(server.base_url)
        model.invoke("warm up")  # imports, thread pools: whatever stays for the process
        assert wait_until(lambda: server.open_connections == 0)
        before, threads = open_fds(), set(threading.enumerate())
        for _ in range(4):
            assert model.invoke("2 + 2?").content == "4"
        assert [m.content for m in model.batch(["a", "b", "c"])] == ["4"] * 3
        for _ in range(3):
            assert asyncio.run(model.ainvoke("2 + 2?")).content == "4"
        # a leak never recovers; a loaded machine can take seconds to end a finished thread
        assert wait_until(lambda: server.open_connections == 0, within_s=30)
        # no file or thread the calls opened is left (an earlier test's may close meanwhile)
        assert wait_until(lambda: open_fds() <= before, within_s=30), (open_fds(), before)
        assert wait_until(lambda: set(threading.enumerate()) <= threads, within_s=30), (
            set(threading.enumerate()) - threads
        )
        assert server.connections >= 10  # one per call's loop, each closed with it


async def test_the_chat_model_closes_the_backends_it_built() -> None:
    async with scripted(Reply(body=ANSWER)) as server:
        async with server_model(server.base_url) as model:
            await model.ainvoke("2 + 2?")
            assert server.open_connections == 1  # kept alive between calls of this loop
        assert await server.wait_idle()


# ============================================================================ 3. limiter
def test_limited_backend_shared_by_20_threads_answers_all_without_deadlock() -> None:
    small = LimitedBackend(Steady(delay=0.02), capacity=2)
    model = CollabChatModel(small=small, large=Steady(name="lrm"), policy=SmallOnly())
    answers: list[str] = []
    threads = [
        threading.Thread(target=lambda: answers.append(str(model.invoke("2 + 2?").content)))
        for _ in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert answers == ["4"] * 20
    assert [m.content for m in model.batch(["q"] * 12, {"max_concurrency": 6})] == ["4"] * 12
    assert (small.limiter.in_use, small.limiter.waiting, small.limiter.peak_in_use) == (0, 0, 2)


# ============================================================================ 4. degrade
async def test_degrade_with_a_call_timeout_returns_the_small_answer_not_a_timeout() -> None:
    async with (
        scripted(Reply(stall_s=float("inf"))) as server,
        server_model(
            server.base_url,
            small=Steady(REASONED),
            timeout=2.0,
            on_large_unavailable="degrade",
            max_retries=2,
        ) as model,
    ):
        start = time.perf_counter()
        result = await model.ainvoke("2 + 2?")
    assert str(result.content).endswith("4")
    assert time.perf_counter() - start < 2.0
    collab = result.response_metadata["collab"]
    assert collab["answer_author"] == "small"
    assert collab["steps"][0]["degraded"] and collab["steps"][0]["degraded_reason"]


async def test_a_backend_built_to_degrade_degrades_inside_the_chat_model() -> None:
    async with scripted(Reply(500, body={"error": "down"})) as server:
        large = OpenAIBackend(
            "m", server.base_url, mode="chat-continue", max_retries=0, on_unavailable="degrade"
        )
        async with large:
            model = CollabChatModel(small=Steady(REASONED), large=large, policy=LargeOnly())
            result = await model.ainvoke("2 + 2?")
    assert str(result.content).endswith("4")
    step = result.response_metadata["collab"]["steps"][0]
    assert step["author"] == "small" and step["degraded"]
    assert "BackendServerError" in step["degraded_reason"]


async def test_a_degraded_step_that_held_only_the_answer_is_flagged_on_the_answer() -> None:
    async with scripted(Reply(500, body={"error": "down"})) as server:
        model = server_model(server.base_url, max_retries=0, on_large_unavailable="degrade")
        async with model:
            result = await model.ainvoke("2 + 2?")
    collab = result.response_metadata["collab"]
    assert collab["steps"] == [] and collab["degraded_steps"] >= 1
    assert "BackendServerError" in collab["answer_degraded_reason"]


async def test_an_open_circuit_breaker_degrades_at_once_and_probes_after_the_cooldown() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=2, cooldown_s=30.0, clock=lambda: now[0])
    small = ScriptedBackend(["one", "two", "three", "Final answer: 4", "4"] * 2)
    async with (
        scripted(Reply(500, body={"error": "down"})) as server,
        server_model(
            server.base_url,
            small=small,
            max_retries=0,
            on_large_unavailable="degrade",
            circuit_breaker=breaker,
        ) as model,
    ):
        first = await model.ainvoke("2 + 2?")
        assert len(server.requests) == 2  # two failures opened it; later steps skip the server
        assert breaker.state == "open" and breaker.opened == 1
        now[0] += 31.0  # the cool-down is over: one probe goes out
        await model.ainvoke("2 + 2?")
        assert len(server.requests) == 3 and breaker.opened == 2
    steps = first.response_metadata["collab"]["steps"]
    reasons = [s["degraded_reason"] for s in steps]
    assert all(s["degraded"] for s in steps)
    assert "BackendServerError" in reasons[0] and reasons[2].startswith("circuit open")
    assert first.response_metadata["collab"]["answer_degraded_reason"].startswith("circuit open")


# ============================================================================ 5. malformed
_LOGPROB_AS_STRING = chat_body(
    "Final answer: 4", choice={"logprobs": {"content": [{"token": "4", "logprob": "high"}]}}
)
MALFORMED = {
    "truncated-json": Reply(raw=b'{"choices": [{"message": {"content": "Fin'),
    "empty-200-body": Reply(raw=b""),
    "choices-null": Reply(body={"choices": [None]}),
    "message-is-a-string": Reply(body={"choices": [{"message": "4", "finish_reason": "stop"}]}),
    "usage-is-a-string": Reply(body=chat_body("4", usage="lots")),
    "logprob-is-a-string": Reply(body=_LOGPROB_AS_STRING),
}


@pytest.mark.parametrize("reply", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_answer_is_a_retried_typed_protocol_error(reply: Reply) -> None:
    async with scripted(reply) as server:
        async with OpenAIBackend(
            "m", server.base_url, mode="chat-continue", max_retries=1, backoff_s=0.01
        ) as backend:
            with pytest.raises(BackendProtocolError) as caught:
                await backend.generate(request(logprobs=True))
        assert len(server.requests) == 2  # retried once, like a 5xx
    assert isinstance(caught.value, BackendUnavailableError)  # so degrade mode applies


async def test_a_malformed_answer_then_a_good_one_succeeds() -> None:
    replies = (MALFORMED["truncated-json"], Reply(body=ANSWER))
    async with scripted(*replies) as server, backend_at(server.base_url) as backend:
        assert (await backend.generate(request(stop=()))).text == "Final answer: 4"


# ============================================================================ 6. Retry-After
@pytest.mark.parametrize("value", ["soon", "nan", "Mon, 99 Foo 2024 99:99:99 GMT"])
async def test_an_unreadable_retry_after_is_no_hint(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    replies = (Reply(429, body={"error": "slow down"}, headers={"Retry-After": value}), Reply())
    async with scripted(*replies) as server, backend_at(server.base_url) as backend:
        start = time.perf_counter()
        generation = await backend.generate(request(stop=()))
    assert generation.text == "Paris." and time.perf_counter() - start < 2.0
    assert "retrying in nan" not in caplog.text


# ============================================================================ 7. batches
async def test_a_failing_abatch_cancels_the_other_inputs() -> None:
    small = Steady("still thinking", delay=0.01)
    model = CollabChatModel(small=small, large=Steady(), policy=SmallOnly(), max_steps=200)
    inputs: list[Any] = ["q"] * 30
    inputs[3] = [HumanMessage(content=[{"type": "image", "url": "x"}])]  # refused at once
    with pytest.raises(InvalidMessagesError):
        await model.abatch(inputs, {"max_concurrency": 8})
    calls = small.calls
    await asyncio.sleep(0.2)
    assert small.calls == calls  # nothing kept calling the model


def test_a_failing_batch_cancels_the_other_inputs() -> None:
    small = Steady("still thinking", delay=0.01)
    model = CollabChatModel(small=small, large=Steady(), policy=SmallOnly(), max_steps=200)
    inputs: list[Any] = ["q"] * 10
    inputs[2] = []
    start = time.perf_counter()
    with pytest.raises(InvalidMessagesError):
        model.batch(inputs)
    assert time.perf_counter() - start < 1.0  # not after the others ran their 200 steps
    calls = small.calls
    time.sleep(0.2)
    assert small.calls == calls


# ============================================================================ 8. Ctrl-C
def test_ctrl_c_during_a_sync_invoke_is_a_keyboard_interrupt_and_cancels_the_call() -> None:
    small = ScriptedBackend(["step"] * 3, delay=5.0)
    model = CollabChatModel(small=small, large=Steady(), policy=SmallOnly())
    sent: list[float] = []

    def ctrl_c_once_the_call_is_in_flight() -> None:  # a real Ctrl-C, not a fixed delay that
        if wait_until(lambda: small.requests, within_s=60):  # a loaded machine can outlast
            sent.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)

    # A shell that starts the tests in the background (nohup, no job control) hands them SIGINT
    # ignored; Ctrl-C at a terminal has Python's own handler, which this test is about.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=ctrl_c_once_the_call_is_in_flight, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            model.invoke("2 + 2?")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sent and small.cancelled == 1 and time.perf_counter() - sent[0] < 3.0
    assert small.released  # the conversation's state was freed on the way out


# ============================================================================ 9. timeout
async def test_the_whole_call_timeout_is_a_typed_error_that_says_so() -> None:
    model = CollabChatModel(
        small=ScriptedBackend(["step"], delay=5.0), large=Steady(), policy=SmallOnly(), timeout=0.2
    )
    with pytest.raises(CallTimeoutError) as caught:
        await model.ainvoke("2 + 2?")
    assert isinstance(caught.value, CollabError) and isinstance(caught.value, TimeoutError)
    assert "timeout=0.2" in str(caught.value)


# ============================================================================ 10. inputs
@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": math.nan},
        {"top_p": math.nan},
        {"temperature": 5.0},
        {"max_concurrency": 0},
        {"max_concurrency": -1},
        {"policy": "collab_agent.policies.fixed:SmallOnly"},
    ],
    ids=[
        "nan-temperature",
        "nan-top-p",
        "temperature-5",
        "concurrency-0",
        "concurrency-neg",
        "code",
    ],
)
def test_an_invalid_field_is_a_config_error(fields: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        CollabChatModel(small=Steady(), large=Steady(), **fields)


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": math.nan},
        {"top_p": math.nan},
        {"temperature": 5},
        {"max_tokens": 0},
        {"policy": 123},
        {"policy": "collab_agent.policies.fixed:SmallOnly"},
        {"seed": "x"},
    ],
    ids=["nan-temperature", "nan-top-p", "temperature-5", "max-tokens-0", "policy-123", "code",
         "seed"],
)  # fmt: skip
async def test_an_invalid_call_option_is_a_config_error_before_any_model_runs(
    options: dict[str, Any],
) -> None:
    small = Steady()
    model = CollabChatModel(small=small, large=Steady(), policy=SmallOnly())
    with pytest.raises(ConfigError):
        await model.ainvoke("2 + 2?", **options)
    assert small.calls == 0


async def test_a_batch_config_with_max_concurrency_0_is_a_config_error() -> None:
    model = CollabChatModel(small=Steady(), large=Steady(), policy=SmallOnly())
    with pytest.raises(ConfigError, match="max_concurrency"):
        await model.abatch(["q", "q"], {"max_concurrency": 0})


def test_a_policy_name_runs_code_only_when_the_application_allows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ran: list[int] = []
    monkeypatch.setattr(os, "getpid", lambda: ran.append(1) or 1)
    model = CollabChatModel(small=Steady(), large=Steady(), policy=SmallOnly())
    with pytest.raises(ConfigError, match="allow_code_policies"):
        model.invoke("q", policy="os:getpid")
    assert ran == []
    trusted = CollabChatModel(
        small=Steady(),
        large=Steady(),
        allow_code_policies=True,
        policy="collab_agent.policies.fixed:SmallOnly",
    )
    assert trusted.invoke("q").content == "4"


def test_a_tool_message_without_a_matching_call_is_refused() -> None:
    model = CollabChatModel(small=Steady(), large=Steady(), policy=SmallOnly())
    called = AIMessage("", tool_calls=[{"name": "add", "args": {}, "id": "c1"}])
    with pytest.raises(InvalidMessagesError, match="tool_call_id 'c9'"):
        model.invoke([HumanMessage("q"), called, ToolMessage("3", tool_call_id="c9")])
    with pytest.raises(InvalidMessagesError):
        model.invoke([HumanMessage("q"), ToolMessage("3", tool_call_id="c1")])


# ============================================================================ 11. secrets
@pytest.mark.parametrize(
    "reply",
    [Reply(401, body={"error": "bad key"}), Reply(500, body={"error": "down"}), Reply(drop=True)],
    ids=["401", "500", "dropped"],
)
async def test_a_typed_error_does_not_reach_the_sdk_exception_or_the_key(reply: Reply) -> None:
    async with (
        scripted(reply) as server,
        OpenAIBackend(
            "m", server.base_url, KEY_A, mode="chat", max_retries=1, backoff_s=0.01
        ) as backend,
    ):
        with pytest.raises(CollabError) as caught:
            await backend.generate(request(stop=()))
    chain: list[BaseException] = []
    error: BaseException | None = caught.value
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert not any(isinstance(e, openai.OpenAIError) for e in chain), chain
    assert all(KEY_A not in repr(e) and KEY_A not in str(vars(e)) for e in chain)
