"""Connections to llama.cpp's real server: no request is sent on a connection the server closed.

llama.cpp's server closes the connection after every streamed answer (while announcing
``Keep-Alive``), and an idle one after 5 s. A pooled connection the server already closed made the
next request fail with "Server disconnected without sending a response", a retry the backend logs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from collab_agent.backends.base import GREEDY, GenerateRequest
from collab_agent.backends.llamacpp import LlamaCppBackend, LlamaCppServer

pytestmark = pytest.mark.server

RETRY_LOGGER = "collab_agent.backends.openai.client"


def request(conversation: str) -> GenerateRequest:
    return GenerateRequest(
        conversation_id=conversation,
        messages=[{"role": "user", "content": "Say hello."}],
        sampling=GREEDY,
        max_tokens=3,
    )


async def idle_pooled_connections(backend: LlamaCppBackend) -> list[Any]:
    """The pool's idle connections (those the next request would be sent on)."""
    client = (await backend._http.loop_client()).client
    pool = client._client._transport._pool
    return [c for c in pool.connections if c.is_idle()]


async def test_a_streamed_answer_leaves_no_connection_to_reuse(smol_server: LlamaCppServer) -> None:
    backend = LlamaCppBackend(smol_server.model_path, server=smol_server)
    try:
        async for _ in backend.stream(request("s")):
            pass
        await asyncio.sleep(0.05)  # the server's FIN has arrived by now
        idle = await idle_pooled_connections(backend)
        assert idle == [], f"the pool kept {idle} after a stream the server closed"
    finally:
        await backend.aclose()


async def test_streams_then_requests_at_once_never_reach_the_retry_path(
    smol_server: LlamaCppServer, caplog: pytest.LogCaptureFixture
) -> None:
    backend = LlamaCppBackend(smol_server.model_path, server=smol_server)
    http, root = backend._http, backend.root_url

    async def conversation(name: str) -> None:
        for turn in range(4):
            async for _ in backend.stream(request(f"{name}-{turn}")):
                pass
            await backend._detokenize([15339, 1879])
            await http.with_retries(http.post, f"{root}/tokenize", {"content": "hi"}, "tokenize")
            await asyncio.sleep(0.6 * turn)  # idle gaps up to the pool's keep-alive expiry

    caplog.set_level(logging.WARNING, logger=RETRY_LOGGER)
    try:
        await asyncio.gather(conversation("a"), conversation("b"))
    finally:
        await backend.aclose()
    retries = [r.getMessage() for r in caplog.records if r.name == RETRY_LOGGER]
    assert retries == []
