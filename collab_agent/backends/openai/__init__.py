"""Any OpenAI-compatible server as a backend: vLLM, SGLang, llama.cpp, llama-cpp-python, DeepSeek.

TrigReason's edge-cloud setting (Zhao, Peng, Nguyen et al., 2026, Sec. "Edge-cloud
collaboration") puts the large model behind an API: collab-agent is the client. The reasoner asks
a backend to *continue* an assistant text written so far by either model; servers offer that in
different ways, chosen by ``mode``:

- ``"completions"``: the raw ``/v1/completions`` endpoint with a prompt rendered from the chat
  template (a local Hugging Face tokenizer, or llama.cpp's ``/apply-template``) plus the
  reasoning. Works everywhere a completions endpoint exists; exact and prefix-cache friendly.
- ``"chat-continue"``: the chat endpoint with a trailing assistant message and
  ``continue_final_message`` (vLLM, SGLang).
- ``"chat-prefill"``: the chat endpoint with a trailing assistant message, which llama.cpp's
  server continues on its own (its non-streaming content repeats the prefix; we strip it).
- ``"deepseek-prefix"``: a trailing assistant message with ``"prefix": true`` (DeepSeek's beta
  chat prefix completion; use ``base_url="https://api.deepseek.com/beta"``).
- ``"chat"``: plain chat, for hosted APIs that cannot continue; only requests without reasoning.
- ``"auto"`` (default): ``completions`` when a tokenizer is given; otherwise the server is
  probed once (``GET /models``): llama.cpp -> ``completions`` with the server's template,
  vLLM/SGLang -> ``chat-continue``, DeepSeek -> ``deepseek-prefix``, anything else -> ``chat``.
  llama-cpp-python ignores a trailing assistant message and has no template endpoint, so it needs
  ``tokenizer=``; without one, a request that continues reasoning raises `CapabilityError`.

Faults: every attempt has a deadline (``timeout``); connection errors, timeouts, 429 (honouring
a readable ``Retry-After``), 5xx and malformed answers (`BackendProtocolError`) are retried with
exponential backoff and jitter (tenacity), at most ``max_retries`` times; 4xx never. Each event
loop gets one HTTP client, closed by `OpenAIBackend.aclose` / `OpenAIBackend.close` or when that
loop shuts down. Errors are the `BackendError` family of `errors`; the chat model also types
them as LangChain's model errors where they reach LangChain. Retryable failures that outlast
the retries raise a `BackendUnavailableError` subclass: with ``on_unavailable="degrade"`` the
reasoner catches it and lets the small model write the step, marking it degraded; with
``"fail"`` it propagates.

The package: `client` (HTTP, retries, deadlines, one client per event loop), `modes` (one class
per mode: request body and answer text), `answers` (reading answer fields), `stops` (did the
answer stop at a stop string or at the end of its turn), `stream` (SSE), `prompts` (the chat
template for ``completions``), `dialects` (what a probe learns), `errors`, and `backend`
(`OpenAIBackend`, tying them together).
"""

from __future__ import annotations

from collab_agent.backends.network import Price
from collab_agent.backends.openai.backend import Mode, OpenAIBackend
from collab_agent.backends.openai.dialects import ServerInfo
from collab_agent.backends.openai.errors import (
    BackendAuthenticationError,
    BackendConnectionError,
    BackendContextOverflowError,
    BackendNotFoundError,
    BackendPermissionError,
    BackendProtocolError,
    BackendRateLimitError,
    BackendRequestError,
    BackendServerError,
    BackendTimeoutError,
)

__all__ = [
    "BackendAuthenticationError",
    "BackendConnectionError",
    "BackendContextOverflowError",
    "BackendNotFoundError",
    "BackendPermissionError",
    "BackendProtocolError",
    "BackendRateLimitError",
    "BackendRequestError",
    "BackendServerError",
    "BackendTimeoutError",
    "Mode",
    "OpenAIBackend",
    "Price",
    "ServerInfo",
]
