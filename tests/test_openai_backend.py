"""OpenAIBackend against real HTTP servers on 127.0.0.1 that replay each dialect's answers.

The llama.cpp server itself is exercised in test_llamacpp.py; here scripted servers replay the
shapes other engines send (vLLM's named stop string, llama-cpp-python's legacy logprobs, reasoning
fields, native tool calls) so every parsing path runs over real HTTP in milliseconds.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from servers import Reply, chat_body, scripted

from collab_agent.backends.base import GREEDY, GenerateRequest
from collab_agent.backends.openai import (
    BackendContextOverflowError,
    BackendRequestError,
    OpenAIBackend,
    Price,
)
from collab_agent.backends.toolcalls import parse_tool_calls
from collab_agent.errors import BackendError, CapabilityError, ConfigError

FAKE_KEY = "sk-test-DO-NOT-LEAK-1234567890abcdef"
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            },
        },
    }
]


def request(**overrides: Any) -> GenerateRequest:
    fields: dict[str, Any] = {
        "conversation_id": "c",
        "messages": MESSAGES,
        "sampling": GREEDY,
        "max_tokens": 32,
    }
    fields.update(overrides)
    return GenerateRequest(**fields)


class ChatTemplate:
    """The smallest local tokenizer: renders ChatML, as Qwen's template does."""

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if kwargs.get("add_generation_prompt") else "")


def legacy_completion(text: str, logprobs: list[float], finish: str = "stop") -> dict[str, Any]:
    """A /v1/completions answer as llama-cpp-python sends it (legacy logprobs)."""
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "text": text,
                "index": 0,
                "logprobs": {
                    "tokens": [f"t{i}" for i in range(len(logprobs))],
                    "text_offset": list(range(len(logprobs))),
                    "token_logprobs": logprobs,
                    "top_logprobs": [{f"t{i}": lp} for i, lp in enumerate(logprobs)],
                },
                "finish_reason": finish,
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": len(logprobs) + 1, "total_tokens": 23},
    }


# ---------------------------------------------------------------------------- configuration
def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ConfigError, match="base_url"):
        OpenAIBackend("m", "127.0.0.1:8080")
    with pytest.raises(ConfigError, match="mode"):
        OpenAIBackend("m", "http://127.0.0.1:1/v1", mode="magic")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="on_unavailable"):
        OpenAIBackend("m", "http://127.0.0.1:1/v1", on_unavailable="retry")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="timeout"):
        OpenAIBackend("m", "http://127.0.0.1:1/v1", timeout=0)


async def test_repr_hides_the_key() -> None:
    backend = OpenAIBackend("m", "http://127.0.0.1:1/v1", api_key=FAKE_KEY)
    assert FAKE_KEY not in repr(backend)
    assert "**********" in repr(backend)
    await backend.aclose()


# ---------------------------------------------------------------------------- dialects
async def test_legacy_logprobs_dialect_llama_cpp_python() -> None:
    models = {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "me"}]}
    async with scripted(
        Reply(body=models), Reply(body=legacy_completion(" 5.", [-0.1, -0.2, -0.3]))
    ) as server:
        backend = OpenAIBackend("m", server.base_url, tokenizer=ChatTemplate())  # type: ignore[arg-type]
        generation = await backend.generate(request(reasoning="2 + 3 =", logprobs=True))
        await backend.aclose()
    assert backend.server is not None and backend.server.dialect == "llama-cpp-python"
    assert generation.text == " 5."
    assert generation.logprobs == [-0.1, -0.2, -0.3]
    # legacy dialect: fewer logprobs than completion tokens means a stop string ended it
    assert generation.stop_reason == "step" and generation.stop_string == "\n\n"
    sent = server.requests[-1]
    assert sent["path"] == "/v1/completions"
    assert sent["json"]["prompt"].endswith("<|im_start|>assistant\n2 + 3 =")
    assert sent["json"]["logprobs"] == 1


async def test_llama_cpp_python_without_tokenizer_says_what_is_missing() -> None:
    models = {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "me"}]}
    async with scripted(Reply(body=models)) as server:
        backend = OpenAIBackend("m", server.base_url)
        with pytest.raises(CapabilityError, match="tokenizer="):
            await backend.generate(request(reasoning="Step 1."))
        await backend.aclose()


async def test_vllm_named_stop_string_and_continue_final_message() -> None:
    models = {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "vllm"}]}
    body = chat_body("5", choice={"stop_reason": "\n\n"})
    async with scripted(Reply(body=models), Reply(body=body)) as server:
        backend = OpenAIBackend("m", server.base_url)
        generation = await backend.generate(request(reasoning="2 + 3 = "))
        await backend.aclose()
    assert backend.resolved_mode == "chat-continue"
    assert generation.stop_reason == "step" and generation.stop_string == "\n\n"
    sent = server.requests[-1]["json"]
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert sent["messages"][-1] == {"role": "assistant", "content": "2 + 3 = "}


async def test_deepseek_prefix_marks_the_trailing_message() -> None:
    async with scripted(Reply(body=chat_body("5"))) as server:
        backend = OpenAIBackend("deepseek-reasoner", server.base_url, mode="deepseek-prefix")
        await backend.generate(request(reasoning="2 + 3 = "))
        await backend.aclose()
    assert server.requests[-1]["json"]["messages"][-1]["prefix"] is True


async def test_reasoning_field_usage_cached_tokens_and_cost() -> None:
    body = chat_body(
        "5",
        message={"reasoning_content": "two plus three"},
        usage={
            "prompt_tokens": 1_000_000,
            "completion_tokens": 1_000_000,
            "prompt_tokens_details": {"cached_tokens": 400_000},
        },
    )
    async with scripted(Reply(body=body)) as server:
        price = Price(input=1.0, cached=0.25, output=2.0)
        backend = OpenAIBackend("m", server.base_url, mode="chat", price=price)
        generation = await backend.generate(request(purpose="answer"))
        await backend.aclose()
    assert generation.reasoning_text == "two plus three"
    assert (generation.prompt_tokens, generation.cached_tokens) == (1_000_000, 400_000)
    assert generation.cost == pytest.approx(0.6 * 1.0 + 0.4 * 0.25 + 2.0)
    assert generation.seconds > 0


async def test_native_tool_calls_are_returned() -> None:
    call = {
        "id": "call_7",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
    }
    body = chat_body("", message={"tool_calls": [call]}, finish_reason="tool_calls")
    async with scripted(Reply(body=body)) as server:
        backend = OpenAIBackend("m", server.base_url, mode="chat")
        generation = await backend.generate(request(purpose="answer", tools=TOOLS))
        await backend.aclose()
    assert generation.tool_calls == [
        {"id": "call_7", "name": "add", "args": {"a": 2, "b": 3}, "type": "tool_call"}
    ]
    assert server.requests[-1]["json"]["tools"] == TOOLS


async def test_tool_call_text_is_parsed_when_the_server_gives_none() -> None:
    text = 'I will add them.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    async with scripted(Reply(body=chat_body(text))) as server:
        backend = OpenAIBackend("m", server.base_url, mode="chat")
        answer = await backend.generate(request(purpose="answer", tools=TOOLS))
        step = await backend.generate(request(purpose="step", tools=TOOLS))
        await backend.aclose()
    assert [c["name"] for c in answer.tool_calls] == ["add"] and answer.text == "I will add them."
    assert step.tool_calls == [] and step.text == text  # only answers are parsed


async def test_llama_cpp_gets_a_tool_turn_natively_and_reasoning_as_completions() -> None:
    """A tool turn (an answer offering tools, no reasoning to continue) goes to llama.cpp's chat
    endpoint, whose template parser returns the calls; continuing reasoning stays on
    /completions."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
    }
    body = chat_body("", message={"tool_calls": [call]}, finish_reason="tool_calls")
    async with scripted(
        Reply(body=body), Reply(body=legacy_completion(" 5.", [-0.1, -0.2]))
    ) as server:
        backend = OpenAIBackend("m", server.base_url, mode="completions", tokenizer=ChatTemplate())  # type: ignore[arg-type]
        backend.known_dialect = "llama.cpp"  # as LlamaCppBackend, which starts the server
        turn = await backend.generate(request(purpose="answer", tools=TOOLS))
        answer = await backend.generate(request(purpose="answer", tools=TOOLS, reasoning="2+3"))
        await backend.aclose()
    assert [c["name"] for c in turn.tool_calls] == ["add"]
    first, second = server.requests
    assert first["path"] == "/v1/chat/completions" and first["json"]["tools"] == TOOLS
    assert second["path"] == "/v1/completions" and answer.text == " 5."


async def test_plain_chat_cannot_continue_reasoning() -> None:
    async with scripted(Reply()) as server:
        backend = OpenAIBackend("gpt-x", server.base_url, mode="chat")
        with pytest.raises(CapabilityError, match="mode"):
            await backend.generate(request(reasoning="Step 1."))
        await backend.aclose()
    assert server.requests == []


# ---------------------------------------------------------------------------- 4xx errors
async def test_context_overflow_is_typed_and_not_retried() -> None:
    body = {"error": {"code": 400, "message": "request (9000 tokens) exceeds the available context size (4096 tokens)",
                      "type": "exceed_context_size_error"}}  # fmt: skip
    async with scripted(Reply(status=400, body=body)) as server:
        backend = OpenAIBackend("m", server.base_url, mode="chat", max_retries=3, backoff_s=0)
        with pytest.raises(BackendContextOverflowError) as caught:
            await backend.generate(request())
        await backend.aclose()
    assert isinstance(caught.value, BackendError)
    assert len(server.requests) == 1


async def test_bad_request_is_not_retried_and_never_shows_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    body = {
        "error": {"message": f"invalid key {FAKE_KEY} for model", "type": "invalid_request_error"}
    }
    async with scripted(Reply(status=422, body=body)) as server:
        backend = OpenAIBackend("m", server.base_url, api_key=FAKE_KEY, mode="chat", max_retries=3)
        with pytest.raises(BackendRequestError) as caught:
            await backend.generate(request())
        await backend.aclose()
    assert len(server.requests) == 1
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {FAKE_KEY}"
    assert FAKE_KEY not in str(caught.value) and FAKE_KEY not in repr(caught.value)
    assert FAKE_KEY not in caplog.text


# ---------------------------------------------------------------------------- toolcalls.py
def test_parse_qwen_tool_call_blocks() -> None:
    text = (
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 3}"}\n</tool_call>'
    )
    parsed = parse_tool_calls(text, TOOLS)
    assert [c["args"] for c in parsed.tool_calls] == [{"a": 1, "b": 2}, {"a": 3}]
    assert parsed.content == "" and parsed.invalid_tool_calls == []
    assert len({c["id"] for c in parsed.tool_calls}) == 2


def test_parse_bare_and_fenced_json_blocks() -> None:
    fenced = 'Sure:\n```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```'
    assert parse_tool_calls(fenced, TOOLS).tool_calls[0]["args"] == {"a": 1, "b": 2}
    assert parse_tool_calls(fenced, TOOLS).content == "Sure:"
    bare = '[{"name": "add", "parameters": {"a": 1}}, {"name": "add", "parameters": {"b": 2}}]'
    assert [c["args"] for c in parse_tool_calls(bare, TOOLS).tool_calls] == [{"a": 1}, {"b": 2}]


def test_json_that_is_not_a_call_stays_content() -> None:
    answer = 'The result is {"name": "Alice", "age": 3}.'
    assert parse_tool_calls(answer, TOOLS).tool_calls == []
    assert parse_tool_calls('{"name": "subtract", "arguments": {}}', TOOLS).tool_calls == []


def test_malformed_tool_call_block_is_reported_invalid() -> None:
    parsed = parse_tool_calls(
        '<tool_call>\n{"name": "add", "arguments": {"a": 1,}\n</tool_call>', TOOLS
    )
    assert parsed.tool_calls == [] and len(parsed.invalid_tool_calls) == 1
    assert "JSON" in parsed.invalid_tool_calls[0]["error"]


async def test_score_takes_the_continuations_tokens_from_a_vllm_echo() -> None:
    """vLLM answers completions with ``echo`` in the legacy shape: every prompt token with its
    text offset (the first one's logprob null), then the generated token."""
    models = {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "vllm"}]}
    prefix = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n2 + 3"
    tokens = [prefix[:10], prefix[10:], " =", " 5", ".", "\n"]  # the last one is generated
    offsets = [0, 10, len(prefix), len(prefix) + 2, len(prefix) + 4, len(prefix) + 5]
    body = {
        "object": "text_completion",
        "choices": [
            {
                "index": 0,
                "text": prefix + " = 5.\n",
                "finish_reason": "length",
                "logprobs": {
                    "tokens": tokens,
                    "token_logprobs": [None, -3.0, -0.5, -0.25, -1.0, -2.0],
                    "text_offset": offsets,
                    "top_logprobs": None,
                },
            }
        ],
    }
    async with scripted(Reply(body=models), Reply(body=body)) as server:
        backend = OpenAIBackend("m", server.base_url, tokenizer=ChatTemplate())  # type: ignore[arg-type]
        scored = await backend.score(request(reasoning="2 + 3"), " = 5.")
        await backend.aclose()
    assert scored == [-0.5, -0.25, -1.0]
    sent = server.requests[-1]["json"]
    assert sent["echo"] is True and sent["prompt"] == prefix + " = 5." and sent["max_tokens"] == 1


async def test_a_stop_inside_the_last_token_is_a_step_end_not_the_end_of_the_answer() -> None:
    """llama.cpp cuts the text before a stop string but sends the logprob of a token holding
    both the text's end and the stop's start (``":\\n"``, stop ``"\\n"``): the step ended at
    its delimiter, the model did not end its answer."""
    tokens = ["1", ".", " Count", " the", " eggs", ":\n"]
    body = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "text": "1. Count the eggs:",
                "index": 0,
                "logprobs": {"content": [{"id": i, "token": t, "logprob": -0.1} for i, t in enumerate(tokens)]},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": len(tokens), "total_tokens": 11},
    }  # fmt: skip
    eos = {**body, "choices": [{**body["choices"][0], "text": "1. Count the eggs:\n"}]}
    async with scripted(Reply(body=body), Reply(body=eos)) as server:
        backend = OpenAIBackend("m", server.base_url, mode="completions", tokenizer=ChatTemplate())  # type: ignore[arg-type]
        step = await backend.generate(request(reasoning="Q.\n", stop=("\n",)))
        plain = await backend.generate(request(reasoning="Q.\n", stop=("\n\n",)))
        await backend.aclose()
    assert (step.text, step.stop_reason, step.stop_string) == ("1. Count the eggs:", "step", "\n")
    assert plain.stop_reason == "eos"  # the whole text came back: no stop was cut
