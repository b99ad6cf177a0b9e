"""Loading the model pair for a command, and closing backends when the command ends."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from rich.console import Console

from collab_agent.backends.base import close_backends

T = TypeVar("T")

stderr = Console(stderr=True)


def load_pair(
    models: str | None, small: str | None, large: str | None, **options: Any
) -> tuple[Any, Any]:
    """Load the (small, large) backends, showing progress on stderr while they load."""
    from collab_agent.backends.specs import load_backend, resolve_pair

    small_spec, large_spec = resolve_pair(models, small, large)
    backends = []
    for role, spec in (("small", small_spec), ("large", large_spec)):
        with stderr.status(f"Loading the {role} model [bold]{spec}[/] ..."):
            backends.append(load_backend(spec, **options))
        stderr.print(f"[green]loaded[/] {role}: {spec}")
    return backends[0], backends[1]


def run_then_close(work: Callable[[], Awaitable[T]], *backends: object) -> T:
    """Run ``work`` in a new event loop and close ``backends`` (``None`` skipped) when it ends,
    however it ends: the end of every command that loaded models."""

    async def main() -> T:
        try:
            return await work()
        finally:
            await close_backends(*backends)

    return anyio.run(main)
