"""How a server is asked to continue the reasoning: one small class per mode, each building its
request body and reading its answer's text.

``completions`` sends the rendered chat template plus the reasoning to ``/completions``; the chat
modes send the messages to ``/chat/completions`` with the reasoning as a trailing assistant
message, continued the way the server understands (see `collab_agent.backends.openai`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from collab_agent.backends.openai.answers import text_field
from collab_agent.errors import CapabilityError
from collab_agent.types import GenerateRequest

__all__ = ["MODES", "Answer", "BodyInput", "RequestMode"]


@dataclass(frozen=True)
class BodyInput:
    """What a mode builds a request body from.

    Attributes:
        request: the request.
        sampling: the body's common fields (model, max_tokens, sampling, stop strings).
        prompt: the rendered prompt plus reasoning (modes that `renders_prompt` only).
        want_logprobs: whether to ask for logprobs (asked for, or needed to read a stop).
        backend: the backend's name, for messages.
        dialect: the server's dialect when known, for messages.
    """

    request: GenerateRequest
    sampling: dict[str, Any]
    prompt: str | None
    want_logprobs: bool
    backend: str
    dialect: str | None


@dataclass(frozen=True)
class Answer:
    """The text parts of an answer's first choice."""

    text: str
    reasoning_text: str = ""
    native_calls: tuple[Any, ...] = ()


class RequestMode:
    """One way to ask for a continuation (a subclass per mode)."""

    name: ClassVar[str]
    chat: ClassVar[bool] = True
    """Whether it uses the chat endpoint (else ``/completions``)."""
    renders_prompt: ClassVar[bool] = False
    """Whether its body needs the chat template rendered (`BodyInput.prompt`)."""
    streams: ClassVar[bool] = True
    """Whether its answer can be shown as it arrives (else it is rewritten once whole)."""

    @property
    def path(self) -> str:
        return "/chat/completions" if self.chat else "/completions"

    @property
    def what(self) -> str:
        return "chat completion" if self.chat else "completion"

    def body(self, given: BodyInput) -> dict[str, Any]:
        """The request body (without ``stream``)."""
        request = given.request
        body = dict(given.sampling)
        messages = [dict(m) for m in request.messages]
        if request.reasoning:
            self.continue_reasoning(given, body, messages)
        body["messages"] = messages
        if request.tools:
            body["tools"] = [dict(t) for t in request.tools]
        if given.want_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = max(1, request.top_logprobs)
        return body

    def continue_reasoning(
        self, given: BodyInput, body: dict[str, Any], messages: list[dict[str, Any]]
    ) -> None:
        """Ask the server to continue ``given.request.reasoning`` (chat modes)."""
        messages.append({"role": "assistant", "content": given.request.reasoning})

    def read(self, request: GenerateRequest, choice: Mapping[str, Any]) -> Answer:
        """The answer's text parts; `TypeError` for a field of the wrong type."""
        message = choice.get("message") or {}
        if not isinstance(message, Mapping):
            raise TypeError("choices[0].message is not an object")
        text = text_field(message.get("content"), "choices[0].message.content")
        reasoning_text = message.get("reasoning_content") or message.get("reasoning") or ""
        native_calls = message.get("tool_calls") or []
        if not isinstance(reasoning_text, str) or not isinstance(native_calls, list):
            raise TypeError("reasoning_content or tool_calls of the wrong type")
        return Answer(self.answer_text(request, text), reasoning_text, tuple(native_calls))

    def answer_text(self, request: GenerateRequest, text: str) -> str:
        """The continuation in a chat answer's content."""
        return text


class Completions(RequestMode):
    """``/v1/completions`` with the rendered chat template plus the reasoning."""

    name = "completions"
    chat = False
    renders_prompt = True

    def body(self, given: BodyInput) -> dict[str, Any]:
        body = dict(given.sampling)
        body["prompt"] = given.prompt
        if given.want_logprobs:
            body["logprobs"] = max(1, given.request.top_logprobs)
        return body

    def read(self, request: GenerateRequest, choice: Mapping[str, Any]) -> Answer:
        return Answer(text_field(choice.get("text"), "choices[0].text"))


class Chat(RequestMode):
    """Plain chat: hosted APIs that cannot continue; only requests without reasoning."""

    name = "chat"

    def continue_reasoning(
        self, given: BodyInput, body: dict[str, Any], messages: list[dict[str, Any]]
    ) -> None:
        raise CapabilityError(f"{given.backend}: {self.why_not(given)}")

    def why_not(self, given: BodyInput) -> str:
        """Why this mode cannot continue reasoning here, and what would."""
        return (
            "mode 'chat' cannot continue a partial assistant text on this server (dialect "
            f"{given.dialect or 'unknown'}); pass mode='completions' with tokenizer=, or "
            "mode='chat-continue' (vLLM, SGLang), 'chat-prefill' (llama.cpp) or "
            "'deepseek-prefix' (DeepSeek)"
        )


class NeedsTokenizer(Chat):
    """llama-cpp-python without ``tokenizer=``: chat for requests without reasoning."""

    name = "completions-needs-tokenizer"

    def why_not(self, given: BodyInput) -> str:
        return (
            "llama-cpp-python ignores a trailing assistant message and has no template "
            "endpoint; pass tokenizer= (a Hugging Face tokenizer or its path) so the prompt is "
            "rendered locally and sent to /completions"
        )


class ChatContinue(RequestMode):
    """A trailing assistant message with ``continue_final_message`` (vLLM, SGLang)."""

    name = "chat-continue"

    def continue_reasoning(
        self, given: BodyInput, body: dict[str, Any], messages: list[dict[str, Any]]
    ) -> None:
        super().continue_reasoning(given, body, messages)
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False


class ChatPrefill(RequestMode):
    """A trailing assistant message, which llama.cpp continues on its own; its unstreamed
    content repeats the prefix, cut here (so its answer is not streamed)."""

    name = "chat-prefill"
    streams = False

    def answer_text(self, request: GenerateRequest, text: str) -> str:
        if request.reasoning and text.startswith(request.reasoning):
            return text[len(request.reasoning) :]
        return text


class DeepSeekPrefix(RequestMode):
    """A trailing assistant message with ``"prefix": true`` (DeepSeek's chat prefix completion)."""

    name = "deepseek-prefix"

    def continue_reasoning(
        self, given: BodyInput, body: dict[str, Any], messages: list[dict[str, Any]]
    ) -> None:
        messages.append({"role": "assistant", "content": given.request.reasoning, "prefix": True})


MODES: dict[str, RequestMode] = {
    mode.name: mode
    for mode in (
        Completions(),
        Chat(),
        NeedsTokenizer(),
        ChatContinue(),
        ChatPrefill(),
        DeepSeekPrefix(),
    )
}
"""Every mode by name (``auto`` picks one of them after probing the server)."""
