"""A LangGraph agent on CollabChatModel: Human -> AI (tool call) -> Tool -> AI answer.

Run twice: with scripted backends (fast, exact: the trace of each model turn is checked) and on
the bundled Qwen2.5-Coder pair served by llama.cpp (``slow``, ``server``), in ``invoke`` and in
``stream(stream_mode="messages")``, which LangGraph routes through ``_astream``.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool

from collab_agent.chat_model import CollabChatModel
from collab_agent.policies import TrigReason
from collab_agent.testing import ScriptedBackend

QUESTION = "What is the weather in Paris right now? Use the get_weather tool."


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny and 24 degrees Celsius in {city}."


def scripted_model() -> CollabChatModel:
    """Turn 1: the large model primes, the small one calls the tool; turn 2: it answers."""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    small = ScriptedBackend([call, "The tool says sunny, 24 C.", "Final answer: Sunny, 24 C."])
    large = ScriptedBackend(["I should look up the weather.", "Read the tool result."])
    return CollabChatModel(small=small, large=large, policy=TrigReason(priming_steps=1))


def check_agent_messages(messages: list[Any], *, tool_succeeded: bool = True) -> None:
    """The loop's shape; ``tool_succeeded`` also asks that the call's arguments were right
    (the bundled 0.5B/1.5B once passed the tool's JSON schema as its arguments)."""
    kinds = [type(m).__name__ for m in messages]
    assert kinds[:3] == ["HumanMessage", "AIMessage", "ToolMessage"]
    assert kinds[-1] == "AIMessage"
    call_message, tool_message, answer = messages[1], messages[2], messages[-1]
    assert isinstance(call_message, AIMessage) and isinstance(tool_message, ToolMessage)
    assert call_message.tool_calls[0]["name"] == "get_weather"
    if tool_succeeded:
        assert "sunny" in str(tool_message.content)
    assert isinstance(answer, AIMessage) and not answer.tool_calls and answer.text


def test_scripted_agent_invoke() -> None:
    agent = create_agent(scripted_model(), tools=[get_weather])
    result = agent.invoke({"messages": [HumanMessage(QUESTION)]})
    messages = result["messages"]
    check_agent_messages(messages)
    assert messages[1].tool_calls[0]["args"] == {"city": "Paris"}
    assert messages[-1].text == "Sunny, 24 C."
    first = messages[1].response_metadata["collab"]
    assert [s["author"] for s in first["steps"]] == ["large"]  # primed, then the call


async def test_scripted_agent_stream_messages() -> None:
    agent = create_agent(scripted_model(), tools=[get_weather])
    chunks: list[Any] = []
    async for message, _meta in agent.astream(
        {"messages": [HumanMessage(QUESTION)]}, stream_mode="messages"
    ):
        chunks.append(message)
    ai = [c for c in chunks if isinstance(c, AIMessageChunk)]
    assert any(c.additional_kwargs.get("reasoning_content") for c in ai)  # steps streamed
    assert any(c.tool_call_chunks for c in ai)
    assert any(isinstance(c, ToolMessage) for c in chunks)
    assert "".join(c.text for c in ai).endswith("Sunny, 24 C.")


# ============================================================================ bundled pair
@pytest.fixture(scope="module")
def bundled_model() -> Any:
    from test_chat_model_standard import bundled_chat_model

    return bundled_chat_model()


@pytest.mark.slow
@pytest.mark.server
def test_bundled_agent_invoke(bundled_model: CollabChatModel) -> None:
    agent = create_agent(bundled_model, tools=[get_weather])
    result = agent.invoke({"messages": [HumanMessage(QUESTION)]})
    check_agent_messages(result["messages"], tool_succeeded=False)


@pytest.mark.slow
@pytest.mark.server
def test_bundled_agent_stream_messages(bundled_model: CollabChatModel) -> None:
    agent = create_agent(bundled_model, tools=[get_weather])
    streamed: list[Any] = []
    final: dict[str, Any] = {}
    for mode, payload in agent.stream(
        {"messages": [HumanMessage(QUESTION)]}, stream_mode=["messages", "values"]
    ):
        if mode == "messages":
            streamed.append(payload[0])
        else:
            final = payload
    assert any(isinstance(c, AIMessageChunk) and c.tool_call_chunks for c in streamed)
    check_agent_messages(final["messages"], tool_succeeded=False)
