"""Token counts from the models' own tokenizers, and the context check before any model runs."""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.tools import tool

from collab_agent import CapabilityError, CollabChatModel, Reasoner, TrigReason
from collab_agent.backends.local import TransformersBackend
from collab_agent.backends.tiny import TinyPair, qwen_tokenizer
from collab_agent.context import fit_budget
from collab_agent.defaults import ANSWER_MAX_TOKENS, CONTEXT_MARGIN, REASONING_BUDGET
from collab_agent.errors import ContextLengthError


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_get_num_tokens_uses_the_models_tokenizer_offline_without_loading_them() -> None:
    from collab_agent import chat_model

    loaded = dict(chat_model._LOCAL_BACKENDS)
    model = CollabChatModel(small="tiny:0", large="tiny:1")
    text = "What is 17 * 23? Let's think step by step."
    assert model.get_num_tokens(text) == len(qwen_tokenizer()(text)["input_ids"])
    assert model.get_token_ids(text) == qwen_tokenizer()(text)["input_ids"]
    assert loaded == chat_model._LOCAL_BACKENDS  # counting loaded no weights


def test_get_num_tokens_from_messages_counts_the_rendered_prompt_and_the_tools() -> None:
    model = CollabChatModel(small="tiny:0", large="tiny:1")
    messages = [SystemMessage("You are terse."), HumanMessage("What is 17 * 23?")]
    rendered = qwen_tokenizer().apply_chat_template(
        model.reasoning_format.messages(
            [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is 17 * 23?"},
            ]
        ),
        add_generation_prompt=True,
        tokenize=False,
    )
    expected = len(qwen_tokenizer()(rendered, add_special_tokens=False)["input_ids"])
    assert model.get_num_tokens_from_messages(messages) == expected
    assert model.get_num_tokens_from_messages(messages, tools=[add]) > expected + 20


def test_a_server_without_a_tokenizer_says_so_instead_of_guessing() -> None:
    model = CollabChatModel(small="openai:m@http://127.0.0.1:9/v1", large="tiny:1")
    with pytest.raises(CapabilityError, match="tokenizer"):
        model.get_num_tokens("hello")


def _backends(pair: TinyPair) -> dict[str, TransformersBackend]:
    return {
        "small": TransformersBackend(pair.small, pair.tokenizer, name="tiny-small"),
        "large": TransformersBackend(pair.large, pair.tokenizer, name="tiny-large"),
    }


def test_the_default_budget_is_capped_to_the_room_the_context_leaves(tiny_pair: TinyPair) -> None:
    backends = _backends(tiny_pair)
    messages = [{"role": "user", "content": "seven " * 3000}]
    rendered = tiny_pair.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    prompt = len(tiny_pair.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    fitted = fit_budget(backends, messages, None, budget=None, answer_max_tokens=ANSWER_MAX_TOKENS)
    assert fitted == 4096 - prompt - ANSWER_MAX_TOKENS - CONTEXT_MARGIN < REASONING_BUDGET
    short = [{"role": "user", "content": "hi"}]
    assert fit_budget(backends, short, None, budget=None, answer_max_tokens=64) == REASONING_BUDGET


async def test_a_budget_that_cannot_fit_fails_before_any_model_runs(tiny_pair: TinyPair) -> None:
    backends = _backends(tiny_pair)
    reasoner = Reasoner(backends["small"], backends["large"], TrigReason(), budget=8192)
    with pytest.raises(ContextLengthError, match=r"reasoning_budget: 8192 .* give at most \d+"):
        await reasoner.run([{"role": "user", "content": "What is 17 * 23?"}])
    too_long = Reasoner(backends["small"], backends["large"], TrigReason())
    with pytest.raises(ContextLengthError, match=r"messages: the prompt has 4[0-9]{3} tokens"):
        await too_long.run([{"role": "user", "content": "seven " * 4100}])
    assert backends["small"].processed_tokens == backends["large"].processed_tokens == 0
