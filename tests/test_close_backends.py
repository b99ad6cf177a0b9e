"""The one helper the commands close their backends with: each closable backend once, through
wrappers, skipping what has nothing to close."""

from __future__ import annotations

from collab_agent.backends.base import ClosableBackend, close_backends
from collab_agent.backends.network import SimulatedLink
from collab_agent.testing import ScriptedBackend
from collab_agent.types import GenerateRequest, Generation


class Counting:
    """A backend whose closes are counted (no real backend reports how often it was closed)."""

    name = "counting"

    def __init__(self) -> None:
        self.closed = 0

    async def generate(self, request: GenerateRequest) -> Generation:
        return Generation(text="", stop_reason="eos")

    async def aclose(self) -> None:
        self.closed += 1


async def test_each_backend_is_closed_once_and_the_rest_skipped() -> None:
    small, large = Counting(), Counting()
    scripted = ScriptedBackend([])
    assert not isinstance(scripted, ClosableBackend)
    await close_backends(small, None, scripted, large, small)
    assert (small.closed, large.closed) == (1, 1)


async def test_a_simulated_link_closes_the_backend_it_wraps() -> None:
    large = Counting()
    link = SimulatedLink(large, sleep=False)
    await close_backends(link)
    assert large.closed == 1
