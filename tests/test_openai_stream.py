"""`OpenAIBackend.stream` against a scripted HTTP server on 127.0.0.1: SSE chunks become text
deltas, the final `Generation` is the one the unstreamed answer gives, and retries stop once a
delta was shown. (The real llama.cpp server is in test_llamacpp.py.)"""

from __future__ import annotations

import json
from typing import Any

import pytest
from servers import Reply, chat_body, scripted

from collab_agent.backends.base import GREEDY, GenerateRequest, Generation
from collab_agent.backends.openai import BackendProtocolError, OpenAIBackend

MESSAGES = [{"role": "user", "content": "Count."}]
PIECES = ["One", ",", " two", ",", " three", "\n", "\nFour"]
USAGE = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}


def request(**overrides: Any) -> GenerateRequest:
    fields: dict[str, Any] = {
        "conversation_id": "c",
        "messages": MESSAGES,
        "sampling": GREEDY,
        "max_tokens": 16,
        "stop": (),
    }
    fields.update(overrides)
    return GenerateRequest(**fields)


def sse(*events: Any, done: bool = True) -> Reply:
    lines = [f"data: {json.dumps(e)}\n\n" for e in events]
    if done:
        lines.append("data: [DONE]\n\n")
    return Reply(raw="".join(lines).encode(), headers={"Content-Type": "text/event-stream"})


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "c1", "object": "chat.completion.chunk", "choices": [choice], **extra}


def streamed(pieces: list[str], finish: str = "stop") -> Reply:
    return sse(*(chunk(p) for p in pieces), chunk(finish=finish), {"choices": [], "usage": USAGE})


async def collect(backend: OpenAIBackend, req: GenerateRequest) -> tuple[list[str], Generation]:
    *deltas, generation = [item async for item in backend.stream(req)]
    assert isinstance(generation, Generation)
    return [str(d) for d in deltas], generation


async def test_chunks_become_deltas_and_the_generation_matches_the_unstreamed_one() -> None:
    whole = chat_body("".join(PIECES), usage=USAGE)
    async with scripted(streamed(PIECES), Reply(body=whole)) as server:
        backend = OpenAIBackend("m", server.base_url, mode="chat")
        deltas, generation = await collect(backend, request())
        expected = await backend.generate(request())
        await backend.aclose()
    body = server.requests[0]["json"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert deltas == PIECES
    assert (generation.text, generation.stop_reason) == (expected.text, expected.stop_reason)
    assert (generation.prompt_tokens, generation.completion_tokens) == (12, 7)
    assert (expected.prompt_tokens, expected.completion_tokens) == (12, 7)


async def test_a_server_that_ignores_stream_answers_whole_as_one_delta() -> None:
    """Some servers and proxies answer ``stream: true`` with the plain JSON body: its text is
    one delta and the generation is the unstreamed one, not an empty answer."""
    whole = chat_body("".join(PIECES), usage=USAGE)
    async with scripted(Reply(body=whole), Reply(body=whole)) as server:
        backend = OpenAIBackend("m", server.base_url, mode="chat")
        deltas, generation = await collect(backend, request())
        expected = await backend.generate(request())
        await backend.aclose()
    assert server.requests[0]["json"]["stream"] is True
    assert deltas == ["".join(PIECES)]
    assert (generation.text, generation.stop_reason) == (expected.text, expected.stop_reason)
    assert generation.completion_tokens == expected.completion_tokens == 7


async def test_a_stop_string_the_server_leaves_in_is_never_shown() -> None:
    async with scripted(streamed(PIECES)) as server:
        backend = OpenAIBackend("m", server.base_url, mode="chat")
        deltas, generation = await collect(backend, request(stop=("\n\n",)))
        await backend.aclose()
    assert "".join(deltas) == generation.text == "One, two, three"
    assert all("\n" not in d for d in deltas)  # the held-back "\n" never went out
    assert (generation.stop_reason, generation.stop_string) == ("step", "\n\n")


def with_logprob(content: str, token_id: int, token: str, whole: str) -> dict[str, Any]:
    """A chat chunk whose logprobs entry shows ``token`` for the token ``whole`` (same id)."""
    entry = {"id": token_id, "token": token, "logprob": -0.1}
    entry["top_logprobs"] = [{"id": token_id, "token": whole, "logprob": -0.1}]
    piece = chunk(content)
    piece["choices"][0]["logprobs"] = {"content": [entry]}
    return piece


@pytest.mark.parametrize(("last_token", "reason"), [(":\n\n", "step"), (":", "eos")])
async def test_a_stop_inside_the_last_token_reads_as_a_step_not_an_end_of_turn(
    last_token: str, reason: str
) -> None:
    """llama.cpp streams the last token's text cut at a stop string inside it (``":"`` for the
    token ``":\\n\\n"``) and reports finish ``stop`` as for an end of turn; the entry's own
    ``top_logprobs`` name the whole token, which tells the two apart as the unstreamed answer
    does. A token that really ends at ``":"`` stays an end of turn."""
    events = [with_logprob("Steps", 1, "Steps", "Steps"), with_logprob(":", 2, ":", last_token)]
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    reply = sse(*events, chunk(finish="stop"), {"choices": [], "usage": usage})
    async with scripted(reply) as server:
        backend = OpenAIBackend("m", server.base_url, mode="chat")
        deltas, generation = await collect(backend, request(stop=("\n\n",)))
        await backend.aclose()
    assert server.requests[0]["json"]["logprobs"] is True
    assert "".join(deltas) == generation.text == "Steps:"
    assert generation.stop_reason == reason


async def test_a_failure_before_the_first_delta_is_retried() -> None:
    async with scripted(Reply(status=503, body={"error": "busy"}), streamed(PIECES)) as server:
        backend = OpenAIBackend("m", server.base_url, mode="chat", backoff_s=0.01)
        deltas, generation = await collect(backend, request())
        await backend.aclose()
    assert deltas == PIECES and generation.text == "".join(PIECES)
    assert len(server.requests) == 2


async def test_a_failure_after_a_delta_was_shown_is_not_retried() -> None:
    broken = sse(chunk("One"), {"choices": "not a list"})
    async with scripted(broken, streamed(PIECES)) as server:
        backend = OpenAIBackend("m", server.base_url, mode="chat", backoff_s=0.01)
        shown: list[str] = []
        with pytest.raises(BackendProtocolError, match="malformed"):
            async for item in backend.stream(request()):
                shown.append(str(item))
        await backend.aclose()
    assert shown == ["One"]
    assert len(server.requests) == 1  # a retry would repeat text already shown


@pytest.mark.parametrize("dropped", ["probe", "detokenize"])
async def test_a_dropped_detokenize_call_is_retried_and_the_stop_still_reads_as_a_step(
    dropped: str,
) -> None:
    """A streamed llama.cpp answer holds a stop string back as textless entries; the follow-up
    ``/detokenize`` that tells them from an end of turn is idempotent, so a connection the
    server drops (seen under load) is retried instead of failing the whole reasoning step."""
    text_entry = {"id": 7, "token": "Steps:", "logprob": -0.1}
    held = {"id": 271, "token": "", "bytes": [], "logprob": -0.1}
    first, last = chunk("Steps:"), chunk(finish="stop")
    first["choices"][0]["logprobs"] = {"content": [text_entry]}
    last["choices"][0]["logprobs"] = {"content": [held]}
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    llamacpp = {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "llamacpp"}]}
    async with scripted(
        sse(first, last, {"choices": [], "usage": usage}),
        *([Reply(drop=True)] if dropped == "probe" else []),
        Reply(body=llamacpp),  # the probe that names the dialect
        *([Reply(drop=True)] if dropped == "detokenize" else []),
        Reply(body={"content": "\n\n"}),
    ) as server:
        backend = OpenAIBackend("m", server.base_url, mode="chat", backoff_s=0.01)
        deltas, generation = await collect(backend, request(stop=("\n\n",)))
        await backend.aclose()
    paths = [r["path"] for r in server.requests]
    assert paths.count("/detokenize") == (2 if dropped == "detokenize" else 1), paths
    assert "".join(deltas) == generation.text == "Steps:"
    assert (generation.stop_reason, generation.stop_string) == ("step", "\n\n")
