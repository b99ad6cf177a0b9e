"""Every caller frees a conversation's state with one helper: shielded from cancellation, each
backend once, and bounded in time."""

from __future__ import annotations

import time

import anyio
import anyio.lowlevel
import pytest

from collab_agent.backends import base
from collab_agent.backends.base import release_shielded
from collab_agent.reasoner import Reasoner
from collab_agent.testing import ScriptedBackend

QUESTION = [{"role": "user", "content": "What is 3 + 4?"}]


class Yielding(ScriptedBackend):
    """Releases after a checkpoint, where a cancelled scope would stop it."""

    async def release(self, conversation_id: str) -> None:
        await anyio.lowlevel.checkpoint()
        self.released.append(conversation_id)


class Hanging(ScriptedBackend):
    """A backend whose release never returns (a server that stopped answering; no real one can
    be made to hang on demand)."""

    async def release(self, conversation_id: str) -> None:
        self.released.append(conversation_id)
        await anyio.sleep_forever()


async def test_release_runs_in_a_cancelled_scope_and_frees_each_backend_once() -> None:
    small, large = Yielding([]), Yielding([])
    with anyio.CancelScope() as scope:
        scope.cancel()
        await release_shielded(small, large, small, conversation_id="c1")
    assert (small.released, large.released) == (["c1"], ["c1"])


async def test_a_hanging_release_gives_up_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(base, "RELEASE_TIMEOUT_S", 0.05)
    hanging = Hanging([])
    started = time.perf_counter()
    await release_shielded(hanging, conversation_id="c2")
    assert hanging.released == ["c2"] and time.perf_counter() - started < 5


async def test_a_cancelled_reasoner_still_frees_both_models() -> None:
    small = Yielding(["a step", "Final answer: 7"], delay=5.0)
    large = Yielding(["primed"])
    reasoner = Reasoner(small, large)
    with anyio.move_on_after(0.2):
        await reasoner.run(QUESTION, conversation_id="c3")
    assert small.released == ["c3"] and large.released == ["c3"]
