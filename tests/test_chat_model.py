"""CollabChatModel's behaviour, driven by ScriptedBackend: what LangChain users rely on.

Reasoning streams step by step before the answer; the trace lands in ``response_metadata``;
tool calls come out of the answering model's text (or natively); bad input fails before any
model runs; sync calls work inside a running event loop.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from collab_agent import ConfigError, InvalidMessagesError
from collab_agent.chat_model import _LOCAL_BACKENDS, CollabChatModel
from collab_agent.policies import SmallOnly, TrigReason
from collab_agent.testing import ScriptedBackend, ScriptedStep


@tool
def get_weather(location: str) -> str:
    """Get the current weather at a location."""
    return "It's sunny."


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def pair(
    small: list[Any], large: list[Any] | None = None, **fields: Any
) -> tuple[CollabChatModel, ScriptedBackend, ScriptedBackend]:
    """A model over two scripted backends; the large model primes the first step."""
    s = ScriptedBackend(small, name="srm")
    lg = ScriptedBackend(large or [], name="lrm")
    fields.setdefault("policy", TrigReason(priming_steps=1 if large else 0))
    return CollabChatModel(small=s, large=lg, **fields), s, lg


# ============================================================================ answers and traces
def test_invoke_returns_answer_with_reasoning_and_the_collaboration_trace() -> None:
    model, small, large = pair(
        ["Then 6 * 7.", "That is 42.", "Final answer: 42"], ["Multiply the numbers."]
    )
    result = model.invoke("What is 6 * 7?")

    assert result.content == "42"
    assert result.additional_kwargs["reasoning_content"] == (
        "Multiply the numbers.\n\nThen 6 * 7.\n\nThat is 42."
    )
    assert [b["type"] for b in result.content_blocks] == ["reasoning", "text"]
    collab = result.response_metadata["collab"]
    assert [s["author"] for s in collab["steps"]] == ["large", "small", "small"]
    assert collab["steps"][0]["trigger"] == "strategic_priming"
    assert collab["triggers"] == {"strategic_priming": 1}
    assert collab["small_step_share"] == pytest.approx(2 / 3)
    assert collab["models"] == {"small": "srm", "large": "lrm"}
    assert result.response_metadata["model_name"] == "srm+lrm"
    assert result.response_metadata["finish_reason"] == "stop"
    usage = result.usage_metadata
    assert usage is not None
    # ScriptedBackend counts a token per word: steps of 3, 4 and 3 words, answer step of 3.
    assert usage["output_token_details"]["reasoning"] == 3 + 4 + 3
    assert usage["output_tokens"] == 3 + 4 + 3 + 3
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert small.calls == 3 and large.calls == 1


def test_step_granularity_yields_each_step_as_reasoning_before_any_answer_text() -> None:
    model, _, _ = pair(
        ["Step two.", "Step three.", "Final answer: 5"],
        ["Step one."],
        stream_granularity="step",
    )
    chunks = list(model.stream("What is 2 + 3?"))

    reasoning = [c.additional_kwargs.get("reasoning_content") for c in chunks]
    assert reasoning[:3] == ["Step one.", "\n\nStep two.", "\n\nStep three."]
    first_text = next(i for i, c in enumerate(chunks) if c.content)
    assert all(not c.additional_kwargs for c in chunks[first_text:])
    assert chunks[-1].chunk_position == "last"
    assert sum(c.usage_metadata is not None for c in chunks) == 1  # usage once, at the end
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.text == "5"
    assert [b["type"] for b in full.content_blocks] == ["reasoning", "text"]


async def test_astream_and_ainvoke_match_the_sync_calls() -> None:
    model, _, _ = pair(["Step two.", "Final answer: 5"], ["Step one."], stream_granularity="step")
    chunks = [c async for c in model.astream("What is 2 + 3?")]
    assert [c.additional_kwargs.get("reasoning_content") for c in chunks[:2]] == [
        "Step one.",
        "\n\nStep two.",
    ]
    assert chunks[-1].response_metadata["collab"]["steps_by_author"] == {"small": 1, "large": 1}

    model, _, _ = pair(["Step two.", "Final answer: 5"], ["Step one."])
    result = await model.ainvoke("What is 2 + 3?")
    assert result.content == "5"


async def test_sync_invoke_works_inside_a_running_event_loop() -> None:
    """Jupyter runs an event loop in the calling thread; invoke must not need it."""
    model, _, _ = pair(["Final answer: 5"])
    assert model.invoke("What is 2 + 3?").content == "5"


@pytest.mark.parametrize("entry", ["invoke", "ainvoke", "stream", "astream"])
def test_each_entry_point_gives_the_same_message_and_reports_each_chunk_once(entry: str) -> None:
    """The sync methods are their async twins run on a portal: same message, same tokens."""
    import asyncio

    from langchain_core.callbacks import BaseCallbackHandler

    class Tokens(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[tuple[str, str]] = []

        def on_llm_new_token(self, token: str, *, chunk: Any = None, **kwargs: Any) -> None:
            if kwargs.get("parent_run_id") is None:  # the chat model's run, not a child run
                reasoning = chunk.message.additional_kwargs.get("reasoning_content", "")
                self.tokens.append((reasoning, token))

    model, _, _ = pair(
        ["Then 6 * 7.", "Final answer: 42, as you asked"],
        ["Multiply."],
        stream_granularity="step",
    )
    handler = Tokens()
    config: Any = {"callbacks": [handler]}
    stop = [", as"]
    if entry == "invoke":
        message: Any = model.invoke("6 * 7?", stop=stop, config=config)
    elif entry == "ainvoke":
        message = asyncio.run(model.ainvoke("6 * 7?", stop=stop, config=config))
    elif entry == "stream":
        message = sum(model.stream("6 * 7?", stop=stop, config=config), AIMessageChunk(""))
    else:

        async def collect() -> Any:
            return [c async for c in model.astream("6 * 7?", stop=stop, config=config)]

        message = sum(asyncio.run(collect()), AIMessageChunk(""))
    assert message.content == "42"
    assert message.additional_kwargs["reasoning_content"] == "Multiply.\n\nThen 6 * 7."
    assert message.response_metadata["collab"]["steps_by_author"] == {"small": 1, "large": 1}
    # Two steps, the answer, the closing chunk: each reported once, in order.
    assert handler.tokens == [("Multiply.", ""), ("\n\nThen 6 * 7.", ""), ("", "42"), ("", "")]


def test_batch_runs_each_conversation() -> None:
    small = ScriptedBackend(["Final answer: a", "Final answer: b"], name="srm")
    model = CollabChatModel(small=small, large=ScriptedBackend([]), policy=SmallOnly())
    results = model.batch(["first", "second"], config={"max_concurrency": 1})
    assert [r.content for r in results] == ["a", "b"]


def test_stop_strings_cut_the_answer() -> None:
    model, _, _ = pair(["Final answer: 42, as you asked"])
    assert model.invoke("q", stop=[", as"]).content == "42"


def test_small_only_policy_never_calls_the_large_model() -> None:
    model, _, large = pair(["One.", "Final answer: 1"], policy=SmallOnly())
    result = model.invoke("q")
    assert result.response_metadata["collab"]["steps_by_author"] == {"small": 1, "large": 0}
    assert large.calls == 0


# ============================================================================ tools
def test_tool_call_written_in_a_reasoning_step_becomes_a_tool_call() -> None:
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>'
    model, small, _ = pair(["I need the weather tool.", call])
    result = model.bind_tools([get_weather]).invoke("Weather in Paris?")

    assert result.tool_calls == [
        {
            "name": "get_weather",
            "args": {"location": "Paris"},
            "id": result.tool_calls[0]["id"],
            "type": "tool_call",
        }
    ]
    assert result.content == ""
    assert result.response_metadata["finish_reason"] == "tool_calls"
    assert any(b["type"] == "tool_call" for b in result.content_blocks)
    request = small.requests[0]
    assert request.tools and request.tools[0]["function"]["name"] == "get_weather"
    assert (
        "call the tool in a <tool_call>" in request.messages[0]["content"]
    )  # the reasoning format allows it


def test_auto_tool_choice_still_answers_in_text() -> None:
    model, small, large = pair(
        ["Nothing to look up.", "Final answer: hello"],
        ["Hello!"],
        policy=TrigReason(priming_steps=0),
    )
    result = model.bind_tools([get_weather]).invoke("Say hello")
    assert result.content == "hello"  # the tool turn called nothing: the reasoning's answer
    assert result.tool_calls == []
    assert len(small.requests) == 2
    (offered,) = large.requests  # the tools offered to the large model, no reasoning
    assert offered.purpose == "answer" and offered.reasoning == "" and offered.tools
    assert offered.messages[0]["role"] == "system" and "never estimate" in str(offered.messages[0])
    assert offered.messages[-1] == {"role": "user", "content": "Say hello"}


def test_reasoning_that_guesses_what_a_tool_gives_yields_to_the_tools_call() -> None:
    """The bundled 0.5B invented a rate and answered instead of calling the tool; the large
    model, offered the tools without that reasoning, decides on the call."""
    call = '{"name": "get_weather", "arguments": {"location": "Paris"}}'
    model, small, large = pair(
        ["It is probably sunny.", "Final answer: sunny"], [call], policy=TrigReason(priming_steps=0)
    )
    result = model.bind_tools([get_weather]).invoke("Weather in Paris?")
    assert [(c["name"], c["args"]) for c in result.tool_calls] == [
        ("get_weather", {"location": "Paris"})
    ]
    assert result.content == ""
    assert result.response_metadata["finish_reason"] == "tool_calls"
    assert "Never guess" in small.requests[0].messages[0]["content"]
    assert [r.tools is not None for r in large.requests] == [True]


def test_after_a_tool_result_the_reasoning_answer_stands() -> None:
    model, small, _ = pair(["The tool said sunny.", "Final answer: sunny"])
    messages = [
        HumanMessage("Weather in Paris?"),
        AIMessage(
            "", tool_calls=[{"name": "get_weather", "args": {"location": "Paris"}, "id": "c1"}]
        ),
        ToolMessage("sunny", tool_call_id="c1"),
    ]
    result = model.bind_tools([get_weather]).invoke(messages)
    assert result.content == "sunny" and result.tool_calls == []
    assert len(small.requests) == 2  # no tool turn offered: the turn has its tool result


def test_tool_choice_any_prefills_the_opening_of_a_call() -> None:
    answer = ScriptedStep('{"a": 2, "b": 3}}\n</tool_call>', stop_reason="eos")
    model, small, _ = pair([ScriptedStep("Add them.", stop_reason="eos"), answer])
    result = model.bind_tools([add], tool_choice="any").invoke("What is 2 + 3?")

    assert [(c["name"], c["args"]) for c in result.tool_calls] == [("add", {"a": 2, "b": 3})]
    answer_request = small.requests[-1]
    assert answer_request.purpose == "answer"
    assert answer_request.reasoning.endswith('<tool_call>\n{"name": "add", "arguments":')


def test_a_prefilled_call_ending_in_a_code_fence_still_parses() -> None:
    """The bundled 0.5B closed a prefilled call with a stray fence instead of the tag."""
    answer = ScriptedStep(' {"city": "Paris"}}\n```', stop_reason="eos")
    model, _, _ = pair([ScriptedStep("Call it.", stop_reason="eos"), answer])
    result = model.bind_tools([get_weather], tool_choice="any").invoke("Paris?")
    assert [(c["name"], c["args"]) for c in result.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]


def test_a_fenced_json_call_in_a_reasoning_step_ends_reasoning() -> None:
    """The bundled 0.5B writes its call as fenced JSON rather than in <tool_call> tags."""
    fenced = '```json\n{"name": "get_weather", "arguments": {"location": "Oslo"}}\n```'
    model, small, _ = pair(["The call would look like this:", fenced, "never reached"])
    result = model.bind_tools([get_weather]).invoke("Oslo?")
    assert [(c["name"], c["args"]) for c in result.tool_calls] == [
        ("get_weather", {"location": "Oslo"})
    ]
    assert small.calls == 2


def test_tool_choice_with_several_tools_lets_the_model_pick() -> None:
    answer = ScriptedStep('get_weather", "arguments": {"location": "Oslo"}}', stop_reason="eos")
    model, small, _ = pair([ScriptedStep("Look it up.", stop_reason="eos"), answer])
    result = model.bind_tools([add, get_weather], tool_choice="required").invoke("Oslo weather?")
    assert result.tool_calls[0]["name"] == "get_weather"
    assert small.requests[-1].reasoning.endswith('<tool_call>\n{"name": "')


def test_a_named_tool_choice_asks_again_when_the_model_called_another_tool() -> None:
    wrong = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    retry = ScriptedStep('{"location": "Rome"}}\n</tool_call>', stop_reason="eos")
    model, small, _ = pair([wrong, retry])
    result = model.bind_tools([add, get_weather], tool_choice="get_weather").invoke("Rome?")

    assert [(c["name"], c["args"]) for c in result.tool_calls] == [
        ("get_weather", {"location": "Rome"})
    ]
    assert small.requests[-1].reasoning.endswith('{"name": "get_weather", "arguments":')
    assert result.response_metadata["collab"]["usage"]["small"]["calls"] == 2  # counted


def test_stream_with_tools_emits_tool_call_chunks() -> None:
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    model, _, _ = pair(["Use add.", call])
    chunks = list(model.bind_tools([add]).stream("1 + 2?"))
    assert any(c.tool_call_chunks for c in chunks)
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert isinstance(full, AIMessageChunk)
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("add", {"a": 1, "b": 2})]


def test_native_tool_calls_from_a_server_pass_through() -> None:
    native = {"id": "call_1", "name": "add", "args": {"a": 4, "b": 5}}
    answer = ScriptedStep("", stop_reason="eos", tool_calls=[native])
    model, _, _ = pair([ScriptedStep("Use add.", stop_reason="eos"), answer])
    result = model.bind_tools([add]).invoke("4 + 5?")
    assert result.tool_calls == [{**native, "type": "tool_call"}]


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    calls = (
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call>'
    )
    model, _, _ = pair([calls])
    result = model.bind_tools([add], parallel_tool_calls=False).invoke("q")
    assert [c["args"] for c in result.tool_calls] == [{"a": 1, "b": 1}]


def test_with_structured_output_parses_the_forced_call() -> None:
    class Person(BaseModel):
        """A person."""

        name: str = Field(description="their name")
        age: int = Field(description="their age")

    answer = ScriptedStep('{"name": "Ada", "age": 36}}\n</tool_call>', stop_reason="eos")
    model, _, _ = pair([ScriptedStep("Ada is 36.", stop_reason="eos"), answer])
    assert model.with_structured_output(Person).invoke("Ada, 36") == Person(name="Ada", age=36)


def test_tool_histories_reach_the_model_in_openai_format() -> None:
    model, small, _ = pair(["Final answer: 3"])
    model.bind_tools([add]).invoke(
        [
            SystemMessage("Be brief."),
            HumanMessage("What is 1 + 2?"),
            AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1"}]),
            ToolMessage("3", tool_call_id="c1", name="add"),
        ]
    )
    messages = small.requests[0].messages
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.")
    assert messages[2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "add", "arguments": json.dumps({"a": 1, "b": 2})},
            }
        ],
    }
    assert messages[3] == {"role": "tool", "content": "3", "tool_call_id": "c1", "name": "add"}


def test_assistant_reasoning_and_tool_use_blocks_are_not_sent_back() -> None:
    model, small, _ = pair(["Final answer: ok"])
    model.invoke(
        [
            HumanMessage("hi"),
            AIMessage(
                [
                    {"type": "reasoning", "reasoning": "private"},
                    {"type": "text", "text": "hello"},
                    {"type": "tool_use", "id": "x", "name": "add", "input": {}},
                ]
            ),
            HumanMessage([{"type": "text", "text": "again"}]),
        ]
    )
    sent = small.requests[0].messages  # the format's system prompt, then the conversation
    assert [m["content"] for m in sent[1:]] == ["hi", "hello", "again"]


# ============================================================================ bad input
@pytest.mark.parametrize(
    ("messages", "where"),
    [
        ([], "empty"),
        (
            [
                HumanMessage(
                    [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]
                )
            ],
            r"content\[0\]: 'image_url'",
        ),
        (
            [
                HumanMessage(
                    [
                        {"type": "text", "text": "hear"},
                        {"type": "audio", "base64": "AA", "mime_type": "audio/wav"},
                    ]
                )
            ],
            r"content\[1\]: 'audio'",
        ),
        ([FunctionMessage("x", name="f")], "FunctionMessage"),
        ([ChatMessage("x", role="narrator")], "narrator"),
        ([HumanMessage("hi"), AIMessage("hello")], "last message"),
    ],
)
def test_bad_conversations_fail_before_any_model_runs(messages: list[Any], where: str) -> None:
    model, small, large = pair(["Final answer: never"], ["never"])
    with pytest.raises(InvalidMessagesError, match=where):
        model.invoke(messages)
    with pytest.raises(InvalidMessagesError, match=where):
        list(model.stream(messages))
    assert small.calls == 0 and large.calls == 0


def test_tools_that_cannot_be_converted_are_refused_at_bind_time() -> None:
    model, _, _ = pair([])
    with pytest.raises(ConfigError, match=r"tools\[1\]"):
        model.bind_tools([add, 42])
    with pytest.raises(ConfigError, match=r"tools\[0\]"):
        model.bind_tools([{"type": "web_search"}])
    with pytest.raises(ConfigError, match="tool_choice"):
        model.bind_tools([add], tool_choice="subtract")


def test_unknown_constructor_arguments_are_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"temprature.*did you mean 'temperature'"):
        CollabChatModel(small="tiny", large="tiny", temprature=0)
    with pytest.raises(ConfigError, match="reasoning_format"):
        CollabChatModel(reasoning_format="chain-of-thought")
    with pytest.raises(ConfigError, match="model spec"):
        CollabChatModel(small="gpt-4")


def test_per_call_model_override_and_unknown_options_are_refused() -> None:
    model, small, _ = pair(["Final answer: x"])
    with pytest.raises(ConfigError, match="model"):
        model.invoke("q", model="other")
    with pytest.raises(ConfigError, match="frequency_penalty"):
        model.invoke("q", frequency_penalty=1.0)
    assert small.calls == 0


def test_spec_strings_load_nothing_until_the_first_call() -> None:
    before = dict(_LOCAL_BACKENDS)
    model = CollabChatModel(small="tiny:7", large="tiny:8")
    assert model.model_name == "tiny:7+tiny:8"
    assert before == _LOCAL_BACKENDS


def test_langsmith_params_name_both_models() -> None:
    model, _, _ = pair([], temperature=0.2, max_tokens=64, stop=["END"])
    params = model._get_ls_params()
    assert params["ls_provider"] == "collab-agent"
    assert params["ls_model_name"] == "srm+lrm"
    assert (params["ls_temperature"], params["ls_max_tokens"], params["ls_stop"]) == (
        0.2,
        64,
        ["END"],
    )


# ============================================================================ time and cancellation
def test_timeout_bounds_the_whole_call_and_cancels_the_step_in_flight() -> None:
    small = ScriptedBackend(["never finishes"], name="srm", delay=5.0)
    model = CollabChatModel(small=small, large=ScriptedBackend([]), policy=SmallOnly(), timeout=0.2)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        model.invoke("q")
    assert time.monotonic() - started < 3
    assert small.cancelled == 1
    assert len(small.released) == 1  # the conversation's cache was freed


def test_leaving_a_stream_early_frees_the_conversation() -> None:
    model, small, _ = pair(["One.", "Two.", "Final answer: 3"])
    for _chunk in model.stream("q"):
        break
    assert small.calls == 1
    assert len(small.released) == 1


async def test_astream_events_show_each_step_as_a_stream_event() -> None:
    model, _, _ = pair(["Step two.", "Final answer: 5"], ["Step one."], stream_granularity="step")
    streamed = [
        event["data"]["chunk"]
        async for event in model.astream_events("What is 2 + 3?", version="v2")
        if event["event"] == "on_chat_model_stream"
    ]
    reasoning = [c.additional_kwargs.get("reasoning_content") for c in streamed]
    assert reasoning[:2] == ["Step one.", "\n\nStep two."]
    assert "".join(c.text for c in streamed) == "5"


def test_streaming_field_makes_invoke_stream_to_callbacks() -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    class Tokens(BaseCallbackHandler):
        def __init__(self) -> None:
            self.chunks: list[Any] = []

        def on_llm_new_token(self, token: str, *, chunk: Any = None, **kwargs: Any) -> None:
            self.chunks.append(chunk)

    model, _, _ = pair(
        ["Step two.", "Final answer: 5"], ["Step one."], streaming=True, stream_granularity="step"
    )
    handler = Tokens()
    assert model.invoke("q", config={"callbacks": [handler]}).content == "5"
    # Each chunk reaches the callback exactly once: two steps, the answer, the closing chunk.
    assert len(handler.chunks) == 4


def test_a_custom_trigger_policy_shows_in_the_trace() -> None:
    from dataclasses import dataclass

    from collab_agent.policies import BaseTrigger, Policy, Reject
    from collab_agent.trace import Step, Trace

    @dataclass
    class RejectEquations(BaseTrigger):
        name: str = "reject_equations"

        async def after_step(self, trace: Trace, step: Step) -> Reject | None:
            return Reject(self.name, "states a result") if "=" in step.text else None

    large = ScriptedBackend(["17 * 23 = 391"], name="lrm")
    model = CollabChatModel(
        small=ScriptedBackend(["17 * 23 = 381", "Final answer: 391"], name="srm"),
        large=large,
        policy=Policy(triggers=(RejectEquations(),), name="mine"),
    )
    result = model.invoke("17 * 23?")
    collab = result.response_metadata["collab"]
    assert collab["policy"] == "mine"
    assert collab["steps"][0] == {
        "index": 0,
        "author": "large",
        "tokens": 5,
        "trigger": "reject_equations",
        "rejected": True,
        "degraded": False,
        "degraded_reason": None,
    }
    assert result.additional_kwargs["reasoning_content"] == "17 * 23 = 391"
    assert large.calls == 1


# ============================================================================ token streaming
async def test_token_granularity_streams_large_steps_and_the_answer_in_many_chunks() -> None:
    model, _, _ = pair(
        ["Two plus three is five.", "Final answer: 5"], ["Add the two numbers together now."]
    )
    chunks = [c async for c in model.astream("What is 2 + 3?")]
    reasoning = [c.additional_kwargs.get("reasoning_content") for c in chunks]
    assert reasoning[:6] == ["Add", " the", " two", " numbers", " together", " now."]
    # The small step, which cognitive offload may reject, comes once accepted, whole.
    assert "\n\nTwo plus three is five." in reasoning

    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    again, _, _ = pair(
        ["Two plus three is five.", "Final answer: 5"], ["Add the two numbers together now."]
    )
    result = await again.ainvoke("What is 2 + 3?")
    assert full.text == result.content == "5"
    assert (
        full.additional_kwargs["reasoning_content"]
        == (result.additional_kwargs["reasoning_content"])
    )


async def test_a_rejected_small_step_is_never_streamed() -> None:
    import math

    sure = ("Rejected guess here", [math.log(0.99)] * 10)
    model, _, _ = pair(
        [sure, "Final answer: 5"], ["Careful step."], policy=TrigReason(priming_steps=0)
    )
    chunks = [c async for c in model.astream("What is 2 + 3?")]
    streamed = "".join(c.additional_kwargs.get("reasoning_content", "") for c in chunks)
    assert "Rejected" not in streamed
    assert "Careful step." in streamed
