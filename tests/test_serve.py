"""`collab-agent serve` answers real clients: the OpenAI SDK (sync, async, streaming) and
LangChain's ChatOpenAI get the answer, the reasoning step by step, usage and the collab trace."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI
from serve_harness import running, scripted_config, scripted_server

from collab_agent.backends.local import TransformersBackend
from collab_agent.policies.trigreason import TrigReason
from collab_agent.serve import create_app
from collab_agent.testing import ScriptedBackend

QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


def test_openai_sync_gets_answer_reasoning_usage_and_trace() -> None:
    with scripted_server() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="small-only", messages=QUESTION)
    message = reply.choices[0].message
    assert message.content == "4"
    assert message.model_extra["reasoning_content"] == "Two plus two is four."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 5
    assert reply.usage.completion_tokens == 8  # 5 reasoning + "Final answer: 4"
    collab = reply.model_extra["collab"]
    assert [s["author"] for s in collab["steps"]] == ["small"]
    assert collab["small_token_share"] == 1.0


def test_openai_async_stream_sends_each_step_then_answer_then_usage() -> None:
    small = ScriptedBackend(["First step.", "Second step.", "Final answer: 4"], name="small")
    large = ScriptedBackend(["Large opens.", "Final answer: 4"], name="large")
    config = scripted_config(policies={"trigreason": TrigReason(priming_steps=1)})

    async def main(base_url: str) -> list[openai.types.chat.ChatCompletionChunk]:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="trigreason",
            messages=QUESTION,
            stream=True,
            stream_options={"include_usage": True},
        )
        return [chunk async for chunk in stream]

    with running(create_app(config, small, large)) as server:
        chunks = asyncio.run(main(server.base_url))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [d.model_extra.get("reasoning_content") for d in deltas]
    # The large step arrives token by token as decoded; the small steps, which the policy may
    # still reject, arrive whole once accepted.
    assert [r for r in reasoning if r] == [
        "Large",
        " opens.",
        "\n\nFirst step.",
        "\n\nSecond step.",
    ]
    content = "".join(d.content or "" for d in deltas)
    assert content == "4"
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(r is None for r in reasoning[first_content:])  # the answer follows the reasoning
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish[0].choices[0].finish_reason == "stop"
    steps = finish[0].model_extra["collab"]["steps"]
    assert [(s["author"], s["trigger"]) for s in steps] == [
        ("large", "strategic_priming"),
        ("small", None),
        ("small", None),
    ]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 6


def test_openai_sync_stream_without_include_usage_has_no_usage_chunk() -> None:
    with scripted_server() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        chunks = list(
            client.chat.completions.create(model="small-only", messages=QUESTION, stream=True)
        )
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "4"


def test_chat_openai_gets_answer_and_reasoning_tokens() -> None:
    with scripted_server() as server:
        model = ChatOpenAI(
            base_url=server.base_url, api_key="unused", model="small-only", max_retries=0
        )
        message = model.invoke("What is 2 + 2?")
        streamed = list(model.stream("What is 2 + 2?", stream_usage=True))
    assert message.content == "4"
    assert message.usage_metadata["output_token_details"]["reasoning"] == 5
    assert "".join(str(c.content) for c in streamed) == "4"
    assert sum(c.usage_metadata["output_tokens"] for c in streamed if c.usage_metadata) == 8


def test_tiny_real_models_answer_through_the_sdk(tiny_pair) -> None:
    small = TransformersBackend(tiny_pair.small, tiny_pair.tokenizer, name="tiny-small")
    large = TransformersBackend(tiny_pair.large, tiny_pair.tokenizer, name="tiny-large")
    config = scripted_config(
        policies={"trigreason": TrigReason(priming_steps=1)}, reasoning_budget=16
    )
    with running(create_app(config, small, large)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="trigreason", messages=QUESTION, max_tokens=8, seed=0
        )
        health = httpx.get(server.root + "/health", timeout=30)
    assert reply.usage.completion_tokens > 0
    assert reply.model_extra["collab"]["steps"][0]["author"] == "large"
    assert health.status_code == 200
    assert health.json()["models"] == {"small": "ok", "large": "ok"}


def test_tiny_real_models_stream_reasoning_and_answer_token_by_token(tiny_pair) -> None:
    small = TransformersBackend(tiny_pair.small, tiny_pair.tokenizer, name="tiny-small")
    large = TransformersBackend(tiny_pair.large, tiny_pair.tokenizer, name="tiny-large")
    config = scripted_config(
        policies={"trigreason": TrigReason(priming_steps=2)}, reasoning_budget=16
    )
    with running(create_app(config, small, large)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        ask = {"model": "trigreason", "messages": QUESTION, "max_tokens": 6, "seed": 0}
        chunks = list(client.chat.completions.create(stream=True, **ask))
        whole = client.chat.completions.create(**ask)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [d.model_extra.get("reasoning_content") for d in deltas]
    content = [d.content for d in deltas if d.content]
    assert len([r for r in reasoning if r]) >= 8  # the large model's steps, as decoded
    assert len(content) >= 2
    assert (
        "".join(r for r in reasoning if r)
        == whole.choices[0].message.model_extra["reasoning_content"]
    )
    assert "".join(content) == whole.choices[0].message.content


def test_tool_call_reaches_the_client() -> None:
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    small = ScriptedBackend(["I need the weather in Paris.", call], name="small")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city.",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    with scripted_server(small=small) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="small-only",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=tools,
        )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_tool_call_streams_as_a_tool_calls_delta() -> None:
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    small = ScriptedBackend(["I need the weather in Paris.", call], name="small")
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    with scripted_server(small=small) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        chunks = list(
            client.chat.completions.create(
                model="small-only",
                messages=[{"role": "user", "content": "Weather in Paris?"}],
                tools=[tool],
                tool_choice="required",
                stream=True,
            )
        )
    calls = [c for ch in chunks if ch.choices for c in ch.choices[0].delta.tool_calls or []]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_models_lists_the_configured_policies() -> None:
    with scripted_server() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        names = [m.id for m in client.models.list()]
    assert names == ["small-only", "large-only"]


@pytest.mark.parametrize("path", ["/metrics"])
def test_metrics_count_requests_tokens_and_share(path: str) -> None:
    with scripted_server() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        client.chat.completions.create(model="small-only", messages=QUESTION)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=QUESTION)
        text = httpx.get(server.root + path).text
    assert 'collab_requests_total{status="200"} 1.0' in text
    assert 'collab_requests_total{status="404"} 1.0' in text
    assert 'collab_generated_tokens_total{model="small"} 8.0' in text
    assert "collab_small_token_share_count 1.0" in text
    assert "collab_in_flight 0.0" in text


def test_json_schema_response_format_gives_json_content() -> None:
    call = '<tool_call>\n{"name": "result", "arguments": {"value": 4}}\n</tool_call>'
    small = ScriptedBackend(["Two plus two is four.", call], name="small")
    schema = {
        "type": "object",
        "properties": {"value": {"type": "integer"}},
        "required": ["value"],
    }
    with scripted_server(small=small) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="small-only",
            messages=QUESTION,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "result", "schema": schema},
            },
        )
    assert json.loads(reply.choices[0].message.content) == {"value": 4}
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.tool_calls is None
