"""LangChain's own standard tests (``langchain-tests``) for `CollabChatModel`.

- `TestCollabChatModelUnit`: the unit suite (construction, tool binding, LangSmith params).
- `TestCollabChatModelTiny`: the integration suite on two tiny random-weight Qwen2 models run by
  `TransformersBackend` (fast, offline). Random weights write random tokens, so they cannot write
  the JSON of a tool call: the tests that need a *sensible* call are xfailed below with that
  reason; every other test runs the real code path and must pass.
- `TestCollabChatModelBundled` (``slow``, ``server``): the integration suite on the bundled
  Qwen2.5-Coder 0.5B/1.5B pair served by llama.cpp, with short budgets.

Feature flags that are honestly false: model override per call (the model is a pair, chosen at
construction), JSON mode, and image/audio/video/PDF inputs (the models read text only).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from collab_agent.chat_model import CollabChatModel
from collab_agent.policies import TrigReason

SCHEMA_TYPES = ["pydantic", "typeddict", "json_schema"]
RANDOM_WEIGHTS = (
    "random-weight tiny models write random tokens, never the JSON of a sensible tool call; "
    "the bundled-model class runs this test for real"
)
NOT_SENSIBLE = pytest.mark.xfail(reason=RANDOM_WEIGHTS, run=False)
"""Not run on random weights (it cannot pass and would only cost time)."""


@functools.cache
def tiny_backends() -> tuple[Any, Any]:
    """The tiny SRM/LRM pair as backends, built once per process."""
    from collab_agent.backends.local import TransformersBackend
    from collab_agent.backends.tiny import tiny_pair

    pair = tiny_pair()
    return (
        TransformersBackend(pair.small, pair.tokenizer, name="tiny-small"),
        TransformersBackend(pair.large, pair.tokenizer, name="tiny-large"),
    )


def tiny_params() -> dict[str, Any]:
    small, large = tiny_backends()
    return {
        "small": small,
        "large": large,
        "policy": TrigReason(priming_steps=1),
        "temperature": 0,
        "reasoning_budget": 8,
        "step_max_tokens": 4,
        "max_tokens": 8,
    }


@functools.cache
def bundled_backends() -> tuple[Any, Any]:
    """The bundled Qwen2.5-Coder 0.5B/1.5B pair, each on its own llama.cpp server (started once
    per process, stopped at exit)."""
    from collab_agent.backends.llamacpp import LlamaCppBackend
    from collab_agent.backends.specs import LARGE_BUNDLED, SMALL_BUNDLED

    # Each sync call runs on its own event loop (an anyio portal) and pytest-asyncio gives each
    # async test its own; OpenAIBackend keeps one HTTP pool whose kept-alive connections belong
    # to the loop that opened them, so connections are not kept alive across calls here.
    options: dict[str, Any] = {"timeout": 300, "default_headers": {"Connection": "close"}}
    return (
        LlamaCppBackend(f"bundled:{SMALL_BUNDLED}", **options),
        LlamaCppBackend(f"bundled:{LARGE_BUNDLED}", **options),
    )


def bundled_params(**fields: Any) -> dict[str, Any]:
    """Greedy, one primed step, short budgets: a call costs a few seconds on llama.cpp."""
    small, large = bundled_backends()
    params: dict[str, Any] = {
        "small": small,
        "large": large,
        "policy": TrigReason(priming_steps=1),
        "temperature": 0,
        "reasoning_budget": 48,
        "step_max_tokens": 32,
        "max_tokens": 96,
    }
    params.update(fields)
    return params


def bundled_chat_model(**fields: Any) -> CollabChatModel:
    return CollabChatModel(**bundled_params(**fields))


class _Flags:
    """Feature flags shared by every class here."""

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return CollabChatModel

    @property
    def supports_model_override(self) -> bool:
        return False  # the model is a pair of backends fixed at construction

    @property
    def supported_usage_metadata_details(self) -> dict[str, list[Any]]:
        return {
            "invoke": ["reasoning_output", "cache_read_input"],
            "stream": ["reasoning_output", "cache_read_input"],
        }

    def invoke_with_reasoning_output(self, *, stream: bool = False) -> AIMessage:
        return self._invoke_once(stream)

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        return self._invoke_once(stream)

    def _invoke_once(self, stream: bool) -> AIMessage:
        model = CollabChatModel(**self.chat_model_params)  # type: ignore[attr-defined]
        if not stream:
            result = model.invoke("What is 2 + 3?")
            assert isinstance(result, AIMessage)
            return result
        full: Any = None
        for chunk in model.stream("What is 2 + 3?"):
            full = chunk if full is None else full + chunk
        return full  # type: ignore[no-any-return]


class TestCollabChatModelUnit(_Flags, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Spec strings: construction must not load anything.
        return {"small": "tiny:0", "large": "tiny:1"}


def tool_tests_marked(mark: pytest.MarkDecorator) -> type:
    """The standard tests that need a model able to call tools sensibly, each under ``mark``."""

    class ToolTests:
        @mark
        @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
        def test_tool_calling(self, model: BaseChatModel) -> None:
            super().test_tool_calling(model)  # type: ignore[misc]

        @mark
        async def test_tool_calling_async(self, model: BaseChatModel) -> None:
            await super().test_tool_calling_async(model)  # type: ignore[misc]

        @mark
        def test_bind_runnables_as_tools(self, model: BaseChatModel) -> None:
            super().test_bind_runnables_as_tools(model)  # type: ignore[misc]

        @mark
        def test_tool_choice(self, model: BaseChatModel) -> None:
            super().test_tool_choice(model)  # type: ignore[misc]

        @mark
        def test_tool_calling_with_no_arguments(self, model: BaseChatModel) -> None:
            super().test_tool_calling_with_no_arguments(model)  # type: ignore[misc]

        @mark
        @pytest.mark.parametrize("schema_type", SCHEMA_TYPES)
        def test_structured_output(self, model: BaseChatModel, schema_type: Any) -> None:
            super().test_structured_output(model, schema_type)  # type: ignore[misc]

        @mark
        @pytest.mark.parametrize("schema_type", SCHEMA_TYPES)
        async def test_structured_output_async(
            self, model: BaseChatModel, schema_type: Any
        ) -> None:
            await super().test_structured_output_async(model, schema_type)  # type: ignore[misc]

        @mark
        def test_structured_output_pydantic_2_v1(self, model: BaseChatModel) -> None:
            super().test_structured_output_pydantic_2_v1(model)  # type: ignore[misc]

        @mark
        def test_structured_output_optional_param(self, model: BaseChatModel) -> None:
            super().test_structured_output_optional_param(model)  # type: ignore[misc]

        @mark
        @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
        def test_agent_loop(self, model: BaseChatModel) -> None:
            super().test_agent_loop(model)  # type: ignore[misc]

        @mark
        def test_unicode_tool_call_integration(
            self,
            model: BaseChatModel,
            *,
            tool_choice: str | None = None,
            force_tool_call: bool = True,
        ) -> None:
            super().test_unicode_tool_call_integration(  # type: ignore[misc]
                model, tool_choice=tool_choice, force_tool_call=force_tool_call
            )

    return ToolTests


# The bundled Qwen2.5-Coder 0.5B/1.5B pair is too weak for tool use on every run (measured
# 2026-11-26 on llama.cpp, greedy; llama.cpp's parallel slots make runs differ): it sometimes
# writes no call, writes several calls, passes a tool's JSON schema as its arguments, or leaves an
# optional field out; different tests failed on different runs. Our parsing and forcing are
# exercised by tests/test_chat_model.py; these stay running (non-strict) so a better pair or
# prompt shows up as XPASS.
WEAK_PAIR = pytest.mark.xfail(
    reason="the bundled 0.5B/1.5B coder pair does not follow tool schemas reliably",
    strict=False,
)


class TestCollabChatModelTiny(tool_tests_marked(NOT_SENSIBLE), _Flags, ChatModelIntegrationTests):  # type: ignore[misc]
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return tiny_params()


@pytest.mark.slow
@pytest.mark.server
class TestCollabChatModelBundled(tool_tests_marked(WEAK_PAIR), _Flags, ChatModelIntegrationTests):  # type: ignore[misc]
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return bundled_params()


STRUCTURED_TESTS = ("test_structured_output", "test_json_mode", "test_structured_few_shot")


@pytest.mark.slow
@pytest.mark.server
class TestCollabChatModelBundledJsonSchema(_Flags, ChatModelIntegrationTests):  # type: ignore[misc]
    """The structured-output and JSON-mode tests with ``method="json_schema"`` on llama.cpp,
    which constrains the answer's decoding: no xfail (the rest of the suite runs above)."""

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return bundled_params()

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema"}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @pytest.fixture(autouse=True)
    def _only_structured(self, request: pytest.FixtureRequest) -> None:
        if not request.node.name.startswith(STRUCTURED_TESTS):
            pytest.skip("run by TestCollabChatModelBundled; this class checks json_schema")
