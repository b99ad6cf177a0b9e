"""LangChain's standard integration suite (``langchain-tests``) for `ChatOpenAI` pointed at
`collab-agent serve`: what a LangChain user who only knows the OpenAI API meets.

The server runs two tiny random-weight Qwen2 models (fast, offline) behind TrigReason and
large-only. Random weights write random tokens, never the JSON of a sensible tool call or
structured output: those tests are xfailed (not run) with that reason, exactly as for
`CollabChatModel` itself in tests/test_chat_model_standard.py; every other test runs the real
path (SDK -> HTTP -> server -> reasoner -> models) and must pass.

Flags that are honestly false: JSON mode (``response_format`` ``json_object`` is refused with a
400; ``json_schema`` is supported), image/audio/video/PDF inputs (the models read text only).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests
from serve_harness import RunningServer, running
from test_chat_model_standard import NOT_SENSIBLE, tiny_backends, tool_tests_marked

from collab_agent.policies.fixed import LargeOnly
from collab_agent.policies.trigreason import TrigReason
from collab_agent.serve import ServeConfig, create_app

_SERVERS: list[Any] = []


@functools.cache
def tiny_server() -> RunningServer:
    """One server on the tiny pair for the whole module (stopped when the process ends)."""
    small, large = tiny_backends()
    config = ServeConfig(
        policies={"trigreason": TrigReason(priming_steps=1), "large-only": LargeOnly()},
        temperature=0.0,
        reasoning_budget=8,
    )
    context = running(create_app(config, small, large, close_backends=False))
    server = context.__enter__()
    _SERVERS.append(context)
    return server


@pytest.mark.slow  # about 80 calls through HTTP to the tiny pair: minutes on the shared CPU
class TestChatOpenAIOnServer(tool_tests_marked(NOT_SENSIBLE), ChatModelIntegrationTests):  # type: ignore[misc]
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {
            "base_url": tiny_server().base_url,
            "api_key": "unused-on-loopback",
            "model": "trigreason",
            "temperature": 0,
            "max_tokens": 8,
            "max_retries": 0,
            "stream_usage": True,
            # each test has its own event loop; kept-alive connections would outlive theirs
            "default_headers": {"Connection": "close"},
        }

    @property
    def supports_model_override(self) -> bool:
        return True  # another served policy, chosen per call with model=...

    @property
    def model_override_value(self) -> str:
        return "large-only"

    @property
    def supported_usage_metadata_details(self) -> dict[str, list[Any]]:
        return {
            "invoke": ["reasoning_output", "cache_read_input"],
            "stream": ["reasoning_output", "cache_read_input"],
        }

    def invoke_with_reasoning_output(self, *, stream: bool = False) -> Any:
        return self._invoke_once(stream)

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> Any:
        return self._invoke_once(stream)

    def _invoke_once(self, stream: bool) -> Any:
        model = ChatOpenAI(**self.chat_model_params)
        if not stream:
            return model.invoke("What is 2 + 3?")
        full: Any = None
        for chunk in model.stream("What is 2 + 3?"):
            full = chunk if full is None else full + chunk
        return full
