"""OpenAIBackend against vLLM's real server (its CPU build) on 127.0.0.1.

vLLM is the engine the README sends users to when the large model outgrows one machine. These
tests hold the backend to what the README's capability table says of it: the dialect is
recognised, reasoning continues from a partial assistant turn exactly (``continue_final_message``
on the chat endpoint, or completions with a local tokenizer), logprobs are vLLM's own, ``score``
works through completions ``echo``, stop strings end a step, concurrent conversations are served,
TrigReason runs end to end, and a server that dies mid-request gives a typed error and degrade
mode's answer. The vLLM server is started once per session (``vllm_server`` in ``servers.py``);
the test that kills it runs last.
"""

from __future__ import annotations

from typing import Any

import anyio
import openai
import pytest
from servers import QWEN_SMALL, VLLM_MODEL, VllmServer

from collab_agent.backends.base import GREEDY, GenerateRequest
from collab_agent.backends.local import TransformersBackend
from collab_agent.backends.openai import OpenAIBackend
from collab_agent.errors import BackendUnavailableError
from collab_agent.policies import TrigReason
from collab_agent.reasoner import Reasoner

pytestmark = pytest.mark.server

SKY = [{"role": "user", "content": "Explain in three short paragraphs why the sky is blue."}]
LIST = [
    {
        "role": "user",
        "content": "List three fruits, one per paragraph, with a blank line between them.",
    }
]
CLIPS = [
    {
        "role": "user",
        "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
        "many clips in May. How many clips did Natalia sell altogether in April and May?",
    }
]
TOKENIZER = f"bundled:{QWEN_SMALL}"


def request(**overrides: Any) -> GenerateRequest:
    fields: dict[str, Any] = {
        "conversation_id": "c",
        "messages": SKY,
        "sampling": GREEDY,
        "max_tokens": 16,
        "stop": (),
    }
    fields.update(overrides)
    return GenerateRequest(**fields)


def backend_for(server: VllmServer, **options: Any) -> OpenAIBackend:
    return OpenAIBackend(VLLM_MODEL, server.base_url, **{"timeout": 300, **options})


@pytest.mark.parametrize(
    ("tokenizer", "mode"), [(None, "chat-continue"), (TOKENIZER, "completions")]
)
async def test_vllm_is_recognised_and_continued_reasoning_equals_one_generation(
    vllm_server: VllmServer, tokenizer: str | None, mode: str
) -> None:
    backend = backend_for(vllm_server, tokenizer=tokenizer)
    try:
        info = await backend.probe()
        assert info.dialect == "vllm" and info.continues_assistant and info.names_stop_string
        assert backend.resolved_mode == mode
        whole = await backend.generate(request(max_tokens=16))
        first = await backend.generate(request(max_tokens=8))
        rest = await backend.generate(request(max_tokens=8, reasoning=first.text))
        assert whole.completion_tokens == 16
        assert first.text + rest.text == whole.text
    finally:
        await backend.aclose()


async def test_chosen_and_top_logprobs_are_the_ones_vllm_reports(
    vllm_server: VllmServer,
) -> None:
    backend = backend_for(vllm_server)
    client = openai.AsyncOpenAI(base_url=vllm_server.base_url, api_key="none", timeout=300)
    try:
        ours = await backend.generate(request(max_tokens=8, logprobs=True, top_logprobs=3))
        raw = await client.chat.completions.create(
            model=VLLM_MODEL, messages=SKY, max_tokens=8, temperature=0.0,  # type: ignore[arg-type]
            logprobs=True, top_logprobs=3,
        )  # fmt: skip
        content = raw.choices[0].logprobs.content  # type: ignore[union-attr]
        assert ours.text == raw.choices[0].message.content
        assert ours.logprobs == pytest.approx([t.logprob for t in content], abs=1e-3)
        assert ours.top_logprobs is not None and len(ours.top_logprobs) == len(content)
        for mine, theirs in zip(ours.top_logprobs, content, strict=True):
            expected = {t.token: t.logprob for t in theirs.top_logprobs}
            assert mine == pytest.approx(expected, abs=1e-3)
    finally:
        await backend.aclose()
        await client.close()


async def test_score_goes_through_completions_echo(vllm_server: VllmServer) -> None:
    """Scoring a text the server wrote greedily gives back the logprobs it wrote it with, so
    `LargeSurprise` can use a vLLM large model."""
    backend = backend_for(vllm_server, tokenizer=TOKENIZER)
    try:
        asked = request(max_tokens=12, logprobs=True)
        written = await backend.generate(asked)
        scored = await backend.score(asked, written.text)
        assert backend.can_score is True
        assert written.logprobs is not None and len(scored) == len(written.logprobs) == 12
        assert scored == pytest.approx(written.logprobs, abs=0.1)  # bf16, two computations
    finally:
        await backend.aclose()


async def test_a_stop_string_ends_the_step_and_vllm_names_it(vllm_server: VllmServer) -> None:
    """Greedy, this model lists "Apple", "Banana", "Cherry" on single lines (it writes no blank
    line here), so the second fruit is the stop string that must end the step."""
    backend = backend_for(vllm_server)
    try:
        generation = await backend.generate(
            request(messages=LIST, stop=("Zebra", "Banana"), max_tokens=48)
        )
        assert generation.stop_reason == "step" and generation.stop_string == "Banana"
        assert "Apple" in generation.text and "Banana" not in generation.text
    finally:
        await backend.aclose()


async def test_eight_concurrent_conversations_are_all_served(vllm_server: VllmServer) -> None:
    backend = backend_for(vllm_server)
    texts: dict[int, str] = {}

    async def one(i: int) -> None:
        generation = await backend.generate(
            request(conversation_id=f"c{i}", reasoning=f"{i}. ", max_tokens=6)
        )
        assert generation.completion_tokens == 6
        texts[i] = generation.text

    try:
        with anyio.fail_after(300):
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(one, i)
        assert sorted(texts) == list(range(8)) and all(texts.values())
    finally:
        await backend.aclose()


async def test_trigreason_runs_end_to_end_on_vllm(vllm_server: VllmServer) -> None:
    small = backend_for(vllm_server)
    large = backend_for(vllm_server, tokenizer=TOKENIZER)
    try:
        reasoner = Reasoner(
            small, large, TrigReason(priming_steps=1), max_steps=3, step_max_tokens=24,
            answer_max_tokens=16, sampling=GREEDY,
        )  # fmt: skip
        trace = await reasoner.run(CLIPS)
        assert trace.steps, trace.answer
        assert trace.steps[0].author == "large" and trace.steps[0].trigger == "strategic_priming"
        assert len(trace.steps) >= 2 and trace.answer
        small_steps = [s for s in trace.steps if s.author == "small" or s.rejected_text]
        assert small_steps, "after priming, the small model writes (or is rejected)"
        assert trace.usage["small"].completion_tokens > 0
    finally:
        await small.aclose()
        await large.aclose()


# Runs last: it kills the session's vLLM server.
async def test_a_server_killed_mid_request_is_a_typed_error_and_degrade_answers(
    vllm_server: VllmServer, tiny_pair: Any
) -> None:
    large = backend_for(vllm_server, timeout=20, max_retries=1, on_unavailable="degrade")
    small = TransformersBackend(tiny_pair.small, tiny_pair.tokenizer, name="tiny-small")
    try:
        await large.probe()
        errors: list[BaseException] = []

        async def long_call() -> None:
            try:
                await large.generate(request(max_tokens=400))
            except Exception as error:
                errors.append(error)

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_call)
            await anyio.sleep(2)
            await anyio.to_thread.run_sync(vllm_server.kill)
        assert len(errors) == 1 and isinstance(errors[0], BackendUnavailableError), errors
        reasoner = Reasoner(
            small, large, TrigReason(priming_steps=1), max_steps=2, step_max_tokens=8,
            answer_max_tokens=8, sampling=GREEDY,
        )  # fmt: skip
        trace = await reasoner.run(LIST)
        assert trace.steps and trace.steps[0].degraded and trace.steps[0].author == "small"
        assert trace.degraded_steps >= 1 and trace.answer_author == "small"
    finally:
        await large.aclose()
        await small.aclose()
