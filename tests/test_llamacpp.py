"""OpenAIBackend against llama.cpp's real server (xllamacpp) on 127.0.0.1, and the managed server.

SmolLM2-135M keeps these fast (about a second to start); a few tests use the bundled Qwen 0.5B.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from servers import SMOL

from collab_agent.backends.base import GREEDY, GenerateRequest, Generation
from collab_agent.backends.llamacpp import LlamaCppBackend, LlamaCppServer
from collab_agent.backends.openai import BackendContextOverflowError, OpenAIBackend
from collab_agent.errors import ConfigError

pytestmark = pytest.mark.server

LIST = [
    {
        "role": "user",
        "content": "List three fruits, one per paragraph, with a blank line between them.",
    }
]
HELLO = [{"role": "user", "content": "Say hello."}]


def request(messages: Any = LIST, **overrides: Any) -> GenerateRequest:
    fields: dict[str, Any] = {
        "conversation_id": "c",
        "messages": messages,
        "sampling": GREEDY,
        "max_tokens": 48,
    }
    fields.update(overrides)
    return GenerateRequest(**fields)


@pytest.fixture
async def smol(smol_server: LlamaCppServer) -> Any:
    backend = OpenAIBackend("smol", smol_server.base_url, timeout=600)
    yield backend
    await backend.aclose()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"


# ---------------------------------------------------------------------------- the dialect
async def test_auto_mode_uses_completions_with_the_servers_template(smol: OpenAIBackend) -> None:
    generation = await smol.generate(request(HELLO, stop=()))
    assert smol.server is not None and smol.server.dialect == "llama.cpp"
    assert smol.resolved_mode == "completions"
    assert generation.text.strip() and generation.stop_reason in ("eos", "length")
    assert generation.prompt_tokens > 10 and generation.completion_tokens > 0


async def test_stop_string_ends_a_step_and_is_not_returned(smol: OpenAIBackend) -> None:
    generation = await smol.generate(request(logprobs=True))
    assert generation.stop_reason == "step" and generation.stop_string == "\n\n"
    assert "\n\n" not in generation.text and generation.text.strip()
    # llama.cpp counts the stop string's tokens, but returns logprobs only for the text
    assert (
        generation.logprobs is not None
        and 0 < len(generation.logprobs) < generation.completion_tokens
    )


async def test_eos_is_told_apart_from_a_stop_string(smol: OpenAIBackend) -> None:
    generation = await smol.generate(
        request(HELLO, stop=("\n\n\n\n",), max_tokens=200, logprobs=True)
    )
    assert generation.stop_reason == "eos" and generation.stop_string is None
    assert (
        generation.logprobs is not None and len(generation.logprobs) == generation.completion_tokens
    )


async def test_logprobs_are_chosen_token_logprobs(smol: OpenAIBackend) -> None:
    generation = await smol.generate(request(HELLO, stop=(), max_tokens=12, logprobs=True))
    assert generation.stop_reason == "length" and generation.completion_tokens == 12
    assert generation.logprobs is not None and len(generation.logprobs) == 12
    assert all(lp <= 0 for lp in generation.logprobs)
    assert (await smol.generate(request(HELLO, stop=(), max_tokens=4))).logprobs is None


@pytest.mark.parametrize("mode", ["completions", "chat-prefill"])
async def test_top_logprobs_come_back_from_either_endpoint(
    smol_server: LlamaCppServer, mode: str
) -> None:
    backend = OpenAIBackend("smol", smol_server.base_url, mode=mode, timeout=600)
    try:
        generation = await backend.generate(
            request(HELLO, stop=(), max_tokens=3, logprobs=True, top_logprobs=4)
        )
    finally:
        await backend.aclose()
    assert generation.top_logprobs is not None and len(generation.top_logprobs) == 3
    assert generation.logprobs is not None
    for chosen, alternatives in zip(generation.logprobs, generation.top_logprobs, strict=True):
        assert 1 <= len(alternatives) <= 4 and all(v <= 0 for v in alternatives.values())
        assert max(alternatives.values()) == pytest.approx(chosen, abs=1e-3)  # greedy: on top


async def test_continuation_does_not_repeat_the_prefix_and_hits_the_prefix_cache(
    smol: OpenAIBackend,
) -> None:
    first = await smol.generate(request())
    prefix = first.text + "\n\n"
    second = await smol.generate(request(reasoning=prefix))
    assert second.text.strip() and not second.text.startswith(first.text)
    assert second.prompt_tokens > first.prompt_tokens
    assert second.cached_tokens >= first.prompt_tokens - 1  # the shared prefix came from cache


@pytest.mark.parametrize("mode", ["auto", "completions", "chat"])
@pytest.mark.parametrize("stop", [("\n\n",), ()])
async def test_streamed_tokens_join_to_the_answer_generate_gives(
    smol_server: LlamaCppServer, mode: str, stop: tuple[str, ...]
) -> None:
    async with OpenAIBackend("smol", smol_server.base_url, mode=mode, timeout=600) as backend:
        expected = await backend.generate(request(stop=stop))
        *deltas, generation = [item async for item in backend.stream(request(stop=stop))]
    assert isinstance(generation, Generation)
    assert len(deltas) >= 8  # token by token, not one delta per call
    assert "".join(str(d) for d in deltas) == generation.text == expected.text
    assert all(s not in d for d in deltas for s in stop)
    assert (generation.stop_reason, generation.stop_string) == (
        expected.stop_reason,
        expected.stop_string,
    )
    assert generation.stop_reason == ("step" if stop else "length")
    assert (generation.prompt_tokens, generation.completion_tokens) == (
        expected.prompt_tokens,
        expected.completion_tokens,
    )


async def test_chat_prefill_and_completions_continue_alike(smol_server: LlamaCppServer) -> None:
    prefix = "1. Apple\n\n"
    async with OpenAIBackend("smol", smol_server.base_url, mode="chat-prefill") as chat:
        by_chat = await chat.generate(request(reasoning=prefix, logprobs=True))
    async with OpenAIBackend("smol", smol_server.base_url, mode="completions") as raw:
        by_completion = await raw.generate(request(reasoning=prefix, logprobs=True))
    assert by_chat.text == by_completion.text  # llama.cpp's repeated prefix was stripped
    assert by_chat.stop_reason == by_completion.stop_reason
    assert by_chat.logprobs == pytest.approx(by_completion.logprobs, abs=1e-3)


async def test_parallel_requests_are_served_together(smol: OpenAIBackend) -> None:
    generations = await asyncio.gather(
        *(
            smol.generate(request(HELLO, conversation_id=str(i), stop=(), max_tokens=8))
            for i in range(4)
        )
    )
    assert [g.completion_tokens for g in generations] == [8, 8, 8, 8]


async def test_context_overflow_is_typed(smol: OpenAIBackend) -> None:
    long = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(BackendContextOverflowError):
        await smol.generate(request(long))


# ---------------------------------------------------------------------------- the managed server
def test_server_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="model_path"):
        LlamaCppServer("/nonexistent/model.gguf")
    with pytest.raises(ConfigError, match="n_parallel"):
        LlamaCppServer(f"bundled:{SMOL}", n_parallel=0)


async def test_backend_owns_its_server_and_stops_it() -> None:
    backend = LlamaCppBackend(f"bundled:{SMOL}", ctx_size=1024, n_parallel=1, threads=1)
    pid = backend.llama_server.pid
    assert pid is not None and alive(pid)
    generation = await backend.generate(request(HELLO, stop=(), max_tokens=4))
    assert generation.completion_tokens == 4
    await backend.aclose()
    assert not alive(pid)


async def test_spec_string_starts_a_server() -> None:
    from collab_agent.backends.specs import load_backend

    backend = load_backend(f"llamacpp:bundled:{SMOL}", ctx_size=1024, n_parallel=1, threads=1)
    assert isinstance(backend, LlamaCppBackend)
    assert backend.llama_server.threads == 1  # load_backend's threads= reaches the server
    pid = backend.llama_server.pid
    assert pid is not None and alive(pid)
    await backend.aclose()
    assert not alive(pid)


def test_sync_context_manager_stops_on_error() -> None:
    with (
        pytest.raises(RuntimeError, match="inside"),
        LlamaCppServer(f"bundled:{SMOL}", ctx_size=1024, threads=1) as server,
    ):
        pid = server.pid
        assert pid is not None and alive(pid)
        raise RuntimeError("inside")
    assert not alive(pid)


def test_no_orphan_when_the_parent_is_killed() -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from collab_agent.backends.llamacpp import LlamaCppServer
        server = LlamaCppServer("bundled:{SMOL}", ctx_size=1024, n_parallel=1, threads=1).start()
        print(server.pid, flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the llama.cpp server outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


def test_ctrl_c_in_the_parent_stops_the_server() -> None:
    script = textwrap.dedent(
        f"""
        import signal, time
        # a terminal delivers Ctrl-C to Python's handler; a job started in the background by a
        # non-interactive shell (CI under nohup, say) inherits SIGINT ignored, so restore it
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from collab_agent.backends.llamacpp import LlamaCppServer
        with LlamaCppServer("bundled:{SMOL}", ctx_size=1024, n_parallel=1, threads=1) as server:
            print(server.pid, flush=True)
            time.sleep(120)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.send_signal(signal.SIGINT)
        # stop() sends SIGTERM, waits up to 5 s, SIGKILLs, waits up to 5 s more: slow under load
        parent.wait(40)
        assert not alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


# ---------------------------------------------------------------------------- the bundled Qwen pair
GSM8K_0 = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
    "muffins for her friends every day with four. She sells the remainder at the farmers' market "
    "daily for $2 per fresh duck egg. How much in dollars does she make every day at the "
    "farmers' market?"
)
ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers and return the sum.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


@pytest.mark.slow
async def test_qwen_continues_reasoning_step_by_step(qwen_small_server: LlamaCppServer) -> None:
    async with OpenAIBackend("qwen-0.5b", qwen_small_server.base_url, timeout=600) as qwen:
        messages = [{"role": "user", "content": "What is 17 * 3? Think step by step."}]
        first = await qwen.generate(request(messages, max_tokens=64, logprobs=True))
        second = await qwen.generate(
            request(messages, reasoning=first.text + "\n\n", max_tokens=64)
        )
    assert first.text.strip() and first.stop_reason in ("step", "eos", "length")
    assert first.logprobs is not None and len(first.logprobs) <= first.completion_tokens
    assert second.text.strip() and second.cached_tokens > 0


@pytest.mark.slow
async def test_qwen_tool_call_text_becomes_tool_calls(qwen_small_server: LlamaCppServer) -> None:
    messages = [{"role": "user", "content": "Use the add tool to add 2 and 3."}]
    async with OpenAIBackend("qwen-0.5b", qwen_small_server.base_url, timeout=600) as qwen:
        answer = await qwen.generate(
            request(messages, tools=[ADD_TOOL], purpose="answer", stop=(), max_tokens=64)
        )
    assert [c["name"] for c in answer.tool_calls] == ["add"], answer.text
    assert answer.tool_calls[0]["args"] == {"a": 2, "b": 3}


@pytest.mark.slow
async def test_trigreason_local_srm_and_llamacpp_lrm_answer_gsm8k(
    qwen_large_server: LlamaCppServer,
) -> None:
    """The issue's end-to-end claim: SRM in transformers here, LRM on a llama.cpp server."""
    local = pytest.importorskip("collab_agent.backends.local")
    from collab_agent.evaluation.grading import extract_answer, is_correct
    from collab_agent.policies import TrigReason
    from collab_agent.reasoner import Reasoner

    small = local.TransformersBackend.from_pretrained("bundled:qwen2.5-coder-0.5b-instruct")
    large = OpenAIBackend("qwen-1.5b", qwen_large_server.base_url, timeout=600)
    reasoner = Reasoner(
        small,
        large,
        policy=TrigReason(priming_steps=2),
        sampling=GREEDY,
        budget=384,
        step_max_tokens=128,
        answer_max_tokens=32,
    )
    try:
        trace = await reasoner.run([{"role": "user", "content": GSM8K_0}])
    finally:
        await large.aclose()
    assert {s.author for s in trace.steps} == {"small", "large"}
    server = trace.usage["large"]
    assert server.calls >= 2 and server.prompt_tokens > 0 and server.completion_tokens > 0
    assert server.cached_tokens > 0  # llama.cpp's prefix cache served the shared prefix
    # The 0.5B/1.5B pair gets this problem right only some of the time (greedy TrigReason with
    # priming 2 answered 20 in `bench edge-cloud`); the claim tested is that it answers.
    assert extract_answer(trace.answer) is not None, trace.answer
    print(f"answer {trace.answer!r}, correct: {is_correct(extract_answer(trace.answer), '18')}")


async def test_llamacpp_cannot_score_and_surprise_says_so_up_front(
    smol_server: LlamaCppServer,
) -> None:
    """llama.cpp's server ignores ``echo``: a trigger that scores SRM steps with the LRM is
    refused when the reasoner is built, and a direct score call names the reason."""
    from collab_agent.errors import CapabilityError
    from collab_agent.policies.signals import SurpriseReason
    from collab_agent.reasoner import Reasoner

    managed = LlamaCppBackend(smol_server.model_path, server=smol_server)
    try:
        assert managed.can_score is False
        with pytest.raises(CapabilityError, match="prompt logprobs"):
            Reasoner(managed, managed, SurpriseReason())
    finally:
        await managed.aclose()
    plain = OpenAIBackend("smol", smol_server.base_url, timeout=600)
    try:
        assert plain.can_score is None  # not known before the probe
        with pytest.raises(CapabilityError, match=r"llama\.cpp.*prompt logprobs"):
            await plain.score(request(HELLO), " Hello!")
        assert plain.can_score is False
    finally:
        await plain.aclose()
