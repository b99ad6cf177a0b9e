"""Structured output and ChatOpenAI's call options: constrained where the engine constrains,
refused with a clear error where it cannot, never silently changed."""

from __future__ import annotations

import pytest
from langchain_core.tools import tool
from pydantic import BaseModel

from collab_agent import CapabilityError, CollabChatModel, ConfigError, ScriptedBackend, SmallOnly
from collab_agent.backends.local import TransformersBackend
from collab_agent.backends.tiny import TinyPair


class Product(BaseModel):
    """A product of two numbers."""

    a: int
    b: int
    product: int


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def scripted(*answers: str) -> tuple[CollabChatModel, ScriptedBackend]:
    small = ScriptedBackend(["Multiply 6 by 7.", *answers], name="srm")
    return CollabChatModel(small=small, large=ScriptedBackend([]), policy=SmallOnly()), small


def test_json_schema_decodes_the_answer_under_the_schema_and_parses_it() -> None:
    model, small = scripted("Final answer: 42", '{"a": 6, "b": 7, "product": 42}')
    result = model.with_structured_output(Product, method="json_schema", strict=True).invoke(
        "What is 6 * 7?"
    )
    assert result == Product(a=6, b=7, product=42)
    answer = small.requests[-1]
    assert answer.purpose == "answer"  # generated under the constraint, not kept from a step
    assert answer.response_format is not None
    spec = answer.response_format["json_schema"]
    assert answer.response_format["type"] == "json_schema" and spec["strict"] is True
    assert spec["schema"]["required"] == ["a", "b", "product"]
    assert all(r.response_format is None for r in small.requests[:-1])  # reasoning is free


def test_json_mode_returns_a_dict_and_include_raw_keeps_the_message() -> None:
    model, small = scripted("Final answer: 42", '{"product": 42}')
    out = model.with_structured_output(None, method="json_mode", include_raw=True).invoke("6*7?")
    assert out["parsed"] == {"product": 42} and out["parsing_error"] is None
    assert out["raw"].content == '{"product": 42}'
    assert small.requests[-1].response_format == {"type": "json_object"}


def test_a_local_model_without_constrained_decoding_refuses_before_running(
    tiny_pair: TinyPair,
) -> None:
    small = TransformersBackend(tiny_pair.small, tiny_pair.tokenizer, name="tiny-small")
    model = CollabChatModel(small=small, large=small, policy=SmallOnly(), reasoning_budget=4)
    for method in ("json_schema", "json_mode"):
        structured = model.with_structured_output(
            Product if method == "json_schema" else None, method=method
        )
        with pytest.raises(CapabilityError, match=rf"method='{method}'.*tiny-small"):
            structured.invoke("What is 6 * 7?")
    assert small.processed_tokens == 0


def test_an_unknown_method_names_the_argument() -> None:
    model, _ = scripted()
    with pytest.raises(ConfigError, match="method: must be one of"):
        model.with_structured_output(Product, method="xml")  # type: ignore[arg-type]


def test_chatopenai_call_options_are_accepted_or_mapped() -> None:
    model, small = scripted("Final answer: 42")
    options = {"logprobs": False, "response_format": {"type": "text"}}
    assert model.invoke("6*7?", max_completion_tokens=7, **options).content == "42"
    model, small = scripted("Final answer: 42", '{"product": 42}')
    out = model.invoke("6*7?", max_completion_tokens=7, response_format={"type": "json_object"})
    assert out.content == '{"product": 42}'
    assert small.requests[-1].max_tokens == 7  # the answer's limit
    bound = model.bind_tools([add], strict=True)
    assert bound.kwargs["strict"] is True  # type: ignore[attr-defined]


def test_options_that_mean_nothing_here_say_so() -> None:
    model, _ = scripted("Final answer: 42")
    with pytest.raises(ConfigError, match="logprobs: the answer's token logprobs"):
        model.invoke("6*7?", logprobs=True)
    with pytest.raises(ConfigError, match="max_completion_tokens: and max_tokens disagree"):
        model.invoke("6*7?", max_tokens=5, max_completion_tokens=7)


def test_a_pydantic_v1_schema_is_parsed_into_its_class() -> None:
    from pydantic import v1

    class Old(v1.BaseModel):
        product: int

    model, _ = scripted("Final answer: 42", '{"product": 42}')
    assert model.with_structured_output(Old, method="json_schema").invoke("6*7?") == Old(product=42)
